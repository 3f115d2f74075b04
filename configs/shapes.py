"""Shapes: the quickstart task trained longer and at 2×2 patches, for quality (ShapesEval target >= 0.8).

  python -m rflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  (or: make train CONFIG=configs/shapes.py WORKDIR=runs/shapes)

Same data, text stack, width, depth and formulation as the quickstart, but 2×2 patches (256 image tokens instead of
64): at equal training compute smaller patches win (the DiT finding), and at 4×4 the samples stay visibly built of
4×4 blocks. One step of 32 examples takes ~1.2 s on 2 idle cores (3.4× the quickstart's), so 3600 steps (115k
examples) take ~75 min plus ~2 min per ShapesEval (every 1200 steps, logged to metrics.jsonl with the step).
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
