"""Parity of our text encoders and SD3 conditioning with transformers / diffusers, as the tests build them.

Measures the largest relative error (max |ours − theirs| / max |theirs|, fp32 on CPU) over every hidden state and the
pooled output of each tiny random encoder of tests/text_clip_test.py and tests/text_t5_test.py, and over the prompt,
negative and pooled embeddings of tests/text_sd3_test.py's tiny StableDiffusion3Pipeline. The last line printed is
one JSON object.

  PYTHONPATH=$PWD python benchmarks/text_parity.py
"""

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # The tests' builders are the reference setups.

import text_clip_test  # pylint: disable=g-import-not-at-top,wrong-import-position
import text_sd3_test  # pylint: disable=g-import-not-at-top,wrong-import-position
import text_t5_test  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  result = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("plain", "projected"):
      path = os.path.join(tmp, f"clip_{name}")
      result[f"clip_{name}"] = text_clip_test.parity(text_clip_test.save_clip(path, name), path)
    for proj in ("gated-gelu", "relu"):
      path = os.path.join(tmp, f"t5_{proj}")
      result[f"t5_{proj}"] = text_t5_test.parity(text_t5_test.save_t5(path, proj), path)
    path = os.path.join(tmp, "sd3")
    pipe = text_sd3_test.build_pipeline(path)
    result["sd3_encode_prompt"] = text_sd3_test.parity(pipe, path, use_t5=True)
    result["sd3_encode_prompt_t5_off"] = text_sd3_test.parity(pipe, path, use_t5=False)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
