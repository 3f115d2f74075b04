"""The built-in procedural `shapes` text-to-image dataset: rendering, captions and the grain source.

Every record is a small RGB image of coloured shapes on a black canvas plus a
caption that describes it exactly. Record `i` of a dataset with seed `s` is a
pure function of `(s, i)`, so it is bitwise identical on every machine, process
and run, and any record can be generated on its own (random access for grain).
The scenes themselves, their rules and the constants that name colours, shapes,
relations and kinds are in `rflow_jax.data.shapes_scenes`.

Caption grammars (`caption(scene, style)`):

  kind       sentence                            tag
  single     "a red circle"                      "red circle"
  position   "a red circle to the left of a      "red circle, left of, blue square"
              blue square"
  counting   "three red circles"                 "three, red circles"

The tag style is the sentence with articles dropped, the relation shortened to
one of "left of" / "right of" / "above" / "below", and its parts joined by ", ".
Training mixes the two styles 50/50 (chosen per record from a seed stream of
its own); sampling-time prompts (`eval_prompts`) are always sentences.
"""

from __future__ import annotations

import operator

import numpy as np

from rflow_jax.data import shapes_scenes

CAPTION_STYLES = ("sentence", "tag")
COUNT_WORDS = {2: "two", 3: "three"}

# Short relation names used by the tag caption style.
RELATION_TAGS = {
    "to the left of": "left of",
    "to the right of": "right of",
    "above": "above",
    "below": "below",
}
# Extra seed-sequence word that separates the caption-style stream from the
# training scene stream `[seed, index]` (shapes_scenes.py has the evaluation's).
_STYLE_STREAM = 0x5717E


# ---------------------------------------------------------------------------
# Rendering.


def _top_left(obj: shapes_scenes.Obj, size: int) -> tuple[int, int]:
  """(x0, y0) of the bounding box that puts the pixel centroid at (cx, cy)."""
  _, ox, oy = shapes_scenes.template(obj.shape, obj.size)
  x0, y0 = int(round(obj.cx - ox)), int(round(obj.cy - oy))
  if not (0 <= x0 <= size - obj.size and 0 <= y0 <= size - obj.size):
    raise ValueError(f"object {obj!r} does not fit on a {size}x{size} canvas")
  return x0, y0


def render(scene: shapes_scenes.Scene, size: int) -> np.ndarray:
  """Draws `scene` hard-edged on a black canvas.

  Args:
    scene: the scene to draw.
    size: canvas side S.

  Returns:
    (S, S, 3) uint8 image.
  """
  shapes_scenes.check_size(size)
  image = np.zeros((size, size, 3), dtype=np.uint8)
  for obj in scene.objects:
    if obj.color not in shapes_scenes.PALETTE:
      raise ValueError(f"unknown colour {obj.color!r}; valid: {list(shapes_scenes.PALETTE)}")
    if obj.shape not in shapes_scenes.SHAPES:
      raise ValueError(f"unknown shape {obj.shape!r}; valid: {shapes_scenes.SHAPES}")
    x0, y0 = _top_left(obj, size)
    mask, _, _ = shapes_scenes.template(obj.shape, obj.size)
    image[y0 : y0 + obj.size, x0 : x0 + obj.size][mask] = shapes_scenes.PALETTE[obj.color]
  return image


# ---------------------------------------------------------------------------
# Captions.


def _sentence(scene: shapes_scenes.Scene) -> str:
  first = scene.objects[0]
  if scene.kind == "single":
    return f"a {first.color} {first.shape}"
  if scene.kind == "position":
    second = scene.objects[1]
    return f"a {first.color} {first.shape} {scene.relation} " f"a {second.color} {second.shape}"
  return f"{COUNT_WORDS[len(scene.objects)]} {first.color} {first.shape}s"


def _tag(scene: shapes_scenes.Scene) -> str:
  first = scene.objects[0]
  if scene.kind == "single":
    return f"{first.color} {first.shape}"
  if scene.kind == "position":
    second = scene.objects[1]
    return f"{first.color} {first.shape}, {RELATION_TAGS[scene.relation]}, " f"{second.color} {second.shape}"
  return f"{COUNT_WORDS[len(scene.objects)]}, {first.color} {first.shape}s"


_CAPTIONERS = {"sentence": _sentence, "tag": _tag}


def caption(scene: shapes_scenes.Scene, style: str) -> str:
  """Describes `scene` in caption `style` ("sentence" or "tag").

  Args:
    scene: the scene to describe.
    style: one of `CAPTION_STYLES`; see the module docstring for the grammar.

  Returns:
    The caption.
  """
  if style not in _CAPTIONERS:
    raise ValueError(f"unknown caption style {style!r}; valid: {CAPTION_STYLES}")
  if scene.kind not in shapes_scenes.KINDS:
    raise ValueError(f"unknown scene kind {scene.kind!r}; valid: {shapes_scenes.KINDS}")
  return _CAPTIONERS[style](scene)


def mixed_caption_style(seed: int, index: int) -> str:
  """The 50/50 caption style of training record `index` (its own rng stream)."""
  shapes_scenes.check_key(seed, index)
  rng = np.random.default_rng([seed, index, _STYLE_STREAM])
  return CAPTION_STYLES[rng.integers(len(CAPTION_STYLES))]


# ---------------------------------------------------------------------------
# Grain source and evaluation prompts.


class ShapesSource:
  """Random-access grain data source of `shapes` records.

  Implements grain's `RandomAccessDataSource` protocol (`__len__`,
  `__getitem__`) and holds only plain attributes, so it pickles into grain
  worker processes.

  Each record is a dict with
    image: (S, S, 3) uint8;
    caption: str;
    kind: np.int32 index into `shapes_scenes.KINDS`;
    index: np.int64 record index (useful to check sharding and for logging).
  """

  def __init__(self, *, size: int = 32, seed: int = 0, num_records: int = 1_000_000, caption_style: str = "mixed"):
    """Initialises the source.

    Args:
      size: canvas side S (>= 32, multiple of 16).
      seed: non-negative dataset seed.
      num_records: number of records (indices 0 .. num_records - 1).
      caption_style: "mixed" (per-record 50/50), "sentence" or "tag".
    """
    self._size = shapes_scenes.check_size(size)
    shapes_scenes.check_key(seed, 0)
    if num_records <= 0:
      raise ValueError(f"num_records must be positive; got {num_records!r}")
    valid_styles = ("mixed",) + CAPTION_STYLES
    if caption_style not in valid_styles:
      raise ValueError(f"unknown caption_style {caption_style!r}; valid: {valid_styles}")
    self._seed = int(seed)
    self._num_records = int(num_records)
    self._caption_style = caption_style

  @property
  def size(self) -> int:
    return self._size

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> dict[str, object]:
    index = operator.index(index)
    if not 0 <= index < self._num_records:
      raise IndexError(f"record index {index} out of range [0, {self._num_records})")
    scene = shapes_scenes.make_scene(self._seed, index, self._size)
    style = self._caption_style
    if style == "mixed":
      style = mixed_caption_style(self._seed, index)
    return {
        "image": render(scene, self._size),
        "caption": caption(scene, style),
        "kind": np.int32(shapes_scenes.KINDS.index(scene.kind)),
        "index": np.int64(index),
    }

  def __repr__(self) -> str:
    return (
        f"ShapesSource(size={self._size}, seed={self._seed}, "
        f"num_records={self._num_records}, "
        f"caption_style={self._caption_style!r})"
    )


def eval_prompts(n_per_kind: int, seed: int) -> list[str]:
  """Fresh sentence-style prompts, `n_per_kind` of each kind, deterministic.

  Args:
    n_per_kind: number of prompts per kind.
    seed: non-negative seed of the evaluation stream.

  Returns:
    A list of 3 * n_per_kind prompts in `shapes_scenes.KINDS` order.
  """
  return [caption(s, "sentence") for s in shapes_scenes.eval_scenes(n_per_kind, seed)]
