"""Shapes in latent space: the SD3 split of work (a convolutional VAE for local detail, the MM-DiT for layout) in
miniature, end to end on the CPU.

  bash launch/shapes_latent.sh     # every step below, each skipped when its output exists

  python -m launch.shapes_folder --out=data/shapes_latent/images --num_records=10000         # 64x64 PNG + captions
  python -m rflow_jax.data.convert --format=imagefolder --input=data/shapes_latent/images \
      --out=data/shapes_latent/converted
  python -m rflow_jax.precompute --config=configs/shapes_latent.py:precompute --out=data/shapes_latent/latents \
      --config.vae.path=runs/shapes_vae_export      # the shapes VAE (docs/vae.md), exported with its shift/scale
  python -m rflow_jax.main --config=configs/shapes_latent.py --workdir=runs/shapes_latent
  python -m rflow_jax.eval.run_shapes --workdir=runs/shapes_latent   # samples decode through the VAE

64×64 images become 16×16×8 latents (the shapes VAE: f=4, 8 channels); 2×2 latent patches give the quickstart's 64
image tokens, each covering 8×8 pixels instead of 4×4. The text encoders are SD3's three architectures at tiny size
(CLIP-L, CLIP-G, T5; random frozen weights), precomputed once: 77 CLIP + 16 T5 context tokens. The MM-DiT is the
quickstart's (width 128, depth 4, the same 1300 steps × 32, optimiser, timestep shift and sampler); its step costs
1.41× the pixel step here (the 77 CLIP tokens: 157 tokens against 96). The trainer's "shapes" evaluator scores the
built-in shapes data only, so run_shapes scores the finished run (120 fresh prompts, EMA weights, 25 Euler steps,
CFG 3).

Result (2-core machine, docs/results/shapes.md "Latent space at equal wall time"): ShapesEval 0.050 (single 0.15)
against the pixel quickstart's 0.033 (0.10) run the same day, with 1.41× its training time; 0.008 at 620 steps
(0.67× its time). At equal time no better than pixel space, and the VAE (~38 min) and the precompute (~10 min for
10k images) come first: `make train` stays in pixel space. The samples are smooth, colour-correct blobs (no 4×4
blocks) but too large and without corners.

Variants: "cpu" (default) trains; "precompute" is the same text stack and VAE with the converted 64×64 images as
data (what `python -m rflow_jax.precompute` reads); "tiny" is the smallest size that runs every path (tests,
benchmarks/precomputed_read.py's self-check), with a tiny VAE architecture (f=2) for a random stand-in.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

DATA = "data/shapes_latent"  # Where launch/shapes_latent.sh writes images/, converted/ and latents/.


def get_config(arg: str = "cpu"):
  """arg "cpu": the run measured in docs/results/shapes.md; "precompute": its encoding job; "tiny": a smoke size."""
  if arg not in ("cpu", "precompute", "tiny"):
    raise ValueError(f"configs/shapes_latent.py:{arg}: valid variants are 'cpu', 'precompute' and 'tiny'")
  c = quickstart.get_config()
  # The shapes VAE's architecture (configs/shapes_vae.py). Training reads the VAE from vae.path or the records'
  # manifest; these fields size the random stand-in of benchmarks/precomputed_read.py.
  c.vae.block_out_channels = (16, 32, 64)
  c.vae.layers_per_block = 1
  c.vae.norm_num_groups = 8
  c.vae.latent_channels = 8
  c.text.encoders = "sd3"
  c.text.t5_length = 16  # The longest shapes caption is 11 T5 tokens; SD3's 256 would be 94% padding here.
  c.data.name = "precomputed"
  c.data.path = f"{DATA}/latents"
  c.data.image_size = 16  # The latent side: 64 pixels / the VAE's factor 4.
  c.model.in_channels = 8
  c.model.patch_size = 2
  c.model.pos_embed_max_size = 8  # The 8×8 patch grid.
  c.precompute.batch_size = 64  # Images per encoder call: fewer, larger calls on the CPU.
  c.train.evaluators = ()  # ShapesEval runs after training (run_shapes), see the docstring.
  if arg == "tiny":
    c.vae.block_out_channels = (8, 8)
    c.vae.norm_num_groups = 4
    c.vae.latent_channels = 4
    c.model.in_channels = 4
    c.model.hidden_size = 32
    c.model.depth = 1
    c.text.width = 16
    c.text.depth = 1
    c.text.t5_length = 4
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.precompute.batch_size = 8
    c.sample.num_steps = 2
    c.sample.batch_size = 4
    c.sample.eval_per_kind = 2
    c.data.image_size = 16  # 32 pixels / f=2.
  if arg == "precompute":
    c.data.name = "arrayrecord"
    c.data.path = f"{DATA}/converted"
    c.data.image_size = 64  # Pixels: precompute resizes and crops to this side, then encodes.
  return c
