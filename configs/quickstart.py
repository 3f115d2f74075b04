"""Quickstart: a text-to-image MM-DiT trained on the built-in `shapes` set in pixel space, on a laptop CPU (~10 min).

  python -m rflow_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  (or simply: make train)

32×32 RGB, 4×4 patches (64 image tokens + 32 text tokens), width 256, depth 4.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = base.get_config()
  c.model.patch_size = 4
  c.model.hidden_size = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.pos_embed_max_size = 8
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.ema_decay = 0.995
  c.train.global_batch_size = 64
  c.train.num_steps = 1500
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.text.drop_prob = 0.2
  return c
