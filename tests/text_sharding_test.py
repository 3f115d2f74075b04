"""T5-XXL's parameters shard evenly under the fsdp and fsdp_tp presets (8 fake CPU devices, eval_shape only)."""

import json
import os
import subprocess
import sys

import pytest

import cli_util  # tests/cli_util.py (on sys.path under pytest, and as a script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run in a subprocess: the fake device count must be set before jax starts.
_SCRIPT = """
import json, flax.linen as nn, jax, jax.numpy as jnp
from rflow_jax.model.text import t5
from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib
from rflow_jax.train import trainer
model = t5.T5Encoder(t5.T5_V1_1_XXL, scan_layers=True)
ids = jnp.zeros((1, 77), jnp.int32)
out = {}
for name, shape in (("fsdp", (1, 8, 1)), ("fsdp_tp", (1, 2, 4))):
  mesh, rules = mesh_lib.make_mesh(shape), rules_lib.get_rules(name)
  with nn.logical_axis_rules(rules):
    abstract, _ = trainer.state_shardings(lambda k: model.init(k, ids)["params"], mesh, rules)
  partition.check_divisible(abstract)
  out[name] = [partition.total_bytes(abstract), partition.shard_bytes(abstract)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_t5_xxl_params_shard_over_8_devices():
  env = {
      **os.environ,
      "XLA_FLAGS": cli_util.xla_flags(8),
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT,
  }
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, (total, per_device) in result.items():
    assert total == 4 * 4_762_310_656, name  # float32 params of google/t5-v1_1-xxl's encoder.
    assert abs(per_device / (total / 8) - 1) < 0.05, (name, per_device, total / 8)
