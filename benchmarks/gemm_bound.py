"""How fast could the train step be if only its matmuls cost time? Each framework's matmuls alone, beside its step.

  python benchmarks/gemm_bound.py [--quick] [--threads=N] [--train_reps=7] [vs_diffusers' size flags]

At vs_diffusers' size and with its flags (the sampling and torch.compile ones are not used), one process times,
interleaved so that machine noise hits all of them (medians after a warm-up round):

  dense      every token-wise dense product of one train step, each alone (blocked on before the next): per joint
             block and stream, qkv, proj, fc1 and fc2 (the last block's text stream: qkv only), each as its
             forward x·W, input gradient dy·Wᵀ and weight gradient xᵀ·dy. XLA: a jitted dot per product, in the
             layout our model uses (W: in × out). torch: F.linear's forward and autograd's two products (W: out × in).
  attention  the joint attention's forward + backward once per block, as each side's fused CPU kernel: ours the
             native kernel (q/k RMSNorm inside it), torch's scaled_dot_product_attention (its q/k norm is elementwise
             work outside, as in diffusers' step).
  step       rflow_jax's jitted train step and diffusers' eager step (AdamW, clipping, EMA), as in vs_diffusers.

bound_s = dense + attention: the step made of these kernels and nothing else. outside_matmul_s = step − bound:
what each side spends on everything else (norms, modulation, GELU, residuals, the update, scheduling), and
`for_1_25x_eager` what that leaves us at the goal: diffusers' eager step / 1.25 − our bound. The products left out
(adaLN modulations and embedders: rows = batch, or one layer) are `1 − dense_flop_share` of the dense FLOPs counted
by rflow_jax.utils.flops. The last line printed is one JSON object.
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_diffusers  # pylint: disable=g-import-not-at-top,wrong-import-position

KINDS = ("forward", "input_grad", "weight_grad")


def dense_products(depth: int, width: int, mlp_hidden: int, image_rows: int, text_rows: int) -> collections.Counter:
  """{(rows, in, out, kind): count} of one train step's token-wise dense products (rows = batch · tokens)."""
  layers = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, mlp_hidden), "fc2": (mlp_hidden, width)}
  counts = collections.Counter()
  for i in range(depth):
    text_layers = ["qkv"] if i == depth - 1 else list(layers)  # The last block's text stream is pre-only.
    for rows, names in ((image_rows, list(layers)), (text_rows, text_layers)):
      for name in names:
        for kind in KINDS:
          counts[(rows, *layers[name], kind)] += 1
  return counts


def product_flops(products: collections.Counter) -> float:
  return float(sum(2 * m * k * n * c for (m, k, n, _), c in products.items()))


def xla_dense(products: collections.Counter):
  """A function running every product of `products` once through XLA, each blocked on before the next."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  fns = {
      "forward": jax.jit(lambda x, w: x @ w),  # (M, K) · (K, N)
      "input_grad": jax.jit(lambda dy, w: dy @ w.T),  # (M, N) · (K, N)ᵀ
      "weight_grad": jax.jit(lambda x, dy: x.T @ dy),  # (M, K)ᵀ · (M, N)
  }
  calls = []
  for (m, k, n, kind), count in products.items():
    key = jax.random.key(m * 7 + k * 5 + n)
    x, w, dy = (
        jax.random.normal(kk, s, jnp.float32) for kk, s in zip(jax.random.split(key, 3), [(m, k), (k, n), (m, n)])
    )
    operands = {"forward": (x, w), "input_grad": (dy, w), "weight_grad": (x, dy)}[kind]
    fns[kind](*operands).block_until_ready()  # Compile.
    calls += [(fns[kind], operands)] * count

  def run():
    for fn, operands in calls:
      fn(*operands).block_until_ready()

  return run


def torch_dense(products: collections.Counter):
  """The same products through torch, as nn.Linear's forward and autograd compute them (weight: out × in)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(0)
  calls = []
  for (m, k, n, kind), count in products.items():
    x, w, dy = (torch.randn(*s, generator=gen) for s in [(m, k), (n, k), (m, n)])
    fn = {
        "forward": lambda x=x, w=w: F.linear(x, w),
        "input_grad": lambda dy=dy, w=w: dy.mm(w),
        "weight_grad": lambda dy=dy, x=x: dy.t().mm(x),
    }[kind]
    calls += [fn] * count

  def run():
    with torch.no_grad():
      for fn in calls:
        fn()

  return run


def xla_attention(batch: int, image_tokens: int, text_tokens: int, heads: int, head_dim: int, depth: int):
  """`depth` forward + backward passes of the native joint attention (packed q/k/v, q/k RMSNorm), jitted."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import native_attention  # pylint: disable=g-import-not-at-top

  k0, k1, k2, k3 = jax.random.split(jax.random.key(0), 4)
  x0 = jax.random.normal(k0, (batch, image_tokens, 3, heads, head_dim), jnp.float32)
  x1 = jax.random.normal(k1, (batch, text_tokens, 3, heads, head_dim), jnp.float32)
  scales = jnp.ones((2, 2, head_dim), jnp.float32)
  g0 = jax.random.normal(k2, (batch, image_tokens, heads, head_dim), jnp.float32)
  g1 = jax.random.normal(k3, (batch, text_tokens, heads, head_dim), jnp.float32)

  @jax.jit
  def fwd_bwd(x0, x1, scales, g0, g1):
    _, vjp = jax.vjp(lambda a, b, s: native_attention.native_packed_attention([a, b], s), x0, x1, scales)
    return vjp([g0, g1])

  jax.block_until_ready(fwd_bwd(x0, x1, scales, g0, g1))

  def run():
    for _ in range(depth):
      jax.block_until_ready(fwd_bwd(x0, x1, scales, g0, g1))

  return run


def torch_attention(batch: int, tokens: int, heads: int, head_dim: int, depth: int):
  """`depth` forward + backward passes of torch's scaled_dot_product_attention over the joint tokens."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=gen, requires_grad=True) for _ in range(3))
  grad = torch.randn(batch, heads, tokens, head_dim, generator=gen)

  def run():
    for _ in range(depth):
      torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

  return run


def main(argv=None):
  args = vs_diffusers.parse_args(argv)
  os.environ["NPROC"] = str(args.threads)  # XLA's CPU pool; before JAX starts (as vs_diffusers).
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  from rflow_jax.model import native_attention  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import optimizer as optim_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import tasks, trainer  # pylint: disable=g-import-not-at-top
  from rflow_jax.utils import flops as flops_lib, host_memory  # pylint: disable=g-import-not-at-top

  malloc = host_memory.configure(args.malloc)
  config = vs_diffusers.make_config(args)
  setup = trainer.Setup(config)
  state = setup.init_state()
  b = args.batch
  batch = jax.tree.map(jax.numpy.asarray, tasks.random_batch(setup.task.batch_spec(b), setup.task.tokenizer.vocab_size))
  with setup.step_context():
    compiled = setup.train_step.lower(state, batch).compile()
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  # The torch side: the same weights and text conditioning; noise for the rest (vs_diffusers replays our step's
  # draw and checks that the two losses agree; here only the work matters).
  ema = float(optim_lib.ema_decay(0, config.optim.ema_decay))
  peer = vs_diffusers.Peer(jax.device_get(state.params), setup.task.model, config.optim, ema, False)
  context, pooled = step_lib.condition(
      setup.task.text_stack, state.text_params, batch["tokens"], jax.random.key(0), 0.0
  )
  side, ch = config.data.image_size, config.model.in_channels
  text_tokens = context.shape[1]
  gen = torch.Generator().manual_seed(0)
  torch_batch = (
      torch.randn(b, ch, side, side, generator=gen),
      torch.rand(b, generator=gen) * 1000.0,
      torch.from_numpy(np.array(context)),
      torch.from_numpy(np.array(pooled)),
      torch.randn(b, ch, side, side, generator=gen),
  )
  torch_step = lambda: peer.train_step(False, torch_batch)

  image_tokens = (side // args.patch) ** 2
  mlp_hidden = int(config.model.mlp_ratio * args.width)
  products = dense_products(args.depth, args.width, mlp_hidden, b * image_tokens, b * text_tokens)
  by_kind = {kind: collections.Counter({p: c for p, c in products.items() if p[3] == kind}) for kind in KINDS}
  head_dim = args.width // args.heads
  fns = {
      "rflow_jax_step": jax_step,
      "diffusers_eager_step": torch_step,
      **{f"xla_{kind}": xla_dense(by_kind[kind]) for kind in KINDS},
      **{f"torch_{kind}": torch_dense(by_kind[kind]) for kind in KINDS},
      "xla_attention": xla_attention(b, image_tokens, text_tokens, args.heads, head_dim, args.depth),
      "torch_attention": torch_attention(b, image_tokens + text_tokens, args.heads, head_dim, args.depth),
  }
  vs_diffusers.median_interleaved(fns, 1)  # Warm-up round (the first steps page-fault and compile lazily).
  vs_diffusers.log(f"gemm_bound: timing {len(fns)} items x {args.train_reps}")
  t = vs_diffusers.median_interleaved(fns, args.train_reps)

  dense_flops = product_flops(products)
  for prefix in ("xla", "torch"):
    t[f"{prefix}_dense"] = sum(t[f"{prefix}_{kind}"] for kind in KINDS)
  forward = flops_lib.forward_flops(config)  # Per example: {"matmul", "attention", "total"}.
  bound = {"rflow_jax": t["xla_dense"] + t["xla_attention"], "diffusers": t["torch_dense"] + t["torch_attention"]}
  step = {"rflow_jax": t["rflow_jax_step"], "diffusers": t["diffusers_eager_step"]}
  r = lambda v: float(f"{v:.5g}")  # Five significant digits: the --quick step takes milliseconds.
  result = {
      "step_s": {k: r(v) for k, v in step.items()},
      "bound_s": {k: r(v) for k, v in bound.items()},
      "dense_s": {"rflow_jax": r(t["xla_dense"]), "diffusers": r(t["torch_dense"])},
      # Forward x·W, input gradient dy·Wᵀ, weight gradient xᵀ·dy: the same FLOPs each.
      "dense_by_kind_s": {
          side: {kind: r(t[f"{prefix}_{kind}"]) for kind in KINDS}
          for side, prefix in (("rflow_jax", "xla"), ("diffusers", "torch"))
      },
      "attention_s": {"rflow_jax": r(t["xla_attention"]), "diffusers": r(t["torch_attention"])},
      "outside_matmul_s": {k: r(step[k] - bound[k]) for k in step},
      "speedup_vs_eager": round(step["diffusers"] / step["rflow_jax"], 3),
      "bound_speedup_vs_eager": round(step["diffusers"] / bound["rflow_jax"], 3),
      "for_1_25x_eager": {
          "step_s": r(step["diffusers"] / 1.25),
          "outside_matmul_s": r(step["diffusers"] / 1.25 - bound["rflow_jax"]),
      },
      "dense_gflops": {
          "rflow_jax": round(dense_flops / t["xla_dense"] / 1e9, 1),
          "diffusers": round(dense_flops / t["torch_dense"] / 1e9, 1),
      },
      # The timed dense products' share of the model's dense FLOPs (3x the forward: forward + two gradients).
      "dense_flop_share": round(dense_flops / (3 * b * forward["matmul"]), 4),
      "dense_products": len(products),
      "config": {
          "depth": args.depth,
          "width": args.width,
          "heads": args.heads,
          "patch": args.patch,
          "image_tokens": image_tokens,
          "text_tokens": text_tokens,
          "batch": b,
          "native_fallback": native_attention.load(),
          "update_impl": config.optim.update_impl,
          "reps": args.train_reps,
          "quick": args.quick,
      },
      "threads": args.threads,
      "host_malloc": malloc,
      "backend": jax.default_backend(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
