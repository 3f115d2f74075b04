"""Scenes of the procedural `shapes` dataset: what is drawn where, before any pixel or word.

A scene is its kind, its objects (`Obj`: colour, shape, size, centroid) and, for `position`, the relation. Scene `i`
of a dataset with seed `s` is a pure function of `(s, i)` (it draws from `np.random.default_rng([s, i])`, never from
global state), so it is the same on every machine, process and run. This module owns the geometry the dataset
guarantees and the scorer (`rflow_jax.eval.shapes_eval`) relies on; rendering, captions and the grain source
(`rflow_jax.data.shapes`) only read scenes, so they live apart from the sampling and placement rules.

Scene rules:
  * canvas S x S RGB uint8 with S >= 32 and S % 16 == 0 (32 default, 64 also
    used), black background (0, 0, 0);
  * colours are exact `PALETTE` entries: shapes are drawn hard-edged, without
    antialiasing;
  * shapes: circle (disk of diameter L), square (L x L), upright isosceles
    triangle (base = height = L, apex up); L is a uniform integer in
    [S / 4, 3 S / 8];
  * objects lie fully inside the canvas and never touch: at least `MIN_GAP` = 2
    background pixels separate any two objects' pixels, also diagonally
    (checked on the rendered masks with a 5 x 5 dilation);
  * three scene kinds, equally likely: `single` (one object), `position` (two
    objects that differ in colour or shape, in one of `RELATIONS`) and
    `counting` (two or three objects of one colour and shape, sizes may
    differ);
  * in a `position` scene the centroids are at least S / 4 apart along the
    relation's axis and further apart along that axis than along the other
    one (see `relation_holds`). Image y grows downward: "above" = smaller y.

`Obj.cx` / `Obj.cy` are the centroid of the object's *drawn pixels* in
pixel-index coordinates (x = column, y = row, pixel (0, 0) at the top left),
which is what an image analyser measures; `shapes.render` places each shape so
that its pixel centroid lands on (cx, cy) (`template` gives the offsets).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("single", "position", "counting")

# Relation -> (axis, sign): `sign * (subject - reference)[axis]` must be
# positive. Axis 0 is x (columns), axis 1 is y (rows, growing downward).
RELATION_GEOMETRY = {
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}
MIN_GAP = 2  # Background pixels between any two objects, diagonals included.

# Every (colour, shape) pair; a `position` scene draws two distinct ones.
_SPECS = tuple((c, s) for c in PALETTE for s in SHAPES)
# Extra seed-sequence word that separates the evaluation scenes from the
# training scene stream `[seed, index]` (shapes.py has the caption style's).
_EVAL_STREAM = 0xE7A1
_POSITION_TRIES = 64  # Candidate positions drawn per object per attempt.
_SCENE_TRIES = 1000  # Whole-scene attempts before giving up (never reached).


@dataclasses.dataclass(frozen=True)
class Obj:
  """One drawn object.

  Attributes:
    color: a `PALETTE` key.
    shape: one of `SHAPES`.
    size: side length L of the shape's bounding box in pixels.
    cx: x (column) of the centroid of the drawn pixels.
    cy: y (row, growing downward) of the centroid of the drawn pixels.
  """

  color: str
  shape: str
  size: int
  cx: float
  cy: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: its kind, its objects and, for `position`, the relation.

  For `position`, `objects[0]` is the subject and `objects[1]` the reference:
  "objects[0] <relation> objects[1]".
  """

  kind: str
  objects: tuple[Obj, ...]
  relation: str | None = None


def check_size(size: int) -> int:
  """Returns `size` if it is a supported canvas size, else raises ValueError."""
  if not isinstance(size, (int, np.integer)) or size < 32 or size % 16:
    raise ValueError(f"shapes canvas size must be an integer >= 32 and a multiple of 16; " f"got {size!r}")
  return int(size)


def size_range(size: int) -> tuple[int, int]:
  """Inclusive range [S/4, 3S/8] of object sizes L on an S x S canvas."""
  return size // 4, 3 * size // 8


def relation_holds(
    subject: tuple[float, float], reference: tuple[float, float], relation: str, min_separation: float = 0.0
) -> bool:
  """Whether `subject <relation> reference` holds for two (x, y) centroids.

  The difference along the relation's axis must have the right sign, be at
  least `min_separation` and exceed the absolute difference along the other
  axis (so e.g. "left of" is not satisfied by an object mostly above).

  Args:
    subject: (x, y) centroid of the subject.
    reference: (x, y) centroid of the reference object.
    relation: one of `RELATIONS`.
    min_separation: minimum distance along the relation's axis.

  Returns:
    True if the relation holds.
  """
  if relation not in RELATION_GEOMETRY:
    raise ValueError(f"unknown relation {relation!r}; valid: {RELATIONS}")
  return bool(_relation_allows(subject, relation, min_separation, reference[0], reference[1]))


def _relation_allows(subject, relation, min_separation, ref_x, ref_y):
  """Vectorised `relation_holds` over arrays of reference centroids."""
  axis, sign = RELATION_GEOMETRY[relation]
  ref = (ref_x, ref_y)
  along = sign * (subject[axis] - ref[axis])
  across = np.abs(subject[1 - axis] - ref[1 - axis])
  return (along >= min_separation) & (along > across)


# ---------------------------------------------------------------------------
# Shape templates.


def _circle(yy, xx, length):
  r = length / 2
  return (xx + 0.5 - r) ** 2 + (yy + 0.5 - r) ** 2 <= r * r


def _square(yy, xx, length):
  return np.broadcast_to((yy >= 0) & (xx >= 0), (length, length))


def _triangle(yy, xx, length):
  # Row r (0 = top) spans half-width (r + 1) / 2 around the centre, so the
  # apex row has 1-2 pixels and the bottom row (the base) is L pixels wide.
  return np.abs(xx + 0.5 - length / 2) <= (yy + 1) / 2


_TEMPLATE_FNS = {"circle": _circle, "square": _square, "triangle": _triangle}


@functools.lru_cache(maxsize=None)
def template(shape: str, length: int) -> tuple[np.ndarray, float, float]:
  """(mask (L, L) bool, centroid x offset, centroid y offset) of a shape with side L; cached, read-only."""
  yy, xx = np.ogrid[:length, :length]
  mask = np.array(_TEMPLATE_FNS[shape](yy, xx, length), dtype=bool)
  mask.flags.writeable = False
  ys, xs = np.nonzero(mask)
  return mask, float(xs.mean()), float(ys.mean())


@functools.lru_cache(maxsize=None)
def _halo(shape: str, length: int) -> np.ndarray:
  """The template dilated by MIN_GAP pixels (Chebyshev), (L+2g, L+2g) bool."""
  mask, _, _ = template(shape, length)
  g = MIN_GAP
  halo = np.zeros((length + 2 * g, length + 2 * g), dtype=bool)
  for dy in range(2 * g + 1):
    for dx in range(2 * g + 1):
      halo[dy : dy + length, dx : dx + length] |= mask
  halo.flags.writeable = False
  return halo


# ---------------------------------------------------------------------------
# Scene sampling.


def _draw_spec(rng: np.random.Generator) -> tuple[str, str]:
  return _SPECS[rng.integers(len(_SPECS))]


def _draw_length(rng: np.random.Generator, size: int) -> int:
  lo, hi = size_range(size)
  return int(rng.integers(lo, hi + 1))


def _place_one(rng, occupied, spec, size, allowed=None) -> Obj | None:
  """Places one (colour, shape, L) object keeping MIN_GAP, or returns None.

  Args:
    rng: the record's generator.
    occupied: (S+2g, S+2g) union of the placed objects' halos, offset by g so
      that halos of objects at the canvas border fit; updated in place.
    spec: (colour, shape, L).
    size: canvas side S.
    allowed: optional vectorised filter `(cx, cy) -> bool array` on candidate
      centroids (used to impose a relation without whole-scene rejection).

  Returns:
    The placed object, or None if no candidate position fit.
  """
  color, shape, length = spec
  mask, ox, oy = template(shape, length)
  g = MIN_GAP
  x0s, y0s = rng.integers(0, size - length + 1, size=(2, _POSITION_TRIES))
  if allowed is not None:
    keep = allowed(x0s + ox, y0s + oy)
    x0s, y0s = x0s[keep], y0s[keep]
  for x0, y0 in zip(x0s.tolist(), y0s.tolist()):
    window = occupied[y0 + g : y0 + g + length, x0 + g : x0 + g + length]
    if not (window & mask).any():
      halo = _halo(shape, length)
      occupied[y0 : y0 + length + 2 * g, x0 : x0 + length + 2 * g] |= halo
      return Obj(color=color, shape=shape, size=length, cx=x0 + ox, cy=y0 + oy)
  return None


def _place(rng, size, specs, relation=None) -> tuple[Obj, ...]:
  """Places (colour, shape, L) specs in order, without contact.

  Args:
    rng: the record's generator.
    size: canvas side S.
    specs: list of (colour, shape, L).
    relation: if given (two specs), `specs[0] <relation> specs[1]` must hold
      with centroids at least S / 4 apart along the relation's axis.

  Returns:
    The placed objects, in `specs` order.
  """
  g = MIN_GAP
  for _ in range(_SCENE_TRIES):
    occupied = np.zeros((size + 2 * g, size + 2 * g), dtype=bool)
    objs = []
    for spec in specs:
      allowed = None
      if relation is not None and objs:
        allowed = functools.partial(_relation_allows, (objs[0].cx, objs[0].cy), relation, size / 4)
      obj = _place_one(rng, occupied, spec, size, allowed)
      if obj is None:
        break
      objs.append(obj)
    else:
      return tuple(objs)
  raise RuntimeError(f"could not place {specs!r} on a {size}x{size} canvas")


def _single_scene(rng, size) -> Scene:
  color, shape = _draw_spec(rng)
  objs = _place(rng, size, [(color, shape, _draw_length(rng, size))])
  return Scene(kind="single", objects=objs)


def _position_scene(rng, size) -> Scene:
  relation = RELATIONS[rng.integers(len(RELATIONS))]
  # Two distinct (colour, shape) specs so the caption names each object once.
  i = int(rng.integers(len(_SPECS)))
  j = int(rng.integers(len(_SPECS) - 1))
  j += j >= i
  specs = [(*_SPECS[i], _draw_length(rng, size)), (*_SPECS[j], _draw_length(rng, size))]
  objs = _place(rng, size, specs, relation)
  return Scene(kind="position", objects=objs, relation=relation)


def _counting_scene(rng, size) -> Scene:
  count = int(rng.integers(2, 4))
  color, shape = _draw_spec(rng)
  specs = [(color, shape, _draw_length(rng, size)) for _ in range(count)]
  return Scene(kind="counting", objects=_place(rng, size, specs))


_SCENE_BUILDERS = {
    "single": _single_scene,
    "position": _position_scene,
    "counting": _counting_scene,
}


def check_key(seed: int, index: int) -> None:
  """Raises ValueError unless the record key (seed, index) is non-negative."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative; got seed={seed!r}, " f"index={index!r}")


def make_scene(seed: int, index: int, size: int = 32, kind: str | None = None) -> Scene:
  """Samples scene `index` of the dataset with `seed`.

  Args:
    seed: non-negative dataset seed.
    index: non-negative record index.
    size: canvas side S (>= 32, multiple of 16).
    kind: force one of `KINDS`; None draws it uniformly from the record's rng.

  Returns:
    The deterministic `Scene` for (seed, index, size, kind).
  """
  check_size(size)
  check_key(seed, index)
  if kind is not None and kind not in _SCENE_BUILDERS:
    raise ValueError(f"unknown scene kind {kind!r}; valid: {KINDS}")
  rng = np.random.default_rng([seed, index])
  # Always consume the kind draw so a forced kind sees the same later draws.
  drawn = KINDS[rng.integers(len(KINDS))]
  return _SCENE_BUILDERS[kind or drawn](rng, size)


def eval_scenes(n_per_kind: int, seed: int, size: int = 32) -> list[Scene]:
  """Fresh scenes, `n_per_kind` of each kind in `KINDS` order.

  They come from a seed stream disjoint from the training records'
  (`[seed, j, kind, _EVAL_STREAM]` vs `[seed, index]`).

  Args:
    n_per_kind: number of scenes per kind.
    seed: non-negative seed.
    size: canvas side S.

  Returns:
    A list of 3 * n_per_kind scenes.
  """
  check_size(size)
  check_key(seed, 0)
  if n_per_kind < 0:
    raise ValueError(f"n_per_kind must be non-negative; got {n_per_kind!r}")
  scenes = []
  for k, kind in enumerate(KINDS):
    for j in range(n_per_kind):
      rng = np.random.default_rng([seed, j, k, _EVAL_STREAM])
      scenes.append(_SCENE_BUILDERS[kind](rng, size))
  return scenes
