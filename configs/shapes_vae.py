"""Shapes VAE: a small f=4 KL autoencoder with 8 latent channels trained on 64×64 `shapes` images, on the CPU.

  python -m rflow_jax.main --config=configs/shapes_vae.py --workdir=runs/shapes_vae
  python -m rflow_jax.export.latent_stats --vae=runs/shapes_vae --out=runs/shapes_vae_export

The SD VAE's architecture (same blocks, mid-block attention, GroupNorm) at widths (16, 32, 64), one res block per
level: 64×64×3 images become 16×16×8 latents (a 6x compression). Trained with L1 + KL only (the PatchGAN and the
perceptual hook are off: flat-coloured shapes have no texture for them to restore, and each would cost CPU time).
The "vae_recon" evaluation reconstructs 60 held-out scenes and scores PSNR, SSIM and ShapesEval of reconstructions
against the originals (docs/vae.md has the numbers and the wall time).

`:tiny` is the same task at the smallest size that runs every code path (the tests use it).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "cpu"):
  """arg "cpu": the run measured in docs/vae.md; "tiny": a seconds-long smoke configuration (32², f=2)."""
  if arg not in ("cpu", "tiny"):
    raise ValueError(f"configs/shapes_vae.py:{arg}: valid variants are 'cpu' and 'tiny'")
  c = base.get_config()
  c.task = "vae"
  c.data.image_size = 64
  c.vae.block_out_channels = (16, 32, 64)
  c.vae.layers_per_block = 1
  c.vae.norm_num_groups = 8
  c.vae.latent_channels = 8
  c.vae.scaling_factor = 1.0  # Measured after training (latent_stats) and written into the export.
  c.vae.shift_factor = 0.0
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.ema_decay = 0.999
  c.train.global_batch_size = 8
  c.train.num_steps = 3200  # Its reconstructions keep the originals' ShapesEval (60 of 60); 800 kept 58.
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.train.sample_every = 400
  c.train.evaluators = ("vae_recon",)  # PSNR, SSIM and ShapesEval of reconstructions against the originals.
  if arg == "tiny":
    c.data.image_size = 32
    c.vae.block_out_channels = (8, 8)
    c.vae.norm_num_groups = 4
    c.vae.latent_channels = 4
    c.vae.eval_per_kind = 2
    c.vae.preview_examples = 2
    c.optim.warmup_steps = 1
    c.optim.decay = "constant"  # A shorter run is a prefix of a longer one (the resume test relies on it).
    c.train.global_batch_size = 4
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.sample_every = 0
    c.train.eval_at_end = False
  return c
