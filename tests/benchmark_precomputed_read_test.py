"""benchmarks/precomputed_read.py at a tiny size: it builds its own precomputed set, and its JSON line has every key
with positive rates."""

import importlib.util
import json
import pathlib

import pytest

from configs import shapes_latent

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("precomputed_read", ROOT / "benchmarks" / "precomputed_read.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # Renders, converts, precomputes and compiles a tiny train step: ~40-90 s on 2 cores.
def test_tiny_run_reports_every_rate(tmp_path):
  bench = _load_benchmark()
  config = shapes_latent.get_config("tiny")
  # The word-level stand-ins instead of the three SD3 architectures: the rates' plumbing is the same, and the test
  # builds no transformers tokenizers and compiles two encoders instead of three.
  config.text.encoders, config.text.max_length = "tiny", 8
  path = bench.build_set(config, str(tmp_path), num_images=16)
  result = json.loads(json.dumps(bench.measure(config, path, reads=20, batches=3, steps=2)))  # JSON-able.
  rates = (
      "raw_records_per_s",
      "source_records_per_s",
      "pipeline_batches_per_s",
      "delivered_batches_per_s",
      "delivered_records_per_s",
      "steps_per_s",
      "step_records_per_s",
      "ratio",
  )
  for key in rates:
    assert result[key] > 0, key
  assert result["num_records"] == 16 and result["global_batch"] == config.train.global_batch_size
  assert result["latent"]["shape"] == [16, 16, 4]  # 32 pixels through the tiny VAE (f=2, 4 channels).
  assert {"text_shapes", "worker_count", "step_compile_s", "load_average", "backend"} <= set(result)
