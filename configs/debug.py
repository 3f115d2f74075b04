"""Debug: the smallest config that runs every code path (tests, smoke checks); trains nothing useful.

python -m rflow_jax.main --config=configs/debug.py --workdir=/tmp/rflow_debug
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = base.get_config()
  c.model.patch_size = 8
  c.model.hidden_size = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.pos_embed_max_size = 4
  c.text.width = 16
  c.text.depth = 1
  c.text.num_heads = 2
  c.text.max_length = 8
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 2
  c.train.global_batch_size = 4
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.eval_at_end = False
  c.sample.num_steps = 2
  c.sample.batch_size = 4
  c.sample.eval_per_kind = 2
  c.sample.grid_prompts = ("a red circle", "two blue squares")
  return c
