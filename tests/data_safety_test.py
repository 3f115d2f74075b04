"""Nothing of a run is lost, and nothing false is said about it: output paths that would replace a run, the
non-finite guard on a finite gradient with a non-finite update, damaged checkpoints, Ctrl-C, and what export and
sample write (readable directories, the right sample_size, a marker --overwrite needs)."""

import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax import paths
from rflow_jax.export import workdir as export_workdir
from rflow_jax.train import checkpoint, resume, trainer, writers


def _fake_run(tmp_path):
  """A directory that looks like a training workdir (config.json beside checkpoints/) without training anything."""
  w = tmp_path / "W"
  (w / "checkpoints" / "2").mkdir(parents=True)
  (w / "checkpoints" / "2" / "marker").write_text("keep me")
  (w / "config.json").write_text(debug.get_config().to_json_best_effort())
  return w


def _spellings(tmp_path, w):
  os.symlink(w / "checkpoints", tmp_path / "link_to_ckpts")
  os.symlink(w, tmp_path / "link_to_run")
  (tmp_path / "other").mkdir()
  return [
      str(w),
      f"{w}/",
      f"{w}/checkpoints",
      f"{w}/checkpoints/",
      f"{w}/checkpoints/2",
      f"{w}/../W/checkpoints",
      f"{tmp_path}/other/../W/./checkpoints//",
      str(tmp_path / "link_to_ckpts"),
      f"{tmp_path}/link_to_run/",
      f"{w}/samples",
      f"{w}/new/deeper",
      os.path.relpath(w / "checkpoints"),
  ]


def test_export_and_sample_outputs_never_replace_a_run_however_spelled(tmp_path):
  w = _fake_run(tmp_path)
  for out in _spellings(tmp_path, w):
    for overwrite in (False, True):
      with pytest.raises(paths.OutputPathError, match=r"training workdir"):
        export_workdir.export_workdir(w, out, overwrite=overwrite)
      with pytest.raises(paths.OutputPathError, match=r"training workdir"):
        paths.check_output_dir(out, marker="rflow_jax_samples.json", overwrite=overwrite)
  # A directory holding the run, even with --overwrite and even if it once held an export, is not replaced.
  (tmp_path / "rflow_jax_export.json").write_text("{}")
  with pytest.raises(paths.OutputPathError, match=r"holds the training workdir .*--overwrite would delete it"):
    export_workdir.export_workdir(w, tmp_path, overwrite=True)
  # A non-empty directory that is not an earlier output of the tool is never replaced.
  (tmp_path / "other" / "thesis.tex").write_text("years of work")
  with pytest.raises(paths.OutputPathError, match=r"holds no rflow_jax_export.json .*--overwrite replaces only"):
    export_workdir.export_workdir(w, tmp_path / "other", overwrite=True)
  assert (w / "checkpoints" / "2" / "marker").read_text() == "keep me"
  assert (tmp_path / "other" / "thesis.tex").read_text() == "years of work"
  assert sorted(os.listdir(w)) == ["checkpoints", "config.json"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.joinpath("f").write_text("x") and p / "f", "exists and is not a directory"),
        (lambda p: p / "f2" / "sub", "is not a directory"),  # A file where a parent directory must go.
        (lambda p: "/proc/rflow_jax_out", "cannot be written"),  # A filesystem nobody can write (also as root).
    ],
)
def test_unwritable_output_paths_are_one_line_user_errors(tmp_path, make, message):
  (tmp_path / "f2").write_text("x")
  with pytest.raises(paths.OutputPathError, match=message):
    paths.check_output_dir(make(tmp_path), marker="m.json", overwrite=False)


def test_export_cli_to_the_runs_checkpoints_is_refused_untouched(tmp_path):
  # The command that deleted every checkpoint of the run and exited 0.
  w = _fake_run(tmp_path)
  rc, _, stderr = cli_util.run_module("rflow_jax.export", f"--workdir={w}", f"--out={w}/checkpoints", "--overwrite")
  cli_util.assert_one_line_error(rc, stderr, f"--out='{w}/checkpoints' is inside the training workdir")
  assert (w / "checkpoints" / "2" / "marker").read_text() == "keep me"


@pytest.mark.slow
def test_finite_gradient_with_a_nonfinite_update_is_not_applied():
  config = debug.get_config()
  config.optim.learning_rate = float("nan")  # Finite loss and gradient; every update NaN (validate would refuse it).
  config.optim.warmup_steps = 0
  setup = trainer.Setup(config)
  state = setup.init_state()
  before = jax.device_get((state.params, state.ema_params, state.opt_state))
  local = next(setup.data_iterator())
  new, metrics = setup.step(state, setup.global_batch(local))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["nonfinite"]) == 1.0 and int(new.skipped_steps) == 1 and int(new.step) == 1
  for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(jax.device_get((new.params, new.ema_params, new.opt_state)))
  ):
    np.testing.assert_array_equal(a, b)


def test_empty_t_quarters_are_left_out_not_logged_as_zero():
  window = [
      {
          "loss": 1.0,
          "loss_t0": 2.0,
          "count_t0": 3.0,
          "loss_t1": 0.0,
          "count_t1": 0.0,
          "loss_t2": 4.0,
          "count_t2": 1.0,
          "loss_t3": 0.0,
          "count_t3": 0.0,
      },
      {
          "loss": 3.0,
          "loss_t0": 1.0,
          "count_t0": 1.0,
          "loss_t1": 0.0,
          "count_t1": 0.0,
          "loss_t2": 0.0,
          "count_t2": 0.0,
          "loss_t3": 5.0,
          "count_t3": 2.0,
      },
  ]
  assert writers.average_metrics(window) == {"loss": 2.0, "loss_t0": 1.75, "loss_t2": 4.0, "loss_t3": 5.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step debug run with checkpoints at steps 2 and 4."""
  return cli_util.train_debug_run(tmp_path_factory, "run", num_steps=4)


def _damage(workdir, step, how):
  state = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "state")
  if how == "truncated":
    data = os.path.join(state, "ocdbt.process_0", "d")
    biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(1000)
  else:
    os.remove(os.path.join(state, "_METADATA"))


@pytest.mark.slow
def test_damaged_newest_checkpoint_training_falls_back_and_keeps_it(run, tmp_path, caplog):
  w = str(tmp_path / "w")
  shutil.copytree(run, w)
  _damage(w, 4, "truncated")
  config = debug.get_config()
  config.train.num_steps = 6
  caplog.set_level("WARNING")
  results = trainer.train_and_evaluate(config, w)  # Resumes from step 2, never crash-loops on step 4.
  assert results["step"] == 6 and checkpoint.latest_step(w) == 6
  lines = [r.getMessage() for r in caplog.records if "Damaged checkpoint" in r.getMessage()]
  assert len(lines) == 1 and "step 4 (ValueError" in lines[0] and "step 2" in lines[0], lines
  kept = os.listdir(os.path.join(w, checkpoint.DAMAGED_DIR))
  assert (
      len(kept) == 1 and kept[0].startswith("4-") and f"moved to {os.path.join(w, checkpoint.DAMAGED_DIR)}" in lines[0]
  )


@pytest.mark.slow
def test_export_is_readable_with_the_runs_sample_size_and_replaces_only_an_export(run, tmp_path):
  out = tmp_path / "export"
  old_umask = os.umask(0o022)
  try:
    export_workdir.export_workdir(run, out)
    export_workdir.export_workdir(run, out, overwrite=True)  # An earlier export is replaced as a whole.
  finally:
    os.umask(old_umask)
  assert oct(out.stat().st_mode & 0o777) == oct(0o755)
  assert oct((out / "transformer").stat().st_mode & 0o777) == oct(0o755)
  config = json.loads((out / "transformer" / "config.json").read_text())
  assert config["sample_size"] == debug.get_config().data.image_size == 32


@pytest.mark.slow
def test_ctrl_c_during_compilation_stops_cleanly_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "int")
  # Once the handlers are installed: the model is being built and compiled next.
  rc, out = cli_util.train_and_signal(workdir, signal.SIGINT, "Stop signals")
  assert rc == 0, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  assert "SIGINT: checkpoint of step 1 committed" in out, out[-3000:]
  assert checkpoint.latest_step(workdir) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("flow.formulation", "rf/lognorm(0.50,1.00)", "flow.formulation='rf/lognorm(0.50,1.00)', but"),
        ("model.hidden_size", 64, "model.hidden_size=64, but"),
        ("optim.learning_rate", 5e-4, "optim.learning_rate=0.0005, but"),
        ("train.num_steps", 3, "train.num_steps=3 is below the checkpoint step 4"),
    ],
)
def test_resume_that_changes_what_is_trained_is_refused_and_config_json_kept(run, tmp_path, field, value, message):
  w = str(tmp_path / "w")
  shutil.copytree(run, w)
  before = open(os.path.join(w, "config.json")).read()
  config = debug.get_config()
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(resume.ResumeError, match=re.escape(message)):
    trainer.train_and_evaluate(config, w)
  assert open(os.path.join(w, "config.json")).read() == before
  assert checkpoint.latest_step(w) == 4
