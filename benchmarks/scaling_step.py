"""Train-step time against image tokens and depth on this machine, with attention's share, one JSON line per size.

  python benchmarks/scaling_step.py [--tokens=64,256,1024] [--depths=2,4,8] [--width=512] [--heads=8] [--batch=8]
                                    [--impls=blocked] [--reps=5] [--quick] [--attention_only [--torch]]
  RFLOW_JAX_MALLOC=system python benchmarks/scaling_step.py ...  # glibc's defaults (the default on a CPU: reuse)

The shapes config (pixel space, 2x2 patches, 32 text tokens) at width --width; image tokens T = (side/2)² with side
16, 32, 64 for T = 64, 256, 1024. The token sweep runs at depth max(--depths), the depth sweep at T = 256. For each
size and each attention implementation it times the jitted `Setup.train_step` (interleaved across --impls, median of
--reps after one warm-up), and a forward+backward of that implementation alone on the step's (B, T+32, N, D) q, k, v,
times the number of joint attentions (depth): attention's share = that / step time. The last line is a summary:
{"rows": [...], ...}. --attention_only: only the attention timing (no step compile: quick, for comparing kernels);
with --torch, torch's scaled_dot_product_attention forward+backward on the same inputs (as (B, N, T, D), on
torch.get_num_threads() threads, = the cores) is timed in the same interleaved loop, as the row "torch_sdpa".
--quick: one tiny size per sweep (CI smoke).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  """Command-line options (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", default="64,256,1024", help="Image-token counts of the token sweep (64, 256, 1024).")
  p.add_argument("--depths", default="2,4,8", help="Depths of the depth sweep (at 256 image tokens).")
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--impls", default="blocked", help="Comma-separated attention_impl names, timed interleaved.")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument(
      "--attention_only",
      action="store_true",
      help="Time only attention forward+backward per size (interleaved across --impls); no train step.",
  )
  p.add_argument(
      "--torch",
      action="store_true",
      help="With --attention_only: also time torch scaled_dot_product_attention fwd+bwd, interleaved with --impls.",
  )
  p.add_argument("--quick", action="store_true", help="Tokens 64, depths 1, width 64, 2 heads, batch 2, 2 reps.")
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.depths, args.width, args.heads, args.batch, args.reps = "64", "1", 64, 2, 2, 2
  args.tokens = [int(x) for x in args.tokens.split(",") if x]
  args.depths = [int(x) for x in args.depths.split(",") if x]
  args.impls = [x for x in args.impls.split(",") if x]
  side = {64: 16, 256: 32, 1024: 64}
  bad = [t for t in args.tokens if t not in side]
  if bad:
    raise SystemExit(f"error: --tokens {bad}: valid are {sorted(side)} (2x2 patches on 16², 32², 64² pixels)")
  args.sides = [side[t] for t in args.tokens]
  return args


def measure_attention(args, side: int) -> list[dict]:
  """Forward+backward of each --impls attention alone on (B, T+32, N, D), interleaved, with max |grad - first's|."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import layers  # pylint: disable=g-import-not-at-top
  from rflow_jax.utils import flops as flops_lib  # pylint: disable=g-import-not-at-top

  shape = (args.batch, (side // 2) ** 2 + 32, args.heads, args.width // args.heads)
  q, k, v, g = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
  fns, grads = {}, {}
  for impl in args.impls:
    f = jax.jit(
        jax.grad(lambda q, k, v, impl=impl: jnp.vdot(layers.dot_product_attention(q, k, v, impl), g), argnums=(0, 1, 2))
    )
    grads[impl] = jax.block_until_ready(f(q, k, v))
    fns[impl] = lambda f=f: jax.block_until_ready(f(q, k, v))
  if args.torch:
    fns["torch_sdpa"], grads["torch_sdpa"] = torch_attention(q, k, v, g)
  times = {impl: [] for impl in fns}
  for _ in range(args.reps):
    for impl, f in fns.items():
      times[impl].append(flops_lib.median_seconds(f, 1))
  first = grads[args.impls[0]]
  return [
      {
          "image_tokens": (side // 2) ** 2,
          "joint_tokens": shape[1],
          "attention_impl": impl,
          "attention_fwd_bwd_s": round(statistics.median(times[impl]), 4),
          "max_abs_grad_diff": float(max(jnp.max(jnp.abs(a - b)) for a, b in zip(grads[impl], first))),
      }
      for impl in fns
  ]


def torch_attention(q, k, v, g):
  """(fn, grads): torch scaled_dot_product_attention forward+backward on copies of q, k, v, cotangent g."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  # (B, T, N, D) -> torch's (B, N, T, D), made contiguous once outside the timed call.
  tq, tk, tv, tg = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous() for a in (q, k, v, g))
  for t in (tq, tk, tv):
    t.requires_grad_(True)

  def fn():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    return torch.autograd.grad(out, (tq, tk, tv), tg)

  return fn, tuple(x.transpose(1, 2).numpy() for x in fn())


def measure(args, side: int, depth: int) -> list[dict]:
  """Rows for one (image side, depth): one per attention implementation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import layers  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import tasks, trainer  # pylint: disable=g-import-not-at-top
  from rflow_jax.utils import flops as flops_lib  # pylint: disable=g-import-not-at-top

  runs = {}
  for impl in args.impls:
    c = shapes.get_config()
    c.data.image_size = side
    c.model.depth, c.model.hidden_size, c.model.num_heads = depth, args.width, args.heads
    c.model.pos_embed_max_size = side // c.model.patch_size
    c.model.attention_impl = impl
    c.train.global_batch_size = args.batch
    setup = trainer.Setup(c)
    spec = setup.task.batch_spec(args.batch)
    batch = jax.tree.map(jnp.asarray, tasks.random_batch(spec, setup.task.tokenizer.vocab_size))
    state = setup.init_state()
    t0 = time.perf_counter()
    with setup.step_context():
      compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step(compiled=compiled, holder=holder, batch=batch):
      holder["state"], m = compiled(holder["state"], batch)
      jax.block_until_ready(m)

    step()
    tokens = (side // c.model.patch_size) ** 2 + 2 * c.text.max_length
    shape = (args.batch, tokens, args.heads, args.width // args.heads)
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    attn = jax.jit(
        jax.grad(lambda q, k, v, impl=impl: jnp.sum(layers.dot_product_attention(q, k, v, impl)), argnums=(0, 1, 2))
    )
    jax.block_until_ready(attn(q, k, v))
    runs[impl] = dict(
        step=step,
        attn=lambda attn=attn, q=q, k=k, v=v: jax.block_until_ready(attn(q, k, v)),
        compile_s=compile_s,
        flops=flops_lib.compiled_step_flops(compiled, c),
        times=[],
        attn_times=[],
    )
  for _ in range(args.reps):  # Interleaved across implementations.
    for r in runs.values():
      r["times"].append(flops_lib.median_seconds(r["step"], 1))
      r["attn_times"].append(flops_lib.median_seconds(r["attn"], 1))
  rows = []
  for impl, r in runs.items():
    step_s, attn_s = statistics.median(r["times"]), statistics.median(r["attn_times"])
    rows.append(
        {
            "image_tokens": (side // 2) ** 2,
            "depth": depth,
            "attention_impl": impl,
            "step_s": round(step_s, 4),
            "gflops_per_s": round(r["flops"] / step_s / 1e9, 1),
            "attention_fwd_bwd_s": round(attn_s * depth, 4),
            "attention_share": round(min(attn_s * depth / step_s, 1.0), 3),
            "compile_s": round(r["compile_s"], 1),
        }
    )
  return rows


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top,unused-import  # Heavy imports first.
  from rflow_jax.utils import host_memory  # pylint: disable=g-import-not-at-top

  malloc = host_memory.configure()  # $RFLOW_JAX_MALLOC: after the imports, before the first computation.
  sweep_side = args.sides[0] if args.quick else 32  # The depth sweep runs at 256 image tokens.
  sizes = [(s, max(args.depths)) for s in args.sides]
  sizes += [(sweep_side, d) for d in args.depths if (sweep_side, d) not in sizes]
  rows = []
  if args.attention_only:
    sizes = [(side, None) for side in args.sides]
  for side, depth in sizes:
    if depth is None:
      for row in measure_attention(args, side):
        print(json.dumps(row), flush=True)
        rows.append(row)
      continue
    for row in measure(args, side, depth):
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(
      json.dumps(
          {
              "rows": rows,
              "width": args.width,
              "heads": args.heads,
              "batch": args.batch,
              "text_tokens": 32,
              "dtype": "float32",
              "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(),
              "host_malloc": malloc,
          }
      )
  )


if __name__ == "__main__":
  main()
