"""End-to-end trainer tests on the debug config: outputs, resume == uninterrupted, wrong-model workdirs refused."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.train import checkpoint, trainer

pytestmark = pytest.mark.slow


def _config(**overrides):
  c = debug.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _snapshot(workdir):
  files = sorted(glob.glob(os.path.join(workdir, "checkpoints", "**"), recursive=True))
  return {f: (os.path.getsize(f), os.path.getmtime(f)) for f in files if os.path.isfile(f)}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  """A finished 2-step run of the debug config (checkpoint of step 2), without its end-of-run preview: the workdir
  that both an interrupted run (resumed below) and a run refused for another model's config start from."""
  workdir = str(tmp_path_factory.mktemp("two_step") / "run")
  # The sampler is the straight run's to check; here it is only a compile.
  trainer.train_and_evaluate(_config(**{"train.num_steps": 2, "train.preview_at_end": False}), workdir)
  assert checkpoint.latest_step(workdir) == 2
  return workdir


def test_train_writes_outputs_and_resume_equals_uninterrupted(two_step_run, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  # The straight run also evaluates mid-run; the resumed one does not, so equality below also shows that a
  # periodic ShapesEval leaves the training trajectory alone.
  results = trainer.train_and_evaluate(_config(**{"train.sample_every": 2, "train.eval_every": 2}), straight)
  assert np.isfinite(results["loss"]) and results["skipped_steps"] == 0
  with open(os.path.join(straight, "eval_step2", "scores.json")) as f:
    scores = json.load(f)
  assert set(scores) == {"single", "position", "counting", "overall", "n"}
  with open(os.path.join(straight, "eval_step2", "failures.json")) as f:
    failures = json.load(f)
  # Every evaluated image is counted once, under one reason.
  assert sum(sum(r.values()) for r in failures["reasons"].values()) == scores["n"]
  with open(os.path.join(straight, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "shapes/overall" in r]
  assert [r["step"] for r in evals] == [2]  # Only mid-run: eval_at_end is off in the debug config.
  assert 0.0 <= evals[0]["shapes/overall"] <= 1.0
  assert os.path.isfile(os.path.join(straight, "config.json"))
  assert glob.glob(os.path.join(straight, "events.out.tfevents.*"))
  assert os.path.isfile(os.path.join(straight, "samples", "grid_000002.png"))
  assert os.path.isfile(os.path.join(straight, "samples", "grid_000004.png"))
  assert checkpoint.latest_step(straight) == 4

  # Interrupted after step 2 (a finished shorter run, a copy of two_step_run), then re-run with the full length:
  # resumes from step 2. Without previews (and with the straight run's mid-run sampling and evaluation), equality
  # also shows that sampling leaves the training trajectory alone.
  shutil.copytree(two_step_run, resumed)
  trainer.train_and_evaluate(_config(**{"train.preview_at_end": False}), resumed)
  assert checkpoint.latest_step(resumed) == 4
  for use_ema in (False, True):
    p_straight, t_straight, _ = checkpoint.restore_params(straight, use_ema=use_ema)
    p_resumed, t_resumed, _ = checkpoint.restore_params(resumed, use_ema=use_ema)
    assert _tree_equal(p_straight, p_resumed), f"resumed params differ (ema={use_ema})"
    assert _tree_equal(t_straight, t_resumed)
  # Training moved the params away from the (deterministic) initialisation.
  p_two, _, _ = checkpoint.restore_params(resumed, use_ema=False, step=2)
  assert not _tree_equal(p_two, p_straight)


def test_workdir_of_another_model_is_refused_untouched(two_step_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_step_run, workdir)
  before = _snapshot(workdir)
  # Refused from config.json before anything is built (train/resume.py), naming the field; a workdir without its
  # config.json still meets check_compatible's shape check (tests/warm_start_test.py exercises that message).
  with pytest.raises(ValueError, match=r"model.hidden_size=48, but .* was trained with model.hidden_size=32"):
    trainer.train_and_evaluate(_config(**{"model.hidden_size": 48}), workdir)
  assert _snapshot(workdir) == before
  assert checkpoint.latest_step(workdir) == 2


def test_nonfinite_halt_names_the_window(tmp_path, monkeypatch):
  # A learning rate of inf (refused by config validation, bypassed here) makes the first update non-finite with a
  # finite gradient; the guard refuses to apply or save it.
  monkeypatch.setattr(config_lib, "validate", lambda config: None)
  config = _config(**{"optim.learning_rate": float("inf"), "optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0})
  config.optim.b1 = 0.9
  with pytest.raises(trainer.NonFiniteError, match=r"between steps 1 and 2.*No checkpoint was written"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))
  assert checkpoint.latest_step(str(tmp_path / "nan")) is None
