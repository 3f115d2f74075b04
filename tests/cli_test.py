"""The command-line entry points as a user runs them: one-line errors (exit 2, no traceback) and the sample CLI."""

import os

import pytest
from PIL import Image

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax import config_lib
from rflow_jax import rundir
from rflow_jax.train import trainer

pytestmark = pytest.mark.slow
_run, _assert_one_line_error, _main_error = cli_util.run_module, cli_util.assert_one_line_error, cli_util.main_error


@pytest.mark.parametrize(
    "override, needles",
    [
        ("--config.model.nope=3", ("unknown config key 'nope'", "--config.model.nope=3")),
        ("--config.model.depth=abc", ("--config.model.depth=abc",)),
        ("--config.data.image_size=30", ("data.image_size=30", "model.patch_size=8")),
    ],
)
def test_train_cli_bad_config(tmp_path, override, needles):
  """One launch per way main.py turns a bad config into its one line: absl's parse of an unknown key, of a value of
  the wrong type, and config_lib.validate's ConfigError raised by the trainer."""
  workdir = tmp_path / "w"
  rc, _, stderr = _run("rflow_jax.main", "--config=configs/debug.py", f"--workdir={workdir}", override)
  _assert_one_line_error(rc, stderr, *needles)
  assert not workdir.exists()  # Validated before anything was written.


def test_train_bad_formulation_is_refused_before_anything_is_written(tmp_path):
  """Another of config_lib.validate's errors on the path launched above (data.image_size=30), in this process: the
  trainer raises it as one line before it writes to the workdir."""
  workdir = tmp_path / "w"
  config = debug.get_config()
  config.flow.formulation = "rf/banana"
  with pytest.raises(config_lib.ConfigError) as error:
    trainer.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert "\n" not in message and "flow.formulation" in message and "rf/banana" in message, message
  assert not workdir.exists()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  return cli_util.train_debug_run(tmp_path_factory, "run")


def test_sample_cli_writes_one_png_per_prompt(trained_workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\n  two blue squares  \na green triangle above a red square\n", encoding="utf-8")
  out = tmp_path / "out"
  rc, stdout, stderr = _run(
      "rflow_jax.sample",
      f"--workdir={trained_workdir}",
      f"--prompts={prompts}",
      f"--out={out}",
      "--steps=2",
      "--cfg=2.0",
      "--seed=3",
  )
  assert rc == 0, stderr[-3000:]
  assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "grid.png", "rflow_jax_samples.json"]
  # The third prompt has 7 words; debug's text.max_length=8 holds 6: the user is told what is dropped.
  assert (
      "warning: prompt 3 ('a green triangle above a red square'): cut at text.max_length=8 (6 words): "
      "'square' is dropped"
  ) in stderr
  assert "read only" not in stderr and "orbax" not in stderr.lower(), stderr  # No Orbax chatter.
  for name in ("000000.png", "000002.png"):
    with Image.open(out / name) as im:
      assert im.size == (32, 32) and im.mode == "RGB"
  assert "wrote 3 images" in stdout


@pytest.mark.parametrize(
    "content, needles",
    [
        (None, ("--prompts=", "no such file")),
        (b"\n   \n", ("holds no non-empty line",)),
        (b"a red circle\n\xff\xfe bad\n", ("is not UTF-8",)),
    ],
)
def test_sample_cli_bad_prompts(trained_workdir, tmp_path, content, needles):
  prompts = tmp_path / "prompts.txt"
  if content is not None:
    prompts.write_bytes(content)
  rc, _, stderr = _run(
      "rflow_jax.sample", f"--workdir={trained_workdir}", f"--prompts={prompts}", f"--out={tmp_path / 'out'}"
  )
  _assert_one_line_error(rc, stderr, *needles)
  assert not (tmp_path / "out").exists()


def test_sample_cli_bad_workdir_cfg_and_solver(trained_workdir, tmp_path):
  """The CLI passes --workdir, --cfg and --solver to rundir.load_sampler, which refuses bad ones: one launch (--solver)
  for the process's exit code and output; the other two through the same load_sampler call and error handling here."""
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle\n")
  rc, stderr = _main_error(lambda: rundir.load_sampler(str(tmp_path / "nowhere")))
  _assert_one_line_error(rc, stderr, "has no config.json")
  rc, stderr = _main_error(lambda: rundir.load_sampler(trained_workdir, cfg=-1.0))
  _assert_one_line_error(rc, stderr, "sample.cfg_scale=-1.0 must be >= 0")
  rc, _, stderr = _run(
      "rflow_jax.sample",
      f"--workdir={trained_workdir}",
      f"--prompts={prompts}",
      f"--out={tmp_path / 'o'}",
      "--solver=rk4",
  )
  _assert_one_line_error(rc, stderr, "sample.solver='rk4'", "euler_stochastic")
  assert not (tmp_path / "o").exists()


def test_run_shapes_cli_keeps_the_runs_own_eval_apart_from_probes(trained_workdir):
  rc, stdout, stderr = _run("rflow_jax.eval.run_shapes", f"--workdir={trained_workdir}")
  assert rc == 0, stderr[-3000:]
  assert '"step": 2' in stdout and '"n": 6' in stdout  # debug config: 2 prompts per kind.
  own = os.path.join(trained_workdir, "eval_step2")
  assert sorted(os.listdir(own)) == ["failures.json", "grid.png", "prompts.txt", "scores.json"]
  before = {n: open(os.path.join(own, n), "rb").read() for n in os.listdir(own)}
  # Another guidance scale, solver and the raw weights: a directory of its own; the run's own eval is left as it was.
  rc, _, stderr = _run(
      "rflow_jax.eval.run_shapes",
      f"--workdir={trained_workdir}",
      "--cfg=5",
      "--raw",
      "--per_kind=1",
      "--solver=euler_stochastic",
  )
  assert rc == 0, stderr[-3000:]
  probe = os.path.join(trained_workdir, "eval_step2_cfg5_per_kind1_euler_stochastic_raw")
  assert open(os.path.join(probe, "prompts.txt")).read().count("\n") == 3
  assert before == {n: open(os.path.join(own, n), "rb").read() for n in os.listdir(own)}
  rc, _, stderr = _run("rflow_jax.eval.run_shapes", f"--workdir={trained_workdir}", "--per_kind=0")
  _assert_one_line_error(rc, stderr, "--per_kind=0 must be >= 1")
