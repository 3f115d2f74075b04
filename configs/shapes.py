"""Shapes: the quickstart task trained longer and wider, for quality (ShapesEval target >= 0.8).

  python -m rflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  (or: make train CONFIG=configs/shapes.py WORKDIR=runs/shapes)

Same data, text stack and formulation as the quickstart; width 192, depth 6, batch 128, 6000 steps.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = quickstart.get_config()
  c.model.hidden_size = 192
  c.model.depth = 6
  c.model.num_heads = 3
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 300
  c.optim.ema_decay = 0.999
  c.train.global_batch_size = 128
  c.train.num_steps = 6000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  return c
