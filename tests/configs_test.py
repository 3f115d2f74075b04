"""Every config file loads, validates, and builds its model and optimizer abstractly; bad values fail in one line."""

import glob
import importlib
import os

import jax
import pytest

from rflow_jax import config_lib
from rflow_jax.model import registry
from rflow_jax.model import variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Families whose get_config takes no argument; they are built here.
SIMPLE = ["quickstart", "shapes", "debug", "shapes_latent"]
# The other files under configs/ and the tests that build them.
COVERED_ELSEWHERE = {
    "__init__": "(package marker)",
    "base": "every family starts from it; tests/config_keys_test.py",
    "formulations": "tests/formulation_study_test.py",
    "rq2_baselines": "test_rq2_baseline_configs_build below",
    "sd3": "tests/sharding_aot_test.py",
    "scaling": "tests/scaling_flops_test.py, tests/scaling_sweep_test.py",
    "shapes_vae": "tests/vae_task_test.py",
}


@pytest.mark.parametrize("name", SIMPLE)
def test_config_validates_and_builds_abstractly(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)
  model = registry.build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *registry.dummy_inputs(config)))
  assert jax.tree.leaves(shapes)


def _param_count(config):
  x, _, context, pooled = registry.dummy_inputs(config)
  return variants.count_params(registry.build_model(config), x.shape, context.shape, pooled.shape)


def test_shapes_variants_validate_and_unknown_variants_fail():
  from configs import shapes  # pylint: disable=g-import-not-at-top

  config = shapes.get_config("gpu")
  config_lib.validate(config)
  assert _param_count(config) > 5 * _param_count(shapes.get_config())
  grow, cpu = shapes.get_config("grow"), shapes.get_config("cpu")
  config_lib.validate(grow)
  # Stage 2 grows stage 1's model in depth only (what train.init_grow_depth accepts).
  assert grow.train.init_grow_depth and grow.model.depth > cpu.model.depth
  assert {k: v for k, v in grow.model.items() if k != "depth"} == {k: v for k, v in cpu.model.items() if k != "depth"}
  assert grow.text == cpu.text and grow.data == cpu.data
  with pytest.raises(ValueError, match="configs/shapes.py:tpu: valid variants are 'cpu', 'grow' and 'gpu'"):
    shapes.get_config("tpu")


def test_shapes_latent_variants():
  from configs import shapes_latent  # pylint: disable=g-import-not-at-top

  train, job, tiny = (shapes_latent.get_config(a) for a in ("cpu", "precompute", "tiny"))
  config_lib.validate(tiny)
  # The precompute job encodes with the text stack and at the latent size the training run checks its records for.
  assert job.text == train.text and job.data.name == "arrayrecord" and train.data.name == "precomputed"
  assert job.data.image_size == train.data.image_size * 2 ** (len(train.vae.block_out_channels) - 1)
  assert train.model.in_channels == train.vae.latent_channels and tiny.model.in_channels == tiny.vae.latent_channels
  # The MM-DiT and its recipe are the pixel quickstart's: only the representation and the text encoders differ.
  quick = importlib.import_module("configs.quickstart").get_config()
  for section in ("optim", "flow", "sample"):
    assert train[section] == quick[section], section
  assert (train.model.hidden_size, train.model.depth) == (quick.model.hidden_size, quick.model.depth)
  with pytest.raises(ValueError, match="configs/shapes_latent.py:gpu: valid variants are 'cpu', 'precompute'"):
    shapes_latent.get_config("gpu")


def test_every_config_file_is_listed():
  # A new configs/*.py must be added to SIMPLE or COVERED_ELSEWHERE (with the test that builds it).
  files = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert files == set(SIMPLE) | set(COVERED_ELSEWHERE)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.hidden_size", 33, "model.hidden_size=33 is not divisible by model.num_heads=2"),
        ("data.image_size", 36, "data.image_size=36 is not divisible by model.patch_size=8"),
        (
            "data.name",
            "imagenet",
            "data.name='imagenet' is not a dataset; valid: ['arrayrecord', 'precomputed', 'shapes']",
        ),
        ("text.drop_to", "none", "text.drop_to='none'; valid: ('zeros', 'empty')"),
        ("train.global_batch_size", 0, "train.global_batch_size=0 must be positive"),
        ("train.nonfinite", "ignore", "train.nonfinite='ignore'; valid: ('halt', 'skip')"),
        ("sample.num_steps", 0, "sample.num_steps=0 must be positive"),
        ("sample.cfg_scale", -1.0, "sample.cfg_scale=-1.0 must be >= 0"),
        ("train.eval_every", -1, "train.eval_every=-1 must be >= 0"),
        ("sample.solver", "rk4", "sample.solver='rk4'; valid:"),
        ("model.dtype", "float16", "model.dtype='float16'; valid: ['bfloat16', 'float32']"),
        ("sharding.rules", "zero3", "sharding.rules='zero3' is not a preset"),
        ("flow.formulation", "rf/mode(3.00)", "flow.formulation"),
        ("model.pos_embed_max_size", 2, "larger than model.pos_embed_max_size=2"),
        # Every number finite and in range (config_lib.RANGES).
        ("optim.learning_rate", -1e-4, "optim.learning_rate=-0.0001 must be positive and finite"),
        ("optim.learning_rate", float("nan"), "optim.learning_rate=nan must be positive and finite"),
        ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be positive and finite"),
        ("optim.b1", 1.0, "optim.b1=1.0 must be in [0, 1)"),
        ("optim.b2", -0.1, "optim.b2=-0.1 must be in [0, 1)"),
        ("optim.eps", 0.0, "optim.eps=0.0 must be positive and finite"),
        ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0 and finite"),
        ("optim.grad_clip_norm", float("nan"), "optim.grad_clip_norm=nan must be >= 0 and finite"),
        ("optim.ema_decay", 1.0, "optim.ema_decay=1.0 must be in [0, 1)"),
        ("data.image_size", 0, "data.image_size=0 must be positive"),
        ("data.num_records", 0, "data.num_records=0 must be positive"),
        ("model.hidden_size", 0, "model.hidden_size=0 must be positive"),
        ("model.depth", 0, "model.depth=0 must be positive"),
        ("model.num_heads", -2, "model.num_heads=-2 must be positive"),
        ("model.patch_size", 0, "model.patch_size=0 must be positive"),
        ("model.mlp_ratio", float("nan"), "model.mlp_ratio=nan must be positive and finite"),
        ("text.width", 0, "text.width=0 must be positive"),
        ("text.depth", 0, "text.depth=0 must be positive"),
        ("text.num_heads", 0, "text.num_heads=0 must be positive"),
        ("text.max_length", 2, "text.max_length=2 must be >= 3"),
        ("flow.shift", 0.0, "flow.shift=0.0 must be positive and finite"),
        ("sample.cfg_scale", float("nan"), "sample.cfg_scale=nan must be >= 0 and finite"),
        ("sample.cfg_scale", float("inf"), "sample.cfg_scale=inf must be >= 0 and finite"),
        ("sample.shift", float("inf"), "sample.shift=inf must be positive and finite"),
        ("sample.num_steps", -3, "sample.num_steps=-3 must be positive"),
        ("train.peak_tflops_per_device", -1.0, "train.peak_tflops_per_device=-1.0 must be >= 0 and finite"),
    ],
)
def test_bad_values_fail_validation_with_the_value_named(field, value, message):
  from configs import debug  # pylint: disable=g-import-not-at-top

  config = debug.get_config()
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def test_val_loss_needs_held_out_shapes_records():
  from configs import debug  # pylint: disable=g-import-not-at-top

  config = debug.get_config()
  config.data.name, config.train.evaluators = "precomputed", ("val_loss",)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value) == (
      "train.evaluators=('val_loss',) includes 'val_loss', which scores held-out shapes records; "
      "data.name='precomputed' has none (remove it from train.evaluators)"
  )


@pytest.mark.parametrize("arch", ["mmdit", "dit", "crossdit", "uvit"])
def test_rq2_baseline_configs_build(arch):
  from configs import rq2_baselines  # pylint: disable=g-import-not-at-top

  config = rq2_baselines.get_config(f"arch={arch}")
  config_lib.validate(config)
  model = registry.build_model(config)
  assert type(model).__name__.lower() == arch
  jax.eval_shape(lambda: model.init(jax.random.key(0), *registry.dummy_inputs(config)))


def test_unknown_arch_is_rejected():
  from configs import debug  # pylint: disable=g-import-not-at-top

  config = debug.get_config()
  config.model.arch = "unet"
  with pytest.raises(config_lib.ConfigError, match=r"model.arch='unet'; valid: \['crossdit', 'dit', 'mmdit', 'uvit'\]"):
    config_lib.validate(config)
