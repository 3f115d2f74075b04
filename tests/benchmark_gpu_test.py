"""benchmarks/gpu.py and launch/device_perf.sh on the CPU (--smoke): the one-GPU call's code, parts and JSON."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("gpu_benchmark", os.path.join(cli_util.ROOT, "benchmarks", "gpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(*args, **env):
  env = {**cli_util.ENV, **{k: str(v) for k, v in env.items()}}
  return subprocess.run(args, cwd=cli_util.ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_device_script_smoke_runs_every_part_in_its_own_process(tmp_path):
  parts = "rflow_jax,diffusers_eager,rflow_jax:blocked:full:unrolled"
  out, wheels = tmp_path / "out", tmp_path / "no_wheels"  # This machine's packages, not a checkout's .whl/.
  out.mkdir(), wheels.mkdir()
  proc = _run("bash", "launch/device_perf.sh", "--smoke", f"--parts={parts}", OUT=out, PY=sys.executable, WHEELS=wheels)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(x) for x in (out / "perf.json").read_text().splitlines()]
  assert [next(iter(x)) for x in lines[:3]] == parts.split(",")  # One line per part as it finishes, in order.
  result = lines[-1]
  flops = result["config"]["flops_per_step"]
  for side in ("rflow_jax", "diffusers_eager", "rflow_jax:blocked:full:unrolled"):
    r = result[side]
    assert r["step_s"] > 0 and math.isfinite(r["loss"]), r
    assert r["tflops"] == round(flops / r["step_s"] / 1e12, 2)
    assert r["mfu"] == round(flops / r["step_s"] / 1e12 / 989.0, 4)
  assert result["speedup_vs_eager"] == round(result["diffusers_eager"]["step_s"] / result["rflow_jax"]["step_s"], 3)
  variant = result["rflow_jax:blocked:full:unrolled"]
  assert (variant["attention_impl"], variant["remat"], variant["scan_blocks"]) == ("blocked", "full", False)
  assert result["diffusers_compile"] is None and result["shapes_gpu"] is None  # Not asked for.
  assert result["diffusers_eager"]["device"] == "cpu" and result["config"]["smoke"]
  assert "jax" in (out / "gpu.txt").read_text()  # The versions line.
  assert result["rflow_jax"]["dump"] == {"hlo": "hlo.txt.gz", "trace": "trace.json.gz (2 steps)"}
  with gzip.open(out / "dump" / "hlo.txt.gz", "rt") as f:
    assert f.read().startswith("HloModule jit_train_step")
  with gzip.open(out / "dump" / "trace.json.gz") as f:
    assert any(e.get("ph") == "X" for e in json.load(f)["traceEvents"])


def test_a_spent_budget_skips_the_remaining_parts_and_still_prints_the_summary():
  proc = _run(sys.executable, "benchmarks/gpu.py", "--smoke", "--budget_s=1", "--parts=rflow_jax,shapes")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["rflow_jax"] == {"error": "skipped: 1 s budget spent"}
  assert result["shapes_gpu"] == {"error": "skipped: 1 s budget spent"}
  assert result["config"]["variant"] == "d2"


def test_a_part_over_its_time_is_killed_and_reported():
  # The d2 smoke step needs >5 s (imports, init, compile) on any machine: 1 s is always too short.
  assert _load_benchmark().spawn("rflow_jax", ["--smoke"], timeout_s=1.0) == {"error": "timeout after 1 s"}


def test_an_unknown_part_is_one_error_line():
  proc = _run(sys.executable, "benchmarks/gpu.py", "--parts=rflow_jax,rflow_jax:flash:none")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "gpu.py: error: --parts: unknown part 'rflow_jax:flash:none'; expected "
      "rflow_jax,diffusers_eager,shapes,diffusers_compile or rflow_jax:ATTENTION:REMAT[:unrolled]"
  )
