"""ShapesEval: a classical, deterministic scorer of `shapes` generations.

Scores a generated image against a sentence prompt of the built-in `shapes`
dataset (`rflow_jax.data.shapes`), GenEval-style, with no learned network:
`parse_prompt` reads what the prompt asks for, `shapes_detector.analyze`
finds the objects in the image, and `score` / `evaluate` compare the two.

Scoring (`score`): single = exactly one object, of the right colour and shape;
position = exactly two objects matching the two (colour, shape) specs whose
centroids satisfy the relation (`shapes_scenes.relation_holds`: right sign, and the
relation's axis difference exceeds the other axis's); counting = exactly N
objects, all of the right colour and shape.

Diagnosis (`diagnose`, `failure_breakdown`): the first requirement a failed
image misses, in the order object count (extra thin stripes named apart),
colour, shape, colour-shape binding, relation; and which shapes were drawn
where others were asked. It tells a model that cannot separate objects from
one that cannot draw their outlines.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence

import numpy as np

from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes
from rflow_jax.eval import shapes_detector
from rflow_jax.eval.shapes_detector import Detection

SLIVER_MAX = 2  # Pixels; a core this thin (bbox side) is a stripe, not a shape.


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What a sentence prompt asks for.

  Attributes:
    kind: one of `shapes_scenes.KINDS`.
    objects: expected (colour, shape) per object; N copies for counting; for
      position (subject, reference).
    relation: for position, one of `shapes_scenes.RELATIONS`; else None.
  """

  kind: str
  objects: tuple[tuple[str, str], ...]
  relation: str | None = None


# ---------------------------------------------------------------------------
# Prompts.

_COLOR = "(" + "|".join(shapes_scenes.PALETTE) + ")"
_SHAPE = "(" + "|".join(shapes_scenes.SHAPES) + ")"
_WORD_COUNTS = {word: n for n, word in shapes.COUNT_WORDS.items()}
_SINGLE_RE = re.compile(rf"a {_COLOR} {_SHAPE}")
_POSITION_RE = re.compile(rf"a {_COLOR} {_SHAPE} ({'|'.join(shapes_scenes.RELATIONS)}) a {_COLOR} {_SHAPE}")
_COUNTING_RE = re.compile(rf"({'|'.join(_WORD_COUNTS)}) {_COLOR} {_SHAPE}s")


def parse_prompt(prompt: str) -> PromptSpec:
  """Parses a sentence-style `shapes` prompt.

  Args:
    prompt: e.g. "a red circle", "a red circle above a blue square" or
      "three red circles" (whitespace and case are normalised).

  Returns:
    The `PromptSpec`.

  Raises:
    ValueError: if the prompt is not of the sentence grammar.
  """
  text = " ".join(str(prompt).lower().split())
  if m := _SINGLE_RE.fullmatch(text):
    return PromptSpec("single", ((m[1], m[2]),))
  if m := _POSITION_RE.fullmatch(text):
    return PromptSpec("position", ((m[1], m[2]), (m[4], m[5])), m[3])
  if m := _COUNTING_RE.fullmatch(text):
    return PromptSpec("counting", ((m[2], m[3]),) * _WORD_COUNTS[m[1]])
  raise ValueError(
      f"prompt {prompt!r} is not a shapes sentence prompt; expected e.g. "
      f"'a red circle', 'a red circle to the left of a blue square' or "
      f"'two red circles' (colours {list(shapes_scenes.PALETTE)}, shapes "
      f"{list(shapes_scenes.SHAPES)}, relations {list(shapes_scenes.RELATIONS)})"
  )


# ---------------------------------------------------------------------------
# Scoring.


def _matches(det: Detection, spec: tuple[str, str]) -> bool:
  return (det.color, det.shape) == spec


def _check_single(dets: list[Detection], spec: PromptSpec) -> bool:
  return len(dets) == 1 and _matches(dets[0], spec.objects[0])


def _position_pairs(dets: list[Detection], spec: PromptSpec):
  """(subject, reference) detections matching the two specs, in either order.

  Both orders are tried: the generator may draw the objects in any order.
  """
  subject_spec, reference_spec = spec.objects
  return [
      (subject, reference)
      for subject, reference in itertools.permutations(dets)
      if _matches(subject, subject_spec) and _matches(reference, reference_spec)
  ]


def _check_position(dets: list[Detection], spec: PromptSpec) -> bool:
  return len(dets) == 2 and any(
      shapes_scenes.relation_holds((subject.cx, subject.cy), (reference.cx, reference.cy), spec.relation)
      for subject, reference in _position_pairs(dets, spec)
  )


def _check_counting(dets: list[Detection], spec: PromptSpec) -> bool:
  return len(dets) == len(spec.objects) and all(_matches(d, spec.objects[0]) for d in dets)


_CHECKS = {
    "single": _check_single,
    "position": _check_position,
    "counting": _check_counting,
}


def score(image: np.ndarray, prompt: str) -> dict[str, object]:
  """Scores one image against one sentence prompt.

  Args:
    image: (S, S, 3) uint8 image.
    prompt: sentence-style shapes prompt.

  Returns:
    {"kind": prompt kind, "correct": bool}.
  """
  d = diagnose(image, prompt)
  return {"kind": d["kind"], "correct": d["correct"]}


def _check_pairs(images: Sequence[np.ndarray], prompts: Sequence[str]) -> None:
  if len(images) != len(prompts):
    raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one each")


# Failure reasons of `diagnose`, in the order they are checked: the first that
# applies is reported, so each failed image has exactly one.
FAILURES = (
    "too few objects",  # Fewer objects detected than asked for (often merged).
    "stray stripe",  # More, but every extra is a sliver (see _is_sliver).
    "too many objects",  # More: whole extra objects, or one split in two.
    "colour",  # The detected colours are not the asked ones (as multisets).
    "shape",  # Colours right, shapes not ("unknown" = ragged or malformed).
    "binding",  # Right colours and shapes, wrongly paired (position only).
    "relation",  # Both objects right, the spatial relation does not hold.
)


def _is_sliver(det: Detection) -> bool:
  # Drawn objects are >= S/4 (8 px) across. A 1-2 px line beside an object is
  # a generation artefact (seen along square edges), which the score counts as
  # an extra object; the diagnosis names it apart from whole extra objects.
  y0, x0, y1, x1 = det.bbox
  return min(y1 - y0, x1 - x0) <= SLIVER_MAX


def diagnose(image: np.ndarray, prompt: str) -> dict[str, object]:
  """Why an image fails its prompt: `score` plus the first failed requirement.

  Args:
    image: (S, S, 3) uint8 image.
    prompt: sentence-style shapes prompt.

  Returns:
    {"kind", "correct", "reason"} with reason "ok" or one of `FAILURES`, and
    "shapes": (asked, detected) shape pairs when colours and count are right
    and the asked shape is unambiguous (single and counting prompts).
  """
  spec = parse_prompt(prompt)
  dets = shapes_detector.analyze(image)
  correct = bool(_CHECKS[spec.kind](dets, spec))
  out: dict[str, object] = {"kind": spec.kind, "correct": correct, "reason": "ok", "shapes": []}
  if correct:
    return out
  if len(dets) < len(spec.objects):
    out["reason"] = "too few objects"
  elif len(dets) > len(spec.objects):
    whole = sum(not _is_sliver(d) for d in dets)
    out["reason"] = "stray stripe" if whole == len(spec.objects) else "too many objects"
  elif sorted(d.color for d in dets) != sorted(c for c, _ in spec.objects):
    out["reason"] = "colour"
  elif sorted(d.shape for d in dets) != sorted(s for _, s in spec.objects):
    out["reason"] = "shape"
  elif spec.kind == "position" and not _position_pairs(dets, spec):
    out["reason"] = "binding"
  else:
    out["reason"] = "relation"
  if out["reason"] in ("shape", "binding") and len({s for _, s in spec.objects}) == 1:
    out["shapes"] = [(spec.objects[0][1], d.shape) for d in dets]
  return out


def failure_breakdown(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, object]:
  """Counts of `diagnose` reasons per scene kind, and the shape confusions.

  Returns:
    {"reasons": {kind: {reason: count}}, "shape_confusion": {"asked->got":
    count}} over the images whose colours and count were right but whose
    shapes were not: where a model that places and colours objects correctly
    still loses its score.
  """
  _check_pairs(images, prompts)
  reasons: dict[str, dict[str, int]] = {}
  confusion: dict[str, int] = {}
  for image, prompt in zip(images, prompts):
    d = diagnose(image, prompt)
    per_kind = reasons.setdefault(d["kind"], {})
    per_kind[d["reason"]] = per_kind.get(d["reason"], 0) + 1
    for asked, got in d["shapes"]:
      key = f"{asked}->{got}"
      confusion[key] = confusion.get(key, 0) + 1
  return {"reasons": reasons, "shape_confusion": dict(sorted(confusion.items()))}


def evaluate(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
  """Scores images against their prompts; GenEval-style accuracies.

  Args:
    images: (S, S, 3) uint8 images.
    prompts: one sentence prompt per image.

  Returns:
    Accuracy per kind present among the prompts (keys from `shapes_scenes.KINDS`),
    "overall" (mean over all images) and "n" (number of images).
  """
  _check_pairs(images, prompts)
  if not prompts:
    raise ValueError("evaluate needs at least one image; got none")
  results = [score(img, p) for img, p in zip(images, prompts)]
  metrics: dict[str, float] = {}
  for kind in shapes_scenes.KINDS:
    hits = [r["correct"] for r in results if r["kind"] == kind]
    if hits:
      metrics[kind] = float(np.mean(hits))
  metrics["overall"] = float(np.mean([r["correct"] for r in results]))
  metrics["n"] = len(results)
  return metrics
