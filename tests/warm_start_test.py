"""train.init_from: a fresh run that starts from another run's weights (step, optimizer and data order fresh)."""

import os

import chex
import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax.train import checkpoint, trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  return cli_util.train_debug_run(tmp_path_factory, "source")


def test_warm_start_takes_the_weights_and_starts_at_step_zero(source_run, tmp_path):
  config = debug.get_config()
  config.train.num_steps = 1  # Step 0 runs at learning rate 0 (linear warmup from 0): params stay as loaded.
  config.text.init_seed = 99  # Its own text encoders would differ from the source's: they must be replaced.
  config.train.init_from = source_run
  trainer.train_and_evaluate(config, str(tmp_path))
  params, text_params, step = checkpoint.restore_params(str(tmp_path), use_ema=False)
  source_params, source_text, source_step = checkpoint.restore_params(source_run, use_ema=False)
  assert (step, source_step) == (1, 2)
  chex.assert_trees_all_equal(params, source_params)  # Same structure, bitwise equal leaves.
  chex.assert_trees_all_equal(text_params, source_text)


def test_warm_start_from_another_model_or_no_checkpoint_fails_before_compiling(source_run, tmp_path):
  config = debug.get_config()
  config.model.hidden_size = 64
  config.train.init_from = source_run
  with pytest.raises(ValueError, match=r"parameter .* has shape .* but this config expects"):
    trainer.train_and_evaluate(config, str(tmp_path / "other_model"))
  config = debug.get_config()
  config.text.depth = 2  # The MM-DiT is unchanged; only the text encoders differ.
  config.train.init_from = source_run
  with pytest.raises(ValueError, match=r"has no parameter text_params/"):
    trainer.train_and_evaluate(config, str(tmp_path / "other_text"))
  config = debug.get_config()
  config.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"train.init_from='.*nowhere' holds no complete checkpoint"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  for name in ("other_model", "other_text", "w"):  # Nothing was trained or written there.
    assert not os.path.exists(tmp_path / name / "config.json")
    assert checkpoint.latest_step(str(tmp_path / name)) is None
