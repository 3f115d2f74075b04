"""launch/aot_compile.py on a small SD3 config, the SD3 config family, and the FLOP accounting behind MFU."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd3
from rflow_jax import config_lib
from rflow_jax.model import mmdit
from rflow_jax.model import registry
from rflow_jax.model import variants
from rflow_jax.utils import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(*args):
  # The suite's XLA_FLAGS (conftest.py's cheaper CPU code generation) pass through: aot_compile.py appends its fake
  # device count to them.
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "aot_compile.py"), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


@pytest.mark.slow
def test_aot_compile_of_scanned_model_reports_memory_and_flops():
  # d3 scans blocks 0-1 as one group: the trainer's Setup, shardings and step all handle stacked block params.
  # (Bad mesh/batch values fail in config_lib.validate first: tests/sharding_mesh_test.py.)
  proc = _aot(
      "--config=configs/sd3.py:d3",
      "--mesh=data=1,fsdp=4,tensor=1",
      "--config.train.global_batch_size=8",
      "--config.model.scan_blocks=True",
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  config = sd3.get_config("d3")
  s = config.data.image_size
  model = mmdit.MMDiT(**{**registry.model_kwargs(config), "scan_blocks": True})
  assert report["params"] == variants.count_params(
      model, (1, s, s, 16), (1, 154, config.text.width), (1, config.text.width)
  )
  assert report["params_sd3_text_dims"] == report["params"] + (4096 + 2048 - 2 * config.text.width) * 192
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["devices"] == 4
  assert report["global_batch"] == 8
  assert report["model"]["scan_blocks"] and report["model"]["remat"] == "none"
  memory = report["memory_analysis"]
  # The state is donated: it is an argument and an output, counted once through the alias.
  assert memory["alias"] == report["state_bytes_per_device"]
  assert memory["argument"] > report["state_bytes_per_device"]  # + the batch shard
  assert report["per_device_memory_bytes"] == sum(memory[k] for k in ("argument", "output", "temp")) - memory["alias"]
  assert report["per_device_memory_bytes"] > report["state_bytes_per_device"]
  # XLA counts the scanned loop body once: 2 of the 3 blocks' work is in one iteration.
  assert 0.4 < report["flops_per_step"] / report["analytic_flops_per_step"] < 1.0
  assert report["compile_seconds"] > 0


@pytest.mark.parametrize("name", ["d15", "d24", "d38", "sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_sd3_configs_validate_with_the_paper_recipe(name):
  config = sd3.get_config(name)
  config_lib.validate(config)
  assert config.train.global_batch_size == 4096 and config.optim.learning_rate == 1e-4
  assert config.optim.warmup_steps == 1000 and config.model.dtype == "bfloat16"
  assert (config.data.image_size, config.model.in_channels, config.model.patch_size) == (32, 16, 2)
  assert config.model.hidden_size == 64 * config.model.depth
  assert config.model.qk_norm == (None if name == "sd3-medium" else "rms_norm")
  assert config.model.dual_attention_layers == (tuple(range(13)) if name == "sd3.5-medium" else ())


@pytest.mark.parametrize("name, billions", [("d24", 2.03), ("d38", 8.06)])
def test_sd3_param_counts_match_the_paper_with_real_text_widths(name, billions):
  config = sd3.get_config(name)
  model = mmdit.MMDiT(**registry.model_kwargs(config))
  n = variants.count_params(model, (1, 32, 32, 16), (1, 154, 4096), (1, 2048), include_pos_embed=False)
  assert abs(n / 1e9 - billions) < 0.005, n


def test_sweep_covers_the_paper_depths():
  added = []
  sd3.sweep(lambda **kw: added.append(kw))
  assert [a["model.depth"] for a in added] == list(sd3.PAPER_DEPTHS)
  assert all(a["model.hidden_size"] == 64 * a["model.depth"] for a in added)


def test_forward_flops_formula_matches_xla_cost_analysis():
  h, depth, t, l = 256, 2, 64, 32
  model = mmdit.MMDiT(
      patch_size=2,
      in_channels=4,
      hidden_size=h,
      depth=depth,
      num_heads=4,
      context_dim=32,
      pooled_dim=48,
      pos_embed_max_size=8,
      qk_norm="rms_norm",
  )
  args = (jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, l, 32)), jnp.zeros((1, 48)))
  params = jax.eval_shape(model.init, jax.random.key(0), *args)
  xla = jax.jit(model.apply).lower(params, *args).compile().cost_analysis()["flops"]
  ours = flops.forward_flops_per_example(
      hidden_size=h,
      depth=depth,
      mlp_ratio=4.0,
      image_tokens=t,
      context_tokens=l,
      patch_features_in=16,
      patch_features_out=16,
      context_dim=32,
      pooled_dim=48,
  )
  assert ours["total"] == ours["matmul"] + ours["attention"]
  # XLA also counts elementwise work (norms, GELU, softmax): a few percent more than the matmuls alone.
  assert 1.0 < xla / ours["total"] < 1.05, (xla, ours)


def test_train_flops_are_3x_forward_and_close_to_3_params_tokens_for_sd3():
  config = sd3.get_config("d24")
  step = flops.train_flops_per_step(config)
  blocks = 24 * (2 * (4 + 2 * 4) * 1536**2)  # Token matmul weights of both streams (no modulation, embedders).
  tokens, joint = 32 // 2 * 32 // 2, 256 + 154
  # Each stream's weights see only their tokens: 6 · (N/2) · (T + L) plus attention 12 · depth · N² · H.
  approx = 4096 * (3 * blocks * joint + 12 * 24 * joint**2 * 1536)
  assert tokens == 256
  assert abs(step / approx - 1) < 0.03, step / approx
  config.model.arch = "dit"
  assert flops.train_flops_per_step(config) is None


def test_throughput_meter_skips_the_compile_window_and_reports_mfu():
  meter = flops.ThroughputMeter(flops_per_step=4e12, num_devices=4, peak_tflops_per_device=100.0)
  assert not meter.measure(10)  # First window: includes compilation.
  time.sleep(0.05)
  out = meter.measure(10)
  assert 0 < out["tflops_per_device"] < 4e12 * 10 / 0.05 / 4 / 1e12
  np.testing.assert_allclose(out["mfu"], out["tflops_per_device"] / 100.0)
  assert not flops.ThroughputMeter(None, 4).measure(1)
