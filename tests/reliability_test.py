"""Preemption (SIGTERM), workdir locking, the non-finite guard's 'skip' policy and incomplete-checkpoint handling."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax.train import checkpoint, trainer, workdir as workdir_lib

pytestmark = pytest.mark.slow


def _debug(**overrides):
  c = debug.get_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A 2-step debug run (checkpoint of step 2), trained once; tests that continue it work on a copy."""
  return cli_util.train_debug_run(tmp_path_factory, "two_steps", num_steps=2)


def test_poisoned_batch_is_skipped_and_counted(tmp_path):
  workdir = str(tmp_path / "skip")
  results = trainer.train_and_evaluate(_debug(**{"train.nonfinite": "skip", "train.poison_step": 2}), workdir)
  assert results["skipped_steps"] == 1 and results["step"] == 4
  params, _, _ = checkpoint.restore_params(workdir, use_ema=False)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_poisoned_batch_halts_without_saving_nan(tmp_path):
  workdir = str(tmp_path / "halt")
  with pytest.raises(trainer.NonFiniteError, match=r"between steps 3 and 4 .*Last good checkpoint: step 2"):
    trainer.train_and_evaluate(_debug(**{"train.poison_step": 3}), workdir)
  assert checkpoint.latest_step(workdir) == 2  # Step 4 (after the poisoned step 3) was never written.


def test_second_trainer_on_a_busy_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with workdir_lib.exclusive(workdir):
    with pytest.raises(workdir_lib.WorkdirBusyError, match=r"is in use by another trainer \(pid \d+\)"):
      trainer.train_and_evaluate(_debug(), workdir)
  assert checkpoint.latest_step(workdir) is None


def test_incomplete_checkpoint_dir_is_ignored_with_a_warning(two_steps, tmp_path):
  workdir = str(tmp_path / "partial")
  shutil.copytree(two_steps, workdir)
  # What a crash during the save of step 4 leaves behind.
  junk = os.path.join(checkpoint.checkpoint_dir(workdir), "4.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(junk, "state"))
  assert workdir_lib.warn_incomplete_checkpoints(checkpoint.checkpoint_dir(workdir)) == [junk]
  assert checkpoint.latest_step(workdir) == 2
  results = trainer.train_and_evaluate(_debug(), workdir)
  assert results["step"] == 4 and checkpoint.latest_step(workdir) == 4


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / "term")
  # Once training is under way (the first progress report), ask it to stop.
  rc, out = cli_util.train_and_signal(workdir, signal.SIGTERM, "steps/s", log_every=5)
  assert rc == 0, out[-3000:]
  step = checkpoint.latest_step(workdir)
  assert step is not None and step > 0, out[-3000:]
  assert "SIGTERM: checkpoint of step" in out
  results = trainer.train_and_evaluate(_debug(**{"train.num_steps": step + 2}), workdir)
  assert results["step"] == step + 2


def test_full_disk_during_save_keeps_the_last_checkpoint(two_steps, tmp_path, monkeypatch):
  workdir = str(tmp_path / "full")
  shutil.copytree(two_steps, workdir)

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint, "save", no_space)  # What Orbax raises when the disk fills during a save.
  with pytest.raises(
      checkpoint.CheckpointWriteError,
      match=r"checkpoint of step 4 .*No space left on device.*last complete checkpoint \(step 2\) is intact",
  ):
    trainer.train_and_evaluate(_debug(), workdir)
  monkeypatch.undo()
  assert checkpoint.latest_step(workdir) == 2
  params, _, _ = checkpoint.restore_params(workdir, use_ema=False)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(NotADirectoryError, match=r"--workdir=.*file' exists and is not a directory"):
    trainer.train_and_evaluate(_debug(), str(path))
  assert path.read_text() == "not a directory"
