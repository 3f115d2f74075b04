"""train.init_from: a fresh run that starts from another run's weights (step, optimizer and data order fresh)."""

import os

import chex
import jax
import numpy as np
import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax import config_lib
from rflow_jax.model import mmdit_tree
from rflow_jax.model import registry
from rflow_jax.train import checkpoint, tasks, trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def no_previews():
  """Sampling is tested elsewhere (train_test.py); here each run's end-of-run preview would only add a sampler
  compile (the depth-4 model's) or trace."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(tasks.FlowTask, "preview", lambda *args: None)
    yield


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, no_previews):  # pylint: disable=unused-argument,redefined-outer-name
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


def test_depth_growing_warm_start_computes_the_source_function(source_run, tmp_path):
  config = debug.get_config()
  config.model.depth = 4  # The source has 2 blocks: they go to blocks 0 and 3, blocks 1 and 2 are new.
  config.train.num_steps = 1  # Learning rate 0 at step 0: params stay as grown.
  config.train.init_from = source_run
  config.train.init_grow_depth = True
  trainer.train_and_evaluate(config, str(tmp_path))
  params, text_params, _ = checkpoint.restore_params(str(tmp_path), use_ema=False)
  source_params, source_text, _ = checkpoint.restore_params(source_run, use_ema=False)
  assert mmdit_tree.grown_block_positions(2, 4) == [0, 3]
  source_of = {"blocks_0": "blocks_0", "blocks_3": "blocks_1"}
  chex.assert_trees_all_equal(
      {k: v for k, v in params.items() if k not in ("blocks_1", "blocks_2")},
      {k: source_params[source_of.get(k, k)] for k in params if k not in ("blocks_1", "blocks_2")},
  )
  chex.assert_trees_all_equal(text_params, source_text)
  for new in ("blocks_1", "blocks_2"):  # Fresh adaLN-zero blocks: every modulation (shift, scale, gate) is 0.
    modulation = [v for path, v in jax.tree_util.tree_leaves_with_path(params[new]) if "modulation" in str(path)]
    assert modulation and all(not np.any(v) for v in modulation)

  # The function: with every source weight made random (so each source block matters), the grown model that holds
  # them computes what the source model computes.
  leaves, treedef = jax.tree.flatten(source_params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  random_source = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
  grown = {k: (v if k in ("blocks_1", "blocks_2") else random_source[source_of.get(k, k)]) for k, v in params.items()}
  inputs = [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(registry.dummy_inputs(config, 2))]
  out_grown = registry.build_model(config).apply({"params": grown}, *inputs)
  out_source = registry.build_model(debug.get_config()).apply({"params": random_source}, *inputs)
  assert np.abs(out_source).mean() > 0.1  # Far from the zero output of a fresh model.
  np.testing.assert_allclose(out_grown, out_source, rtol=1e-5, atol=1e-5)


def test_depth_growing_warm_start_refusals(source_run, tmp_path):
  config = debug.get_config()
  config.model.depth = 1
  config.train.init_from = source_run
  config.train.init_grow_depth = True
  with pytest.raises(ValueError, match=r"cannot grow a depth-2 MM-DiT into depth 1: growth only adds blocks"):
    trainer.train_and_evaluate(config, str(tmp_path / "shallower"))
  config = debug.get_config()
  config.model.depth = 3
  config.train.init_from = source_run  # Without init_grow_depth another depth is another model.
  with pytest.raises(ValueError, match=r"has (no )?parameter params/blocks_\d.*it was written by a different model"):
    trainer.train_and_evaluate(config, str(tmp_path / "no_grow"))
  config = debug.get_config()
  config.train.init_grow_depth = True
  with pytest.raises(config_lib.ConfigError, match=r"train.init_grow_depth=True .* set train.init_from too"):
    trainer.train_and_evaluate(config, str(tmp_path / "no_source"))
  config.train.init_from = source_run
  config.model.scan_blocks = True
  with pytest.raises(config_lib.ConfigError, match=r"set model.scan_blocks=False"):
    trainer.train_and_evaluate(config, str(tmp_path / "scanned"))
  for name in ("shallower", "no_grow", "no_source", "scanned"):
    assert not os.path.exists(tmp_path / name / "config.json")
    assert checkpoint.latest_step(str(tmp_path / name)) is None
