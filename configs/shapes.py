"""Shapes: the quickstart task trained longer and wider, for quality (ShapesEval target >= 0.8).

  python -m rflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  (or: make train CONFIG=configs/shapes.py WORKDIR=runs/shapes)

Same data, text stack, formulation and width as the quickstart; depth 6, batch 64, 8000 steps (about 512k examples,
12x the quickstart). Estimated ~1 s/step on 2 idle cores, i.e. ~2.5 h; NOT yet run to completion (see the closing
note of the foundation issue for what was measured).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = quickstart.get_config()
  c.model.depth = 6
  c.optim.learning_rate = 7e-4
  c.optim.warmup_steps = 300
  c.optim.ema_decay = 0.999
  c.train.global_batch_size = 64
  c.train.num_steps = 8000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  return c
