"""Shapes: the quickstart task trained longer and at 2×2 patches, for quality (ShapesEval target >= 0.8).

  python -m rflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  (or: make train CONFIG=configs/shapes.py WORKDIR=runs/shapes)

Same data, text stack, width, depth and formulation as the quickstart, but 2×2 patches (256 image tokens instead of
64): at equal training compute smaller patches win (the DiT finding), and at 4×4 the samples stay visibly built of
4×4 blocks. One step of 32 examples takes ~1.2 s on 2 idle cores (3.4× the quickstart's).

Measured 2026-11-26 (2-core machine, partly shared): 3600 steps in 92 min; ShapesEval overall 0.08 / 0.12 / 0.13
at steps 1200 / 2400 / 3600 (single 0.23 / 0.35 / 0.40, position and counting 0): far below the 0.8 target. The
high-noise loss (t in [0.75, 1], where layouts are decided) stops improving after ~1800 steps; see the closing
note of the foundation issue for what to try next.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  c = quickstart.get_config()
  c.model.patch_size = 2
  c.model.pos_embed_max_size = 16  # The 16×16 patch grid of a 32² image.
  c.optim.warmup_steps = 200
  c.train.num_steps = 3600
  c.train.log_every = 100
  c.train.checkpoint_every = 600
  c.train.sample_every = 600
  c.train.eval_every = 1200
  return c
