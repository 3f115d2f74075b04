"""Tests for the procedural `shapes` dataset: determinism and every scene rule."""

import collections
import hashlib
import pathlib
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes

_N_SCENES = 500
_REPO = pathlib.Path(__file__).resolve().parents[1]
_COLOR = "(" + "|".join(shapes_scenes.PALETTE) + ")"
_SHAPE = "(" + "|".join(shapes_scenes.SHAPES) + ")"
_SENTENCE_RE = {
    "single": re.compile(rf"a {_COLOR} {_SHAPE}"),
    "position": re.compile(rf"a {_COLOR} {_SHAPE} ({'|'.join(shapes_scenes.RELATIONS)}) " rf"a {_COLOR} {_SHAPE}"),
    "counting": re.compile(rf"(two|three) {_COLOR} {_SHAPE}s"),
}
_TAG_RE = {
    "single": re.compile(rf"{_COLOR} {_SHAPE}"),
    "position": re.compile(rf"{_COLOR} {_SHAPE}, (left of|right of|above|below), " rf"{_COLOR} {_SHAPE}"),
    "counting": re.compile(rf"(two|three), {_COLOR} {_SHAPE}s"),
}


def _object_mask(obj, size):
  """Boolean mask of one object, drawn alone."""
  return shapes.render(shapes_scenes.Scene("single", (obj,)), size).any(axis=-1)


def _scenes(size=32, seed=0, n=_N_SCENES):
  return [shapes_scenes.make_scene(seed, i, size) for i in range(n)]


def _records_digest(seed, n):
  src = shapes.ShapesSource(seed=seed)
  h = hashlib.sha256()
  for i in range(n):
    rec = src[i]
    h.update(rec["image"].tobytes())
    h.update(rec["caption"].encode())
  return h.hexdigest()


def test_same_key_gives_identical_record_bytes():
  a = shapes.ShapesSource(seed=3)
  b = shapes.ShapesSource(seed=3)
  for i in (0, 1, 17, 999_999):
    ra, rb = a[i], b[i]
    assert ra["image"].tobytes() == rb["image"].tobytes()
    assert ra["caption"] == rb["caption"]
    assert ra["kind"] == rb["kind"] and ra["index"] == rb["index"] == i


def test_different_index_or_seed_gives_different_images():
  src = shapes.ShapesSource(seed=0)
  images = {src[i]["image"].tobytes() for i in range(50)}
  assert len(images) == 50
  other = shapes.ShapesSource(seed=1)
  assert all(src[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(10))


def test_records_identical_in_a_fresh_process():
  # A fresh interpreter with another hash seed must produce the same bytes,
  # i.e. nothing depends on process state (global RNG, set/dict hash order).
  code = "import sys; sys.path.insert(0, 'tests'); " "import data_shapes_test as t; print(t._records_digest(5, 20))"
  out = subprocess.run(
      [sys.executable, "-c", code],
      check=True,
      capture_output=True,
      text=True,
      cwd=_REPO,
      env={"PYTHONHASHSEED": "123", "PYTHONPATH": str(_REPO)},
  )
  assert out.stdout.strip() == _records_digest(5, 20)


def test_source_pickles_and_reports_length():
  src = shapes.ShapesSource(seed=2, num_records=10, caption_style="tag")
  clone = pickle.loads(pickle.dumps(src))
  assert len(clone) == 10
  assert clone[4]["caption"] == src[4]["caption"]
  assert clone[4]["image"].tobytes() == src[4]["image"].tobytes()
  with pytest.raises(IndexError):
    src[10]


def test_record_format():
  rec = shapes.ShapesSource()[7]
  assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
  assert isinstance(rec["caption"], str)
  assert rec["kind"].dtype == np.int32 and 0 <= rec["kind"] < 3
  assert rec["index"].dtype == np.int64 and rec["index"] == 7


@pytest.mark.parametrize("size", [32, 64])
def test_every_scene_rule_holds(size):
  n = _N_SCENES if size == 32 else 100
  lo, hi = size // 4, 3 * size // 8
  palette = {tuple(c) for c in shapes_scenes.PALETTE.values()}
  for scene in _scenes(size, seed=1, n=n):
    image = shapes.render(scene, size)
    # Exact palette colours on a black background, nothing else.
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    assert colors <= palette | {(0, 0, 0)}
    masks = []
    for obj in scene.objects:
      assert lo <= obj.size <= hi
      mask = _object_mask(obj, size)
      ys, xs = np.nonzero(mask)
      # Fully inside, bbox of side L, centroid of the drawn pixels.
      assert ys.max() - ys.min() + 1 == obj.size
      assert xs.max() - xs.min() + 1 == obj.size
      np.testing.assert_allclose([xs.mean(), ys.mean()], [obj.cx, obj.cy])
      assert np.all(image[mask] == shapes_scenes.PALETTE[obj.color])
      masks.append(mask)
    # >= 2 background pixels between objects, diagonals included.
    for i, a in enumerate(masks):
      grown = ndimage.binary_dilation(a, structure=np.ones((5, 5), bool))
      for b in masks[i + 1 :]:
        assert not np.any(grown & b), scene
    assert np.array_equal(image.any(-1), np.logical_or.reduce(masks))
    _check_kind_rules(scene, size)


def _check_kind_rules(scene, size):
  objs = scene.objects
  if scene.kind == "single":
    assert len(objs) == 1 and scene.relation is None
  elif scene.kind == "counting":
    assert len(objs) in (2, 3) and scene.relation is None
    assert len({(o.color, o.shape) for o in objs}) == 1
  else:
    a, b = objs
    assert (a.color, a.shape) != (b.color, b.shape)
    dx, dy = a.cx - b.cx, a.cy - b.cy  # subject - reference; y grows down.
    along, across = {
        "to the left of": (-dx, dy),
        "to the right of": (dx, dy),
        "above": (-dy, dx),
        "below": (dy, dx),
    }[scene.relation]
    assert along >= size / 4 and along > abs(across), scene


def test_kinds_relations_and_styles_are_balanced():
  scenes = _scenes(seed=2)
  kinds = collections.Counter(s.kind for s in scenes)
  assert set(kinds) == set(shapes_scenes.KINDS)
  assert all(0.27 < kinds[k] / len(scenes) < 0.40 for k in shapes_scenes.KINDS)
  relations = collections.Counter(s.relation for s in scenes if s.kind == "position")
  assert set(relations) == set(shapes_scenes.RELATIONS)
  counts = collections.Counter(len(s.objects) for s in scenes if s.kind == "counting")
  assert set(counts) == {2, 3}
  styles = collections.Counter(shapes.mixed_caption_style(2, i) for i in range(len(scenes)))
  assert 0.43 < styles["sentence"] / len(scenes) < 0.57


def test_mixed_source_uses_both_grammars():
  src = shapes.ShapesSource(seed=4)
  n_tag = 0
  for i in range(200):
    rec = src[i]
    kind = shapes_scenes.KINDS[rec["kind"]]
    is_sentence = _SENTENCE_RE[kind].fullmatch(rec["caption"])
    is_tag = _TAG_RE[kind].fullmatch(rec["caption"])
    assert bool(is_sentence) != bool(is_tag), rec["caption"]
    n_tag += bool(is_tag)
  assert 70 < n_tag < 130


def test_captions_describe_the_scene():
  for scene in _scenes(seed=3, n=60):
    sentence = shapes.caption(scene, "sentence")
    tag = shapes.caption(scene, "tag")
    m = _SENTENCE_RE[scene.kind].fullmatch(sentence)
    assert m, sentence
    assert _TAG_RE[scene.kind].fullmatch(tag), tag
    first = scene.objects[0]
    if scene.kind == "single":
      assert m.groups() == (first.color, first.shape)
    elif scene.kind == "position":
      second = scene.objects[1]
      assert m.groups() == (first.color, first.shape, scene.relation, second.color, second.shape)
    else:
      word = shapes.COUNT_WORDS[len(scene.objects)]
      assert m.groups() == (word, first.color, first.shape)


def test_caption_examples():
  red = shapes_scenes.Obj("red", "circle", 8, 5.5, 5.5)
  blue = shapes_scenes.Obj("blue", "square", 8, 20.5, 5.5)
  position = shapes_scenes.Scene("position", (red, blue), "to the left of")
  assert shapes.caption(position, "sentence") == ("a red circle to the left of a blue square")
  assert shapes.caption(position, "tag") == "red circle, left of, blue square"
  counting = shapes_scenes.Scene("counting", (red, red, red))
  assert shapes.caption(counting, "sentence") == "three red circles"
  assert shapes.caption(counting, "tag") == "three, red circles"
  with pytest.raises(ValueError, match="'poem'"):
    shapes.caption(position, "poem")


def test_forced_kind():
  for i in range(20):
    assert shapes_scenes.make_scene(0, i, kind="counting").kind == "counting"
  with pytest.raises(ValueError, match="'pairs'"):
    shapes_scenes.make_scene(0, 0, kind="pairs")


@pytest.mark.parametrize("size", [16, 40, 33, 0, -32, 31])
def test_bad_size_rejected(size):
  with pytest.raises(ValueError, match=re.escape(repr(size))):
    shapes.ShapesSource(size=size)
  with pytest.raises(ValueError, match=re.escape(repr(size))):
    shapes_scenes.make_scene(0, 0, size)


def test_bad_source_arguments_rejected():
  with pytest.raises(ValueError, match="'fancy'"):
    shapes.ShapesSource(caption_style="fancy")
  with pytest.raises(ValueError, match="-1"):
    shapes_scenes.make_scene(-1, 0)


def test_eval_prompts_are_deterministic_sentences_per_kind():
  prompts = shapes.eval_prompts(20, seed=0)
  assert prompts == shapes.eval_prompts(20, seed=0)
  assert prompts != shapes.eval_prompts(20, seed=1)
  assert len(prompts) == 60
  for k, kind in enumerate(shapes_scenes.KINDS):
    for p in prompts[20 * k : 20 * (k + 1)]:
      assert _SENTENCE_RE[kind].fullmatch(p), p
  # A stream of its own: not the training records' captions.
  train = [shapes.caption(shapes_scenes.make_scene(0, j, kind="position"), "sentence") for j in range(20)]
  assert prompts[20:40] != train


def test_generation_rate():
  # Budget is >= 2,000 records/s on an idle core; assert a loose floor so a
  # busy shared test machine does not flake, and catch order-of-magnitude
  # regressions (e.g. per-pixel Python loops).
  src = shapes.ShapesSource(seed=9)
  start = time.perf_counter()
  for i in range(300):
    src[i]
  rate = 300 / (time.perf_counter() - start)
  assert rate > 400, rate
