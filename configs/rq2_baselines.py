"""RQ2: MM-DiT against the DiT / CrossDiT / UViT backbones at matched parameter counts (SD3 §5.2.3).

  python -m rflow_jax.main --config=configs/rq2_baselines.py:arch=dit --workdir=runs/rq2_dit
  (arch = mmdit | dit | crossdit | uvit; everything but the backbone is configs/quickstart.py)

The backbones keep the MM-DiT's depth and change the width so that their trainable parameter counts (without the
fixed sin-cos `pos_embed` table) are within ±5% of the MM-DiT's. `MATCHED` below was produced by
`rflow_jax.model.param_matching.param_table` (jax.eval_shape only) and is re-checked by
tests/model_baselines_test.py:

  "quickstart": the quickstart MM-DiT (d=4, H=128, 2 heads; pixel space, text width 64), heads fixed at 2 so the
                width can move in steps of 4. MM-DiT 2,289,456 params; DiT 2,237,808 (−2.3%); CrossDiT 2,328,192
                (+1.7%); UViT 2,269,332 (−0.9%).
  "d24":        the paper-scale d=24 MM-DiT (H=1536, 16 latent channels, context 4096, pooled 2048, no qk-norm),
                head_dim fixed at 64 as in the SD3 family. MM-DiT 2,028,328,000; DiT 2,079,455,296 (+2.5%); CrossDiT
                1,974,589,504 (−2.6%); UViT 2,075,394,384 (+2.3%).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

ARCHS = ("mmdit", "dit", "crossdit", "uvit")

# scale -> arch -> the backbone's (depth, hidden_size, num_heads); the rest of config.model is shared.
MATCHED = {
    "quickstart": {
        "mmdit": dict(depth=4, hidden_size=128, num_heads=2),
        "dit": dict(depth=4, hidden_size=168, num_heads=2),
        "crossdit": dict(depth=4, hidden_size=156, num_heads=2),
        "uvit": dict(depth=4, hidden_size=200, num_heads=2),
    },
    "d24": {
        "mmdit": dict(depth=24, hidden_size=1536, num_heads=24),
        "dit": dict(depth=24, hidden_size=2176, num_heads=34),
        "crossdit": dict(depth=24, hidden_size=1920, num_heads=30),
        "uvit": dict(depth=24, hidden_size=2560, num_heads=40),
    },
}

# The MM-DiT each table matches (MMDiT constructor arguments besides depth/width/heads).
REFERENCE_KWARGS = {
    "quickstart": dict(
        patch_size=4,
        in_channels=3,
        mlp_ratio=4.0,
        qk_norm="rms_norm",
        pos_embed_max_size=8,
        context_dim=64,
        pooled_dim=64,
    ),
    "d24": dict(
        patch_size=2,
        in_channels=16,
        mlp_ratio=4.0,
        qk_norm=None,
        pos_embed_max_size=192,
        context_dim=4096,
        pooled_dim=2048,
    ),
}


def parse_arch(arg: str) -> str:
  """'arch=dit' or 'dit' (or '' for mmdit) -> 'dit'; errors name the bad value."""
  arch = arg.strip().removeprefix("arch=") or "mmdit"
  if arch not in ARCHS:
    raise ValueError(f"configs/rq2_baselines.py:{arg!r}: arch={arch!r} is not one of {list(ARCHS)}")
  return arch


def get_config(arg: str = "arch=mmdit"):
  """The quickstart run with the backbone `arch` at the quickstart MM-DiT's parameter count."""
  arch = parse_arch(arg)
  c = quickstart.get_config()
  c.model.arch = arch  # rflow_jax.model.registry.ARCHITECTURES key.
  for key, value in MATCHED["quickstart"][arch].items():
    setattr(c.model, key, value)
  return c


def sweep(add):
  """One run per backbone; everything else as in quickstart."""
  for arch in ARCHS:
    add(**{"model.arch": arch, **{f"model.{k}": v for k, v in MATCHED["quickstart"][arch].items()}})
