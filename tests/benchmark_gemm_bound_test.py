"""benchmarks/gemm_bound.py: the step's dense products as the model has them, and its JSON line."""

import importlib.util
import json
import pathlib

import pytest
import torch

from rflow_jax.utils import flops

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gemm_bound", ROOT / "benchmarks" / "gemm_bound.py")
gemm_bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemm_bound)


def test_dense_products_are_the_models_token_matmuls_three_times():
  depth, width, batch, image_tokens, text_tokens = 8, 512, 8, 256, 32
  products = gemm_bound.dense_products(depth, width, 4 * width, batch * image_tokens, batch * text_tokens)
  # Per stream and block: qkv, proj, fc1, fc2, each forward + 2 gradients; the last block's text stream: qkv only.
  assert sum(products.values()) == 3 * (4 * depth + 4 * (depth - 1) + 1)
  assert products[(2048, 512, 1536, "weight_grad")] == depth
  assert products[(256, 512, 1536, "input_grad")] == depth
  assert products[(256, 2048, 512, "forward")] == depth - 1
  assert products[(2048, 2048, 512, "forward")] == depth
  # Against rflow_jax.utils.flops' count of the whole model (3x its forward matmuls): what is left out, the adaLN
  # modulations and the embedders, is a few percent at this size.
  forward = flops.forward_flops_per_example(
      hidden_size=width,
      depth=depth,
      mlp_ratio=4.0,
      image_tokens=image_tokens,
      context_tokens=text_tokens,
      patch_features_in=12,
      patch_features_out=12,
      context_dim=64,
      pooled_dim=64,
  )
  share = gemm_bound.product_flops(products) / (3 * batch * forward["matmul"])
  assert 0.97 < share < 1.0


@pytest.mark.slow
def test_quick_run_reports_both_sides_and_consistent_differences(capsys):
  threads = torch.get_num_threads()
  try:
    gemm_bound.main(["--quick", "--threads=1", "--malloc=system", "--train_reps=2"])
  finally:
    torch.set_num_threads(threads)  # The benchmark sets it; later tests in this worker keep theirs.
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  sides = {"rflow_jax", "diffusers"}
  for key in ("step_s", "bound_s", "dense_s", "attention_s", "outside_matmul_s", "dense_gflops"):
    assert set(result[key]) == sides, key
  for side in sides:
    assert result["dense_s"][side] > 0 and result["attention_s"][side] > 0
    assert result["bound_s"][side] == pytest.approx(result["dense_s"][side] + result["attention_s"][side], rel=1e-3)
    by_kind = result["dense_by_kind_s"][side]
    assert set(by_kind) == {"forward", "input_grad", "weight_grad"}
    assert sum(by_kind.values()) == pytest.approx(result["dense_s"][side], rel=1e-3)
    assert result["outside_matmul_s"][side] == pytest.approx(
        result["step_s"][side] - result["bound_s"][side], abs=1e-4 * result["step_s"][side]
    )
  eager, ours = result["step_s"]["diffusers"], result["step_s"]["rflow_jax"]
  assert result["speedup_vs_eager"] == pytest.approx(eager / ours, rel=2e-3)
  assert result["for_1_25x_eager"]["step_s"] == pytest.approx(eager / 1.25, rel=1e-3)
  # --quick: depth 2, width 64, 64 image tokens, 32 text tokens, batch 2; every token product is timed.
  assert result["config"]["depth"] == 2 and result["config"]["image_tokens"] == 64 and result["config"]["quick"]
  assert result["dense_products"] > 0 and 0.5 < result["dense_flop_share"] <= 1.0
  assert result["threads"] == 1 and result["host_malloc"] == "system"
