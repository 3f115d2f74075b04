"""launch/sweep.py: the dry run lists the runs, finished runs are skipped, collect gives one row per evaluation."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.utils import flops  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = f"""
import sys
sys.path.insert(0, {ROOT!r})
from configs import debug


def get_config():
  c = debug.get_config()
  c.train.evaluators = ("val_loss",)
  c.eval.val_loss_examples = 4
  c.eval.val_loss_batch_size = 4
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.eval_at_end = True  # configs/debug.py turns it off; the sweep needs the final val_loss.
  return c


def sweep(add):
  add(**{{"train.num_steps": 2}})
  add(**{{"train.num_steps": 4}})
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny_sweep.py"
  path.write_text(CONFIG)
  return str(path)


def test_dry_run_lists_every_run_with_workdir_and_command(config_file, tmp_path, capsys):
  assert (
      sweep.main(
          [
              f"--config={config_file}",
              f"--sweep_dir={tmp_path}",
              "--dry_run",
              "--also=optim.learning_rate=0.001,0.002",
              "--set=train.log_every=1",
          ]
      )
      == 0
  )
  lines = [l.split("\t") for l in capsys.readouterr().out.strip().splitlines()]
  names = [
      "num_steps2_learning_rate0.001",
      "num_steps2_learning_rate0.002",
      "num_steps4_learning_rate0.001",
      "num_steps4_learning_rate0.002",
  ]
  assert [l[0] for l in lines] == names
  assert all(l[1] == "new" and l[2] == os.path.join(str(tmp_path), l[0]) for l in lines)
  assert lines[2][3].endswith(
      f"-m rflow_jax.main --config={config_file} --workdir={tmp_path}/{names[2]} "
      "--config.train.num_steps=4 --config.optim.learning_rate=0.001 "
      "--config.train.log_every=1"
  )


def test_bad_sweep_fields_fail_before_anything_runs(config_file, tmp_path, capsys):
  with pytest.raises(SystemExit):
    sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run", "--also=optim.lr=1,2"])
  assert "error: unknown config field 'optim.lr'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run", "--branches=0.5"])
  assert "error: --branches needs optim.decay='wsd'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run", "--set=train.eval_at_end=False"])
  assert (
      "error: run num_steps2 evaluates val_loss but has train.eval_at_end=False: its final step would never be "
      "evaluated; set --set=train.eval_at_end=True"
  ) in capsys.readouterr().err


def test_wsd_branches_are_planned_from_stable_checkpoints(tmp_path):
  config_file = tmp_path / "wsd_sweep.py"
  config_file.write_text(
      CONFIG.replace('add(**{"train.num_steps": 2})\n  add(**{"train.num_steps": 4})', 'add(**{"train.num_steps": 16})')
  )
  runs = sweep.plan(
      str(config_file),
      str(tmp_path),
      sets=["optim.decay=wsd", "optim.decay_fraction=0.5", "train.keep_checkpoints=8"],
      branches=[0.5],
  )
  branch = [r for r in runs if r.branch_of]
  assert [(r.name, r.branch_of, r.branch_step, r.config.train.num_steps) for r in branch] == [
      ("num_steps16_T8", "num_steps16", 4, 8)
  ]


@pytest.mark.slow
def test_second_run_skips_finished_runs_and_collect_gives_one_row_per_evaluation(
    config_file, tmp_path, monkeypatch, capsys
):
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  runs = sweep.plan(config_file, str(tmp_path))
  for run in runs:  # What the first `python launch/sweep.py` does, in this process (one compile for both).
    # The sweep reads checkpoints and val_loss, not samples: the end-of-run preview would only add a sampler trace.
    run.config.train.preview_at_end = False
    trainer.train_and_evaluate(run.config, run.workdir)
  assert [sweep.status(r) for r in runs] == ["done", "done"]

  def no_training(*args, **kwargs):
    raise AssertionError(f"a finished run was started again: {args}")

  monkeypatch.setattr(subprocess, "Popen", no_training)
  log = []
  sweep.run_local(runs, parallel=2, log=log.append)
  assert sorted(log) == ["num_steps2: done, skipped", "num_steps4: done, skipped"]

  out = tmp_path / "sweep.csv"
  assert sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "collect", f"--out={out}"]) == 0
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], int(r["step"])) for r in rows] == [("num_steps2", 2), ("num_steps4", 2), ("num_steps4", 4)]
  per_example = flops.train_flops_per_example(runs[0].config)
  for row in rows:
    step = int(row["step"])
    assert float(row["examples"]) == step * 4
    assert float(row["flops"]) == pytest.approx(step * 4 * per_example, rel=1e-12)
    with open(os.path.join(tmp_path, row["run"], "metrics.jsonl")) as f:
      logged = [json.loads(l) for l in f if "val_loss/mean" in l]
    want = [m for m in logged if m["step"] == step][-1]
    assert float(row["val_loss"]) == pytest.approx(want["val_loss/mean"], rel=1e-12)
    assert float(row["val_loss/ema/t7"]) == pytest.approx(want["val_loss/ema/t7"], rel=1e-12)
    assert float(row["params"]) == flops.param_count(runs[0].config)["trainable"]
  # Emitting cluster jobs skips finished runs too; an unfinished one gets a job file (printed without sbatch).
  monkeypatch.setenv("PATH", "/nonexistent")
  more = sweep.plan(config_file, str(tmp_path / "other"))
  written = sweep.emit(runs + more[:1], "slurm", str(tmp_path / "jobs"), submit=True, log=log.append)
  assert [os.path.basename(p) for p in written] == ["num_steps2.sh"]
  assert "sbatch --job-name=rf-num_steps2 launch/slurm.sbatch --config=" in open(written[0]).read()
  assert log[-1] == f"sbatch not found; submit with: bash {written[0]}"
  capsys.readouterr()
