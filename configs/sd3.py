"""SD3 pretraining recipe (Esser et al. 2024, §5.3.3): MM-DiT dN or a released preset on 256² images as latents.

  python launch/aot_compile.py --config=configs/sd3.py:d38 --mesh=data=1,fsdp=64,tensor=1 --device_memory_gb=80
  python launch/aot_compile.py --config=configs/sd3.py:sd3.5-medium --mesh=fsdp=64 --device_memory_gb=80

The arg is a variant of rflow_jax.model.variants.VARIANTS: the scaling family d15 … d38 (width 64·d, d heads of 64,
MLP 4·width; d2 … d14 exist for tests) or a released transformer: "sd3-medium" (d24, no qk-norm),
"sd3.5-medium" (d24, qk-norm, dual attention in blocks 0-12, 384² positional table), "sd3.5-large" (d38, qk-norm).
An optional "@512" or "@1024" trains at that resolution instead (64² / 128² latents, the centre 32² / 64² patch
positions of the table, timestep shift 3.0 as the paper's high-resolution models use).

Recipe: 256² images -> 32×32×16 VAE latents (f=8), 2×2 patches (256 image tokens), 77 + 77 text tokens, global
batch 4096, AdamW lr 1e-4 with 1000 linear warmup steps, bf16 compute with float32 params, RMS qk-norm (the
presets keep their own), rectified flow with logit-normal(0, 1) timesteps, 500k steps.

Memory defaults of the pod-scale variants (d15 and up, and the released ones; POD_DEFAULTS): blocks are scanned
(compile time flat in depth) and rematerialised with "dots_no_batch" (the block's matmul outputs are kept, the
attention and elementwise work is recomputed: ~1-2% more FLOPs, where "full" costs ~1/3 more), and the deepest
ones (d25 and up) accumulate gradients over 2 microbatches. Each fits the documented mesh of 64 devices
(fsdp=64, 64 examples per device) at 256² within 80 GB (H100) and so 95 GB (TPU v5p), with ≥ 20% headroom for
the XLA:CPU estimate's error (≤ 64 GB = 59.6 GiB; d30 at 1 microbatch would be ≈67 GiB, the d24 figure scaled);
per-device memory, XLA:CPU estimates of the first command (GiB; docs/scaling.md has every preset, resolution
and mesh):

  variant                    remat          microbatches  per-device GiB (XLA:CPU)
  d24                        dots_no_batch  1             42.7
  d15, d18, d21              dots_no_batch  1             not compiled (narrower and shallower than d24)
  sd3-medium                 dots_no_batch  1             not compiled (d24 without the qk-norm)
  sd3.5-medium               dots_no_batch  1             47.5
  d30                        dots_no_batch  2             33.9
  d38, sd3.5-large           dots_no_batch  2             53.4

Fine-tuning a released SD3.5 Medium with the "sd3.5-medium" preset (train.init_from=pipeline:D): docs/finetune.md.

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
from rflow_jax.model import variants  # pylint: disable=g-import-not-at-top,wrong-import-position

PAPER_DEPTHS = (15, 18, 21, 24, 30, 38)  # The scaling study's model sizes.
POD_MIN_DEPTH = 15  # dN with N >= 15 and the released presets get POD_DEFAULTS; smaller ones are for tests.
# (remat, microbatches) that fit 64 devices at 256² (module docstring), by depth: the first row whose depth bound
# is >= the model's depth applies.
POD_DEFAULTS = ((24, "dots_no_batch", 1), (38, "dots_no_batch", 2))
RESOLUTIONS = {256: 1.0, 512: 3.0, 1024: 3.0}  # Pixels -> timestep shift α (§5.3.2: α = 3.0 at high resolution).


def pod_defaults(depth: int) -> tuple[str, int]:
  """(model.remat, train.microbatches) of a pod-scale variant of `depth` blocks at 256² on 64 devices."""
  for bound, remat, microbatches in POD_DEFAULTS:
    if depth <= bound:
      return remat, microbatches
  raise ValueError(f"no pod defaults for depth {depth} (> {POD_DEFAULTS[-1][0]})")


def get_config(arg: str | None = None):
  """Returns the SD3 pretraining config of `arg` = variant[@resolution] (default "d24", resolution 256)."""
  name, _, res = (arg or "d24").partition("@")
  resolution = int(res) if res else 256
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution {res!r} in {arg!r}; valid: {sorted(RESOLUTIONS)}")
  c = base.get_config()
  c.model.update(variants.variant(name))  # depth, hidden_size, num_heads (+ the presets' table size, qk-norm, dual).
  if name.startswith("d"):
    c.model.pos_embed_max_size = 192  # SD3's table (center-cropped), so 512²/1024² finetunes load this checkpoint.
    c.model.qk_norm = "rms_norm"
  c.model.in_channels = 16  # SD3 VAE latents.
  c.model.patch_size = 2
  c.model.dtype = "bfloat16"
  c.data.image_size = resolution // 8  # Latent side (f=8 VAE): 32 at 256².
  c.text.max_length = 77  # Per encoder: 77 CLIP + 77 T5 context tokens, as in the paper.

  c.flow.formulation = "rf/lognorm(0.00,1.00)"  # The paper's best formulation.
  c.flow.shift = RESOLUTIONS[resolution]  # No timestep shift at 256².
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

  if not name.startswith("d") or c.model.depth >= POD_MIN_DEPTH:
    c.model.scan_blocks = True  # Compile time flat in depth.
    c.model.remat, c.train.microbatches = pod_defaults(c.model.depth)

  c.sharding.mesh_shape = (1, -1, 1)  # Pure fsdp over all devices; see docs/scaling.md for larger meshes.
  c.sharding.rules = "fsdp"
  return c


def sweep(add):
  """The scaling study: every paper depth at the same recipe."""
  for d in PAPER_DEPTHS:
    add(**{f"model.{k}": v for k, v in variants.variant(f"d{d}").items()})
