"""launch/sweep.py: the dry run lists the runs, finished runs are skipped, collect gives one row per evaluation."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = f'''
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
  return c


def sweep(add):
  add(**{{"train.num_steps": 2}})
  add(**{{"train.num_steps": 4}})
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny_sweep.py"
  path.write_text(CONFIG)
  return str(path)


def test_dry_run_lists_every_run_with_workdir_and_command(config_file, tmp_path, capsys):
  assert sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run",
                     "--also=optim.learning_rate=0.001,0.002", "--set=train.log_every=1"]) == 0
  lines = [l.split("\t") for l in capsys.readouterr().out.strip().splitlines()]
  names = ["num_steps2_learning_rate0.001", "num_steps2_learning_rate0.002", "num_steps4_learning_rate0.001",
           "num_steps4_learning_rate0.002"]
  assert [l[0] for l in lines] == names
  assert all(l[1] == "new" and l[2] == os.path.join(str(tmp_path), l[0]) for l in lines)
  assert lines[2][3].endswith(f"-m rflow_jax.main --config={config_file} --workdir={tmp_path}/{names[2]} "
                              "--config.train.num_steps=4 --config.optim.learning_rate=0.001 "
                              "--config.train.log_every=1")


def test_bad_sweep_fields_fail_before_anything_runs(config_file, tmp_path, capsys):
  with pytest.raises(SystemExit):
    sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run", "--also=optim.lr=1,2"])
  assert "error: unknown config field 'optim.lr'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main([f"--config={config_file}", f"--sweep_dir={tmp_path}", "--dry_run", "--branches=0.5"])
  assert "error: --branches needs optim.decay='wsd'" in capsys.readouterr().err


def test_wsd_branches_are_planned_from_stable_checkpoints(tmp_path):
  config_file = tmp_path / "wsd_sweep.py"
  config_file.write_text(CONFIG.replace('add(**{"train.num_steps": 2})\n  add(**{"train.num_steps": 4})',
                                        'add(**{"train.num_steps": 16})'))
  runs = sweep.plan(str(config_file), str(tmp_path), sets=["optim.decay=wsd", "optim.decay_fraction=0.5",
                                                            "train.keep_checkpoints=8"], branches=[0.5])
  branch = [r for r in runs if r.branch_of]
  assert [(r.name, r.branch_of, r.branch_step, r.config.train.num_steps) for r in branch] == [
      ("num_steps16_T8", "num_steps16", 4, 8)]
