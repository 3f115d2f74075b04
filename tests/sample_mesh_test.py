"""`sample --pipeline` on several devices: the weights split over 4 fake CPU devices give the one-device images."""

import json
import os
import subprocess
import sys

import pytest

import cli_util  # tests/cli_util.py (on sys.path under pytest, and as a script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_PARITY = 1e-5  # max |4 devices - 1 device| on [0, 1] pixels, fp32 (reduction order only).

_SCRIPT = """
import json, sys
import jax
import numpy as np
import pipeline_util as pu
from rflow_jax import rundir

path = sys.argv[1]
pu.tiny_diffusers_pipeline(path)
sampler, params, text_params, components = rundir.load_pipeline_sampler(path, steps=3, cfg=4.0)
noise = pu.latents()
one = pu.ours(sampler, params, text_params, noise, pu.NEGATIVE)  # Host weights: the default device.
params, text_params, mesh = rundir.shard_pipeline(components, params, text_params)
split = lambda tree: sum(1 for x in jax.tree.leaves(tree) if not x.sharding.is_fully_replicated)
many = pu.ours(sampler, params, text_params, noise, pu.NEGATIVE)
print(json.dumps({
    "devices": int(mesh.devices.size), "split": [split(params), split(text_params)],
    "leaves": [len(jax.tree.leaves(params)), len(jax.tree.leaves(text_params))],
    "max_diff": float(np.abs(one - many).max()), "spread": pu.spread(one),
}))
"""


@pytest.mark.slow
def test_pipeline_sampled_over_4_devices_equals_one_device(tmp_path):
  env = {
      **os.environ,
      "XLA_FLAGS": cli_util.xla_flags(4),
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  }
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(tmp_path / "D")],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
      cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print(result)
  assert result["devices"] == 4
  # Most weights are split (the widths the tiny models have that 4 divides), the rest replicated.
  assert all(s > leaves // 2 for s, leaves in zip(result["split"], result["leaves"])), result
  assert result["max_diff"] <= MESH_PARITY, result
