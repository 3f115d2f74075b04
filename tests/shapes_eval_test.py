"""Tests for ShapesEval: ground truth scores 1, wrong captions 0, robustness."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes
from rflow_jax.data import pixels
from rflow_jax.eval import shapes_detector
from rflow_jax.eval import shapes_eval

_N = 300
_OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@pytest.fixture(scope="module")
def ground_truth():
  scenes = [shapes_scenes.make_scene(11, i) for i in range(_N)]
  images = [shapes.render(s, 32) for s in scenes]
  return scenes, images


def _next_color(color):
  names = list(shapes_scenes.PALETTE)
  return names[(names.index(color) + 1) % len(names)]


def _next_shape(shape):
  return shapes_scenes.SHAPES[(shapes_scenes.SHAPES.index(shape) + 1) % len(shapes_scenes.SHAPES)]


def _wrong_captions(scene):
  """Captions that contradict `scene` in colour, shape, count or relation."""
  first = scene.objects[0]
  recolored = dataclasses.replace(first, color=_next_color(first.color))
  reshaped = dataclasses.replace(first, shape=_next_shape(first.shape))
  wrong = []
  for obj in (recolored, reshaped):
    objs = (obj,) + scene.objects[1:]
    if scene.kind == "counting":
      objs = (obj,) * len(scene.objects)
    wrong.append(dataclasses.replace(scene, objects=objs))
  if scene.kind == "position":
    wrong.append(dataclasses.replace(scene, relation=_OPPOSITE[scene.relation]))
  if scene.kind == "counting":
    count = 5 - len(scene.objects)  # 2 <-> 3.
    wrong.append(dataclasses.replace(scene, objects=(first,) * count))
  return [shapes.caption(s, "sentence") for s in wrong]


def _degrade(image, rng):
  """1-pixel-radius (3x3) box blur, then Gaussian noise of sigma 10."""
  x = ndimage.uniform_filter(image.astype(np.float32), size=(3, 3, 1), mode="constant")
  x += rng.normal(0.0, 10.0, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_ground_truth_scores_one(ground_truth):
  scenes, images = ground_truth
  prompts = [shapes.caption(s, "sentence") for s in scenes]
  metrics = shapes_eval.evaluate(images, prompts)
  assert metrics["n"] == _N
  for kind in shapes_scenes.KINDS:
    assert metrics[kind] >= 0.99, metrics
  assert metrics["overall"] >= 0.99, metrics


def test_ground_truth_at_64_scores_one():
  scenes = [shapes_scenes.make_scene(12, i, 64) for i in range(45)]
  metrics = shapes_eval.evaluate(
      [shapes.render(s, 64) for s in scenes], [shapes.caption(s, "sentence") for s in scenes]
  )
  assert metrics["overall"] == 1.0, metrics


def test_wrong_captions_score_zero(ground_truth):
  scenes, images = ground_truth
  pairs = [(img, p) for scene, img in zip(scenes, images) for p in _wrong_captions(scene)]
  metrics = shapes_eval.evaluate(*zip(*pairs))
  assert metrics["overall"] == 0.0, metrics
  assert set(metrics) == set(shapes_scenes.KINDS) | {"overall", "n"}


def test_other_scenes_captions_score_near_zero(ground_truth):
  scenes, images = ground_truth
  shifted = [shapes.caption(s, "sentence") for s in scenes[1:] + scenes[:1]]
  # Only coincidences (e.g. two single scenes with the same object) match.
  assert shapes_eval.evaluate(images, shifted)["overall"] < 0.05


def test_blur_and_noise_still_score_high(ground_truth):
  scenes, images = ground_truth
  rng = np.random.default_rng(0)
  metrics = shapes_eval.evaluate(
      [_degrade(img, rng) for img in images], [shapes.caption(s, "sentence") for s in scenes]
  )
  for kind in shapes_scenes.KINDS:
    assert metrics[kind] >= 0.95, metrics


def test_analyze_finds_objects_and_attributes():
  objs = (shapes_scenes.Obj("red", "square", 10, 6.5, 6.5), shapes_scenes.Obj("cyan", "circle", 12, 22.5, 8.5))
  image = shapes.render(shapes_scenes.Scene("counting", objs), 32)
  found = sorted(shapes_detector.analyze(image), key=lambda d: d.cx)
  assert [(d.color, d.shape) for d in found] == [("red", "square"), ("cyan", "circle")]
  for det, obj in zip(found, objs):
    np.testing.assert_allclose([det.cx, det.cy], [obj.cx, obj.cy], atol=1e-4)
  assert shapes_detector.analyze(np.zeros((32, 32, 3), np.uint8)) == []


def test_unlisted_colours_and_shapes_are_unknown():
  image = np.zeros((32, 32, 3), np.uint8)
  image[4:14, 4:14] = (200, 200, 200)  # Grey square: no palette hue.
  image[18:30, 14:17] = (220, 40, 40)  # Red bar: far too elongated.
  found = sorted(shapes_detector.analyze(image), key=lambda d: d.cy)
  assert [(d.color, d.shape) for d in found] == [("unknown", "square"), ("red", "unknown")]


def test_analyze_reads_a_float_image_after_conversion():
  scene = shapes_scenes.make_scene(3, 3)
  image = shapes.render(scene, 32)
  as_float = image.astype(np.float32) / 127.5 - 1.0
  with pytest.raises(ValueError, match="to_uint8"):
    shapes_detector.analyze(as_float)
  np.testing.assert_array_equal(pixels.to_uint8(as_float), image)


def test_position_needs_the_dominant_axis():
  red = shapes_scenes.Obj("red", "square", 8, 5.5, 5.5)
  left = shapes_scenes.Scene("position", (red, shapes_scenes.Obj("blue", "circle", 8, 24.5, 7.5)), "to the left of")
  image = shapes.render(left, 32)
  score = lambda p: shapes_eval.score(image, p)["correct"]
  assert score("a red square to the left of a blue circle")
  assert score("a blue circle to the right of a red square")
  assert not score("a red square to the right of a blue circle")
  assert not score("a red square above a blue circle")
  # On the diagonal neither axis dominates, so no relation holds.
  diagonal = shapes.render(
      shapes_scenes.Scene("position", (red, shapes_scenes.Obj("blue", "circle", 8, 20.5, 20.5)), "above"), 32
  )
  for relation in shapes_scenes.RELATIONS:
    prompt = f"a red square {relation} a blue circle"
    assert not shapes_eval.score(diagonal, prompt)["correct"], prompt


def test_merged_or_missing_objects_fail_counting():
  two = shapes_scenes.Scene(
      "counting",
      (shapes_scenes.Obj("green", "circle", 8, 5.5, 5.5), shapes_scenes.Obj("green", "circle", 8, 20.5, 20.5)),
  )
  image = shapes.render(two, 32)
  assert shapes_eval.score(image, "two green circles")["correct"]
  assert not shapes_eval.score(image, "three green circles")["correct"]
  assert not shapes_eval.score(image, "a green circle")["correct"]


def test_parse_prompt():
  spec = shapes_eval.parse_prompt("a red circle to the left of a blue square")
  assert spec == shapes_eval.PromptSpec("position", (("red", "circle"), ("blue", "square")), "to the left of")
  assert shapes_eval.parse_prompt("three cyan triangles").objects == ((("cyan", "triangle"),) * 3)
  assert shapes_eval.parse_prompt("  A Yellow  square ").kind == "single"
  for prompt in shapes.eval_prompts(10, seed=5):
    shapes_eval.parse_prompt(prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a red",
        "a purple circle",
        "two red circle",
        "four red circles",
        "a red circle near a blue square",
        "red circle",
        "a cat on a mat",
    ],
)
def test_parse_prompt_rejects_junk(prompt):
  with pytest.raises(ValueError, match="not a shapes sentence prompt") as err:
    shapes_eval.parse_prompt(prompt)
  assert repr(prompt) in str(err.value)


def test_evaluate_reports_only_present_kinds():
  scene = shapes_scenes.make_scene(0, 0, kind="single")
  metrics = shapes_eval.evaluate([shapes.render(scene, 32)], [shapes.caption(scene, "sentence")])
  assert metrics == {"single": 1.0, "overall": 1.0, "n": 1}
  with pytest.raises(ValueError, match="2 prompts"):
    shapes_eval.evaluate([np.zeros((32, 32, 3), np.uint8)], ["a", "b"])


def test_diagnose_names_the_first_failed_requirement():
  left = shapes.render(
      shapes_scenes.Scene(
          "position",
          (shapes_scenes.Obj("red", "square", 8, 5.5, 5.5), shapes_scenes.Obj("blue", "circle", 8, 24.5, 7.5)),
          "to the left of",
      ),
      32,
  )
  two = shapes.render(
      shapes_scenes.Scene(
          "counting",
          (shapes_scenes.Obj("green", "circle", 8, 5.5, 5.5), shapes_scenes.Obj("green", "circle", 8, 20.5, 20.5)),
      ),
      32,
  )
  # The square of `left` and a 1-pixel red line under it: a stray stripe, not
  # a second object (the score still fails it).
  striped = left.copy()
  striped[20, 2:14] = shapes_scenes.PALETTE["red"]
  reason = lambda image, p: shapes_eval.diagnose(image, p)["reason"]
  assert reason(left, "a red square to the left of a blue circle") == "ok"
  assert reason(left, "a red square to the right of a blue circle") == ("relation")
  assert reason(left, "a red circle to the left of a blue square") == ("binding")
  assert reason(left, "a red triangle to the left of a blue circle") == ("shape")
  assert reason(left, "a red square to the left of a cyan circle") == ("colour")
  assert reason(two, "three green circles") == "too few objects"
  assert reason(two, "a green circle") == "too many objects"
  assert reason(striped, "a red square to the left of a blue circle") == ("stray stripe")
  assert not shapes_eval.score(striped, "a red square to the left of a blue circle")["correct"]
  # Every documented reason is reachable, and only those (plus "ok") occur.
  reasons = {
      reason(left, p)
      for p in (
          "a red square to the left of a blue circle",
          "a red square to the right of a blue circle",
          "a red circle to the left of a blue square",
          "a red triangle to the left of a blue circle",
          "a red square to the left of a cyan circle",
      )
  }
  reasons |= {
      reason(two, "three green circles"),
      reason(two, "a green circle"),
      reason(striped, "a red square to the left of a blue circle"),
  }
  assert reasons == {"ok", *shapes_eval.FAILURES}
  got = shapes_eval.diagnose(two, "two green squares")
  assert (got["correct"], got["reason"]) == (False, "shape")
  assert got["shapes"] == [("square", "circle")] * 2


def test_failure_breakdown_counts_every_image_once(ground_truth):
  scenes, images = ground_truth
  prompts = [shapes.caption(s, "sentence") for s in scenes]
  ok = shapes_eval.failure_breakdown(images, prompts)
  assert {k: set(v) for k, v in ok["reasons"].items()} == {k: {"ok"} for k in shapes_scenes.KINDS}
  assert ok["shape_confusion"] == {}
  # Every single-object prompt asks for the next shape: all fail on shape, and
  # the confusion matrix records what was drawn instead.
  singles = [(img, s) for img, s in zip(images, scenes) if s.kind == "single"]
  wrong = [
      shapes.caption(
          dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], shape=_next_shape(s.objects[0].shape)),)),
          "sentence",
      )
      for _, s in singles
  ]
  bad = shapes_eval.failure_breakdown([img for img, _ in singles], wrong)
  assert bad["reasons"] == {"single": {"shape": len(singles)}}
  assert sum(bad["shape_confusion"].values()) == len(singles)
  for key in bad["shape_confusion"]:
    asked, got = key.split("->")
    assert got == shapes_scenes.SHAPES[(shapes_scenes.SHAPES.index(asked) - 1) % 3]
