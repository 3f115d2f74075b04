"""The scaling study (SD3 §5.3.3): the MM-DiT depth ladder, the paper's recipe, validation loss against compute.

Plan, run and collect a sweep, then fit (docs/results/scaling.md has the CPU study):
  python launch/sweep.py --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu --dry_run
  python launch/sweep.py --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu
  python launch/sweep.py collect --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu --out=scaling.csv
  python -m rflow_jax.scaling.fit --csv=scaling.csv --plots=docs/results
One run of the ladder: python -m rflow_jax.main --config=configs/scaling.py:cpu --workdir=runs/d4

Variants (the arg after the colon):
  "dN" (default "d24"), "pod": the paper's family on 256² latents: width 64·d, d heads of 64, 2×2 patches, RMS
      QK-norm, AdamW 1e-4 with 1000 linear warmup steps, rf/lognorm(0.00,1.00), batch 4096, bf16, pure fsdp
      (configs/sd3.py), plus the validation-loss protocol every 50k steps. The sweep covers d15 … d38.
  "cpu": the same family shrunk to train in minutes on 2 shared CPU cores on the built-in shapes set (32² pixels):
      the width rule 64·d becomes CPU_HEAD_DIM·d = 16·d (d heads of 16 instead of 64), depths CPU_DEPTHS, and 4×4
      patches (64 image + 32 text tokens; 2×2 patches, 256 + 32 tokens, made a d2 step ~2 s on the shared machine,
      too slow for five sizes in half an hour). Peak learning rate 1e-3 (1e-4 barely moves a model this small in a
      few hundred steps; the quickstart measured 1e-3), 20 warmup steps, constant rate (the paper's schedule), batch
      32, 200 steps, EMA 0.99 (0.9999 averages over more steps than a run has), scanned blocks (compile time flat
      in depth: it dominates a run here). Validation loss on 64 held-out examples and ShapesEval (30 prompts,
      10 sampler steps) every 40 steps. The default size is d4.

Every run writes val_loss/* (rflow_jax/eval/val_loss.py) and the cumulative examples/FLOPs it has trained on
(rflow_jax/utils/flops.py) to metrics.jsonl, so every evaluation is a point on the compute axis. The sweep varies
depth (width and heads follow it); launch/sweep.py --also=FIELD=v1,v2 crosses it with any other field
(learning rate, batch, steps).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import base, sd3  # pylint: disable=g-import-not-at-top,wrong-import-position

PAPER_DEPTHS = sd3.PAPER_DEPTHS  # 15, 18, 21, 24, 30, 38.
PAPER_HEAD_DIM = 64
CPU_DEPTHS = (2, 3, 4, 5, 6)
CPU_HEAD_DIM = 16  # The CPU ladder's width rule: hidden_size = 16·depth, depth heads.


def ladder(depth: int, head_dim: int) -> dict:
  """Config overrides of one rung: depth d, width head_dim·d, d heads (the paper: head_dim 64)."""
  return {"model.depth": depth, "model.hidden_size": head_dim * depth, "model.num_heads": depth}


def _cpu_config():
  c = base.get_config()
  c.model.update({k.split(".")[1]: v for k, v in ladder(4, CPU_HEAD_DIM).items()})
  c.model.patch_size = 4
  c.model.pos_embed_max_size = 8  # The 8×8 patch grid of a 32² image.
  c.model.qk_norm = "rms_norm"
  c.model.scan_blocks = True
  c.flow.formulation = "rf/lognorm(0.00,1.00)"
  c.flow.shift = 1.0  # Training: the paper's 256² setting (no shift).
  # Sampling for ShapesEval only: flat-coloured scenes are decided at t > 0.9 (configs/quickstart.py).
  c.sample.shift = 3.0
  c.sample.num_steps = 10
  c.sample.eval_per_kind = 10
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 20
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.99
  c.text.drop_prob = 0.316  # Two encoders: 10% fully unconditional, as the paper's 46.3% with three.
  c.train.global_batch_size = 32
  c.train.num_steps = 200
  c.train.log_every = 20
  c.train.eval_every = 40  # Validation loss (every evaluator) every 40 steps: 5 compute points per run.
  c.train.checkpoint_every = 40
  c.train.keep_checkpoints = 10  # Stable-phase checkpoints stay, so WSD decay branches can start from them.
  c.train.evaluators = ("val_loss", "shapes")
  c.eval.val_loss_examples = 64
  c.eval.val_loss_batch_size = 64
  return c


def _pod_config(depth: int):
  c = sd3.get_config(f"d{depth}")
  c.train.evaluators = ("val_loss",)  # No ShapesEval on latents.
  c.train.eval_every = 50_000  # The paper's validation interval.
  c.eval.val_loss_examples = 4096
  c.eval.val_loss_batch_size = 512
  return c


def get_config(arg: str = "d24"):
  """Returns the config of variant `arg`: "cpu", "pod" (= "d24") or "dN" (N in 2 … 38)."""
  if arg == "cpu":
    return _cpu_config()
  if arg == "pod":
    arg = "d24"
  if arg.startswith("d") and arg[1:].isdigit() and 2 <= int(arg[1:]) <= 38:
    return _pod_config(int(arg[1:]))
  raise ValueError(f"configs/scaling.py:{arg}: valid variants are 'cpu', 'pod' and 'd2' … 'd38'")


def sweep(add, arg: str = "d24"):
  """The ladder of variant `arg`: CPU_DEPTHS at width 16·d for "cpu", the paper's depths at 64·d otherwise."""
  depths, head_dim = (CPU_DEPTHS, CPU_HEAD_DIM) if arg == "cpu" else (PAPER_DEPTHS, PAPER_HEAD_DIM)
  for d in depths:
    add(**ladder(d, head_dim))
