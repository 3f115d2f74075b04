"""Shapes: the quickstart task trained longer and at 2×2 patches, for quality (ShapesEval target >= 0.8).

  python -m rflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  (or: make train CONFIG=configs/shapes.py WORKDIR=runs/shapes)

Same data, text stack, width, depth and formulation as the quickstart, but 2×2 patches (256 image tokens instead of
64): at equal training compute smaller patches win (the DiT finding), and at 4×4 the samples stay visibly built of
4×4 blocks. One step of 32 examples takes ~1.2 s on 2 idle cores (3.4× the quickstart's).

Recipe: 20000 steps (640k examples, batch 32, cosine to 0, ShapesEval every 2000 steps; ~7.2 h on 2 cores, resumed
across sittings by running `make train` again), sampled with `euler_stochastic`; then stage 2,
`--config=configs/shapes.py:grow --workdir=runs/shapes_grow`, grows that run to 6 blocks and trains 2800 more steps
(~9 h for both stages). Result: ShapesEval 0.81 over 600 fresh prompts (standard error ~0.016). The scores along the
way, per seed and per sampler, and why the rest fail: docs/results/shapes.md.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "cpu"):
  """arg "cpu": the recipe measured above. "gpu" (`--config=configs/shapes.py:gpu`): the same task for one H100/H200,
  where an example costs far less: a 2x wider, 1.5x deeper model (~6x the parameters), batch 256, bf16, and grain
  worker processes to keep it fed.
  launch/device_shapes.sh times its step and sizes train.num_steps to the time the call has."""
  if arg not in ("cpu", "grow", "gpu"):
    raise ValueError(f"configs/shapes.py:{arg}: valid variants are 'cpu', 'grow' and 'gpu'")
  c = quickstart.get_config()
  c.model.patch_size = 2
  c.model.pos_embed_max_size = 16  # The 16×16 patch grid of a 32² image.
  c.optim.warmup_steps = 200
  c.train.num_steps = 20000
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.sample_every = 2000
  c.train.eval_every = 2000
  # Re-noising Euler for every sample and eval of this config: an undertrained model's ODE carries its early
  # mistakes (an edge drawn twice, an object begun twice) to the image; fresh noise each step lets later steps redraw
  # them. At step 20000: 0.79 vs Euler's 0.62 over the same 600 prompts (README; rflow_jax/sampling/solvers.py).
  c.sample.solver = "euler_stochastic"
  if arg == "grow":
    # Stage 2 on the CPU: the finished 20000-step run, grown from 4 to 6 joint blocks (the 2 new ones start as
    # identity, so training starts at the run's loss) and trained 2800 more steps at a fresh cosine from 3e-4.
    # More steps of the 4-block model did not help (README); the added depth is what this stage buys.
    c.model.depth = 6
    c.train.init_from = "runs/shapes"  # Stage 1's workdir (override if yours differs).
    c.train.init_grow_depth = True
    c.train.num_steps = 2800
    c.optim.learning_rate = 3e-4
    c.train.eval_every = 0  # ShapesEval at the end only.
    c.train.sample_every = 1000
    c.seed = 1  # A data order apart from stage 1's.
  if arg == "gpu":
    c.model.hidden_size = 256
    c.model.num_heads = 4  # head_dim 64, as in SD3.
    c.model.depth = 6
    c.model.dtype = "bfloat16"
    c.train.global_batch_size = 256
    c.optim.learning_rate = 5e-4  # Half the width-128 rate: Adam's best rate falls ~1/width for hidden matrices.
    c.optim.warmup_steps = 500
    c.optim.ema_decay = 0.999
    c.data.worker_count = 12  # One process makes ~2k examples/s; the GPU takes several times that.
    c.train.num_steps = 8000
    c.train.log_every = 200
    c.train.checkpoint_every = 2000  # Samples and ShapesEval: every 2000 steps, as on the CPU.
  return c
