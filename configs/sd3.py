"""SD3 pretraining recipe (Esser et al. 2024, §5.3.3): MM-DiT dN or a released preset on 256² images as latents.

  python launch/aot_compile.py --config=configs/sd3.py:d38 --mesh=data=1,fsdp=64,tensor=1
  python launch/aot_compile.py --config=configs/sd3.py:sd3.5-medium --mesh=fsdp=8 --config.model.remat=full

The arg is a variant of rflow_jax.model.mmdit.VARIANTS: the scaling family d15 … d38 (width 64·d, d heads of 64,
MLP 4·width; d2 … d14 exist for tests) or a released transformer: "sd3-medium" (d24, no qk-norm),
"sd3.5-medium" (d24, qk-norm, dual attention in blocks 0-12, 384² positional table), "sd3.5-large" (d38, qk-norm).

Recipe: 256² images -> 32×32×16 VAE latents (f=8), 2×2 patches (256 image tokens), 77 + 77 text tokens, global
batch 4096, AdamW lr 1e-4 with 1000 linear warmup steps, bf16 compute with float32 params, RMS qk-norm (the
presets keep their own), rectified flow with logit-normal(0, 1) timesteps, 500k steps.

Training with this config needs a pre-encoded latent source (VAE latents + text embeddings) in
rflow_jax/data/registry.py, which rflow_jax does not have yet; until then the config serves AOT compilation and
capacity planning (launch/aot_compile.py needs no data). The text stack is the tiny stand-in (config.text.width
64): the real CLIP/T5 widths (context 4096, pooled 2048) would add (4096 - 64 + 2048 - 64) · H parameters in the
context and pooled embedders (d24: 9.2M = 0.45%; d38: 14.6M = 0.18%), which aot_compile.py reports separately.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.model import mmdit  # pylint: disable=g-import-not-at-top,wrong-import-position

PAPER_DEPTHS = (15, 18, 21, 24, 30, 38)  # The scaling study's model sizes.


def get_config(arg: str | None = None):
  """Returns the SD3 pretraining config of variant `arg` (default "d24")."""
  name = arg or "d24"
  c = base.get_config()
  c.model.update(mmdit.variant(name))  # depth, hidden_size, num_heads (+ the presets' table size, qk-norm, dual).
  if name.startswith("d"):
    c.model.pos_embed_max_size = 192  # SD3's table (center-cropped), so 512²/1024² finetunes load this checkpoint.
    c.model.qk_norm = "rms_norm"
  c.model.in_channels = 16  # SD3 VAE latents.
  c.model.patch_size = 2
  c.model.dtype = "bfloat16"
  c.data.image_size = 32  # Latent side: 256² pixels / 8.
  c.text.max_length = 77  # Per encoder: 77 CLIP + 77 T5 context tokens, as in the paper.

  c.flow.formulation = "rf/lognorm(0.00,1.00)"  # The paper's best formulation.
  c.flow.shift = 1.0  # No timestep shift at 256².
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.decay = "constant"

  c.train.global_batch_size = 4096
  c.train.num_steps = 500_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.eval_at_end = False  # ShapesEval scores the built-in shapes task only.
  c.sample.batch_size = 8

  c.sharding.mesh_shape = (1, -1, 1)  # Pure fsdp over all devices; see docs/scaling.md for larger meshes.
  c.sharding.rules = "fsdp"
  return c


def sweep(add):
  """The scaling study: every paper depth at the same recipe."""
  for d in PAPER_DEPTHS:
    add(**{f"model.{k}": v for k, v in mmdit.variant(f"d{d}").items()})
