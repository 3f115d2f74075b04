"""benchmarks/vs_diffusers.py --quick: its JSON line has the promised keys, and both sides computed the same loss."""

import importlib.util
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# fp32, same weights, same (z_t, t, target, context, pooled): the two losses differ only by summation order.
LOSS_RTOL = 1e-5


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("vs_diffusers", ROOT / "benchmarks" / "vs_diffusers.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_quick_run_reports_every_key_and_the_same_loss(capsys):
  threads = torch.get_num_threads()
  try:
    # In-process: "system" keeps this test worker's malloc as it is (host_memory_test covers "reuse").
    _load_benchmark().main(["--quick", "--threads=1", "--malloc=system"])
  finally:
    torch.set_num_threads(threads)  # The benchmark sets it; later tests in this worker keep theirs.
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(result["train_step"]) == {
      "rflow_jax_s",
      "diffusers_eager_s",
      "diffusers_compile_s",
      "speedup_vs_eager",
      "speedup_vs_compile",
      "rflow_jax_gflops",
      "peak_fraction",
  }
  assert set(result["sampling"]) == {
      "rflow_jax_s",
      "diffusers_eager_s",
      "diffusers_compile_s",
      "speedup_vs_eager",
      "speedup_vs_compile",
      "rflow_jax_gflops",
      "peak_fraction",
  }
  # --quick skips torch.compile, so the "no slower than torch.compile" goal is absent.
  assert set(result["goals"]) == {"train_1.25x_eager", "train_peak_fraction_0.7", "sampling_1.5x_eager"}
  peak = result["matmul_gflops"]["xla"]
  eager = result["train_step"]["diffusers_eager_s"]
  assert result["goals"]["train_1.25x_eager"]["met"] == (eager / result["train_step"]["rflow_jax_s"] >= 1.25)
  needed = result["flops_per_step"] / (eager / 1.25) / 1e9 / peak
  assert result["goals"]["train_1.25x_eager"]["needs_peak_fraction"] == pytest.approx(needed, abs=2e-3)
  assert set(result["matmul_gflops"]) == set(result["matmul_gflops_end"]) == {"xla", "torch"}
  assert result["threads"] == 1 and result["config"]["quick"] and result["host_malloc"] == "system"
  for section in ("train_step", "sampling"):
    assert result[section]["rflow_jax_s"] > 0 and result[section]["diffusers_eager_s"] > 0
  assert result["train_step"]["peak_fraction"] > 0
  assert result["loss"]["rflow_jax"] == pytest.approx(result["loss"]["diffusers"], rel=LOSS_RTOL)
  assert result["sample_shape"] == [2, 32, 32, 3]
