"""rflow_jax against diffusers' SD3Transformer2DModel on this machine: train step, CFG sampling, matmul rate.

  python benchmarks/vs_diffusers.py [--quick] [--threads=N] [--train_reps=7] [--sample_reps=2] [--no_compile]
                                    [--attention_impl=native] [--update_impl=native] [--malloc=reuse]

One MM-DiT (default: depth 8, width 512, 8 heads, 2x2 patches on 32x32x3 pixels = 256 image tokens, 32 text tokens,
batch 8, fp32, 73M parameters), the same weights on both sides (random, moved with rflow_jax.export.diffusers), the
same batch, the same thread count (torch.set_num_threads and XLA's CPU pool via NPROC, set before JAX starts) and
the same host malloc (--malloc; default reuse, rflow_jax.utils.host_memory: freed buffers kept, no page faults):

  train step   rflow_jax's jitted `Setup.train_step` (donated state; loss incl. the frozen text stack, clipping,
               AdamW, EMA, the non-finite guard, three norms) vs SD3Transformer2DModel forward + MSE + backward +
               clip_grad_norm_ + torch.optim.AdamW (foreach) + a foreach EMA, eager and under torch.compile. Both
               sides compute the loss on the same (z_t, t, target, context, pooled): the step-0 draw of rflow_jax's
               step, replayed for torch; the JSON reports both losses.
  sampling     28-step Euler with CFG (scale 3) at batch 8: our jitted solver loop vs a Python loop of
               FlowMatchEulerDiscreteScheduler.step over the diffusers transformer (eager and compiled), same noise.
  matmul       a 2048x2048 fp32 matmul through XLA and through torch: the machine's practical peak, timed in the
               train steps' interleaved loop (matmul_gflops; peak_fraction divides by it) and alone at the end
               (matmul_gflops_end).

Timings are interleaved (rflow_jax, eager, compiled, rflow_jax, ...) so machine noise hits every side, medians after
warm-up; compile/trace time is reported apart. The last line printed is one JSON object with the keys
train_step / sampling / goals / matmul_gflops / config / threads (plus loss, compile_s); `goals` says which of
issue 23's targets this run meets and what fraction of XLA's matmul rate each would need.
--quick: a tiny model (depth 2, width 64, 64 image tokens, batch 2), 2-step sampling, few repetitions, no torch.compile (its ~minute of inductor compile); for CI.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
  """Command-line options (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="Tiny model, 2 reps, no torch.compile (CI).")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for both XLA and torch.")
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--patch", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--sample_steps", type=int, default=28)
  p.add_argument("--sample_batch", type=int, default=8)
  p.add_argument("--train_reps", type=int, default=7, help="Timed train steps per side (after 2 warm-up steps).")
  p.add_argument("--sample_reps", type=int, default=2, help="Timed sampling loops per side.")
  # torch's side runs its fused CPU attention (scaled_dot_product_attention), so ours runs its native CPU kernel; it
  # falls back to the pure-JAX blocked kernel, with a warning, where the library is not built.
  p.add_argument("--attention_impl", default="native", help="rflow_jax attention_impl (einsum: the configs' default).")
  # torch.optim.AdamW runs its multi-tensor C++ kernels; ours runs the fused native update (optax where it cannot).
  p.add_argument("--update_impl", default="native", help="rflow_jax optim.update_impl (optax: the configs' default).")
  p.add_argument("--no_compile", action="store_true", help="Skip torch.compile (its keys are then null).")
  # Freed host memory kept for reuse (rflow_jax.utils.host_memory): the CPU setting for speed. One process, so both
  # sides run under it (torch's eager forward gained from it too).
  p.add_argument("--malloc", default="reuse", choices=["reuse", "system"], help="RFLOW_JAX_MALLOC for this process.")
  args = p.parse_args(argv)
  if args.quick:
    args.depth, args.width, args.heads, args.patch, args.batch = 2, 64, 2, 4, 2
    args.sample_steps, args.sample_batch, args.train_reps, args.sample_reps = 2, 2, 2, 1
    args.no_compile = True
  if args.threads < 1:
    raise SystemExit(f"error: --threads={args.threads} must be >= 1")
  return args


def median_interleaved(fns: dict, reps: int) -> dict:
  """{name: fn} -> {name: median seconds}, calling the fns in turn `reps` times (noise hits all alike)."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def log(msg: str) -> None:
  """Progress on stderr (stdout's last line is the JSON)."""
  print(f"[vs_diffusers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn):
  """(result, seconds) of one call: compile / warm-up times."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def make_config(args):
  """The shapes config at the benchmark's size (pixel space, 32x32x3, two tiny text encoders of 16 tokens)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from configs import shapes  # pylint: disable=g-import-not-at-top

  c = shapes.get_config()
  c.model.depth, c.model.hidden_size, c.model.num_heads = args.depth, args.width, args.heads
  c.model.patch_size = args.patch
  c.model.pos_embed_max_size = c.data.image_size // args.patch
  c.model.attention_impl = args.attention_impl
  c.optim.update_impl = args.update_impl
  c.train.global_batch_size = args.batch
  c.optim.warmup_steps = 0  # A constant learning rate, as the torch side uses.
  c.sample.num_steps, c.sample.solver, c.sample.shift = args.sample_steps, "euler", 1.0
  return c


def randomize(params, seed: int):
  """Every trainable leaf ~ N(0, 0.02²) (RMS scales ~ 1 + ...): the zero-initialised adaLN would make the output 0."""
  import jax  # pylint: disable=g-import-not-at-top

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "pos_embed" in name:
      out.append(leaf)
    else:
      out.append((1.0 if "norm" in name else 0.0) + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


MATMUL_N, MATMUL_CALLS = 2048, 4  # One timed call: 4 matmuls of 2048² fp32, ~0.6 s on 2 cores.


def matmul_fns() -> dict:
  """{"xla": fn, "torch": fn}: each call runs MATMUL_CALLS 2048² fp32 matmuls (warmed up)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  n = MATMUL_N
  a = np.random.RandomState(0).randn(n, n).astype(np.float32)
  ja, jb = jax.device_put(a), jax.device_put(a.T.copy())
  ta, tb = torch.from_numpy(a), torch.from_numpy(a.T.copy())
  mm = jax.jit(lambda x, y: x @ y)
  mm(ja, jb).block_until_ready()
  torch.mm(ta, tb)

  def xla():
    for _ in range(MATMUL_CALLS):
      out = mm(ja, jb)
    out.block_until_ready()

  def torch_():
    for _ in range(MATMUL_CALLS):
      torch.mm(ta, tb)

  return {"xla": xla, "torch": torch_}


def matmul_gflops(seconds: dict) -> dict:
  """{"xla": s, "torch": s} per matmul_fns call -> GFLOP/s."""
  return {k: round(MATMUL_CALLS * 2 * MATMUL_N**3 / s / 1e9, 1) for k, s in seconds.items()}


class Peer:
  """The diffusers side: SD3Transformer2DModel with our weights, AdamW, EMA, optional torch.compile."""

  def __init__(self, params, model, optim_config, ema_decay: float, compile_: bool):
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
    from rflow_jax.export import diffusers as export  # pylint: disable=g-import-not-at-top

    self.torch = torch
    self.net = SD3Transformer2DModel(
        **{k: v for k, v in export.diffusers_config(model).items() if not k.startswith("_")}
    )
    sd = export.params_to_diffusers(params, model)
    self.net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)  # A copy: v may be read-only.
    # AdamW as ours: decay only on matrices (none by default), the positional table is a buffer there.
    ps = list(self.net.parameters())
    groups = [
        {"params": [p for p in ps if p.ndim >= 2], "weight_decay": optim_config.weight_decay},
        {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0},
    ]
    self.opt = torch.optim.AdamW(
        groups,
        lr=optim_config.learning_rate,
        betas=(optim_config.b1, optim_config.b2),
        eps=optim_config.eps,
        foreach=True,
    )
    self.clip = optim_config.grad_clip_norm
    self.ema = [p.detach().clone() for p in ps]
    self.ema_decay = ema_decay
    self.compiled = torch.compile(self.net) if compile_ else None

  def forward(self, compiled: bool, x, t, ctx, pooled):
    net = self.compiled if compiled else self.net
    return net(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]

  def train_step(self, compiled: bool, batch) -> float:
    """One step on batch = (z_t NCHW, 1000 t, context, pooled, target NCHW); returns the loss."""
    torch = self.torch
    z, t1000, ctx, pooled, target = batch
    self.opt.zero_grad(set_to_none=True)
    loss = torch.mean(torch.square(self.forward(compiled, z, t1000, ctx, pooled) - target))
    loss.backward()
    params = [p for p in self.net.parameters()]
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(params, self.clip, foreach=True)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return float(loss.detach())

  def sample(self, compiled: bool, noise, ctx, pooled, num_steps: int, cfg_scale: float):
    """28-step (num_steps) Euler with CFG: a loop of FlowMatchEulerDiscreteScheduler.step; NCHW in and out."""
    torch = self.torch
    from diffusers import FlowMatchEulerDiscreteScheduler  # pylint: disable=g-import-not-at-top

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(num_steps)
    both_ctx = torch.cat([ctx, torch.zeros_like(ctx)])
    both_pooled = torch.cat([pooled, torch.zeros_like(pooled)])
    x = noise
    with torch.inference_mode():
      for t in sched.timesteps:
        v = self.forward(compiled, torch.cat([x, x]), t.expand(2 * x.shape[0]), both_ctx, both_pooled)
        v_c, v_u = v.chunk(2)
        x = sched.step(v_u + cfg_scale * (v_c - v_u), t, x, return_dict=False)[0]
    return x


def goals(train: dict, sample: dict, flops: float, sample_flops: float, xla_gflops: float, gflops: float) -> dict:
  """Issue 23's goals against this run, each with the peak fraction meeting it would take.

  `needs_peak_fraction` is the GFLOP/s the goal's time implies over XLA's own 2048² matmul rate. Near or above 1 a
  goal is out of reach on this CPU whatever the code does (the step's matmuls alone run at about that rate), and
  then the train step's peak_fraction >= 0.7 is the goal that rules.
  """
  need = lambda work, seconds: round(work / seconds / 1e9 / xla_gflops, 3)
  out = {
      "train_1.25x_eager": {
          "met": train["diffusers_eager"] / train["rflow_jax"] >= 1.25,
          "needs_peak_fraction": need(flops, train["diffusers_eager"] / 1.25),
      },
      "train_peak_fraction_0.7": {"met": gflops / xla_gflops >= 0.7, "needs_peak_fraction": 0.7},
      "sampling_1.5x_eager": {
          "met": sample["diffusers_eager"] / sample["rflow_jax"] >= 1.5,
          "needs_peak_fraction": need(sample_flops, sample["diffusers_eager"] / 1.5),
      },
  }
  if "diffusers_compile" in train:
    out["train_vs_compile"] = {
        "met": train["rflow_jax"] <= train["diffusers_compile"],
        "needs_peak_fraction": need(flops, train["diffusers_compile"]),
    }
  return out


def main(argv=None):
  args = parse_args(argv)
  # XLA's CPU client sizes its intra-op pool from NPROC when set; both must be fixed before jax/torch start.
  os.environ["NPROC"] = str(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  from rflow_jax.model import native_attention, text_encoders  # pylint: disable=g-import-not-at-top
  from rflow_jax.sampling import guidance, schedules, solvers  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import native_update  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import optimizer as optim_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import tasks, trainer  # pylint: disable=g-import-not-at-top
  from rflow_jax.utils import flops as flops_lib, host_memory  # pylint: disable=g-import-not-at-top

  malloc = host_memory.configure(args.malloc)  # After the imports, before the first computation (see host_memory).
  config = make_config(args)
  setup = trainer.Setup(config)
  if not setup.task.formulation.is_rf or setup.task.formulation.output != "velocity":
    raise SystemExit(f"error: flow.formulation={config.flow.formulation!r}: the torch side computes the rf loss")
  state = setup.init_state()
  params = randomize(state.params, seed=1)
  state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params), opt_state=setup.task.tx.init(params))
  b, s, ch = args.batch, config.data.image_size, config.model.in_channels
  spec = setup.task.batch_spec(b)
  batch = jax.tree.map(jnp.asarray, tasks.random_batch(spec, setup.task.tokenizer.vocab_size))

  # Step 0's draw of the jitted step, replayed outside it for the torch side (same key path as step.loss_fn).
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  k_drop, k_loss = jax.random.split(key)
  context, pooled = step_lib.condition(
      setup.task.text_stack, state.text_params, batch["tokens"], k_drop, config.text.drop_prob
  )
  k_t, k_eps = jax.random.split(k_loss)
  t = setup.task.formulation.sample_t(k_t, (b,))
  eps = jax.random.normal(k_eps, batch["image"].shape, jnp.float32)
  z_t = setup.task.formulation.noise(batch["image"], eps, t)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  tt = lambda a: torch.from_numpy(np.array(a))
  torch_batch = (
      nchw(z_t),
      tt(1000.0 * setup.task.formulation.model_time(t)),
      tt(context),
      tt(pooled),
      nchw(setup.task.formulation.target(batch["image"], eps, t)),
  )

  compile_ = not args.no_compile
  ema = float(optim_lib.ema_decay(0, config.optim.ema_decay))
  peer = Peer(jax.device_get(params), setup.task.model, config.optim, ema, compile_)
  compile_s = {}

  # --- train step ---
  log(f"compiling the rflow_jax step ({sum(a.size for a in jax.tree.leaves(params)) / 1e6:.1f}M params)")
  with setup.step_context():
    compiled, compile_s["rflow_jax_train"] = timed(lambda: setup.train_step.lower(state, batch).compile())
  flops = flops_lib.compiled_step_flops(compiled, config)  # Counts the native kernel's attention too.
  holder = {"state": state}

  def jax_step():
    holder["state"], m = compiled(holder["state"], batch)
    return m

  m0 = jax.device_get(jax_step())
  loss_torch = peer.train_step(False, torch_batch)
  log("rflow_jax step compiled and run once; torch eager step done")
  if compile_:
    _, compile_s["diffusers_train"] = timed(lambda: peer.train_step(True, torch_batch))
  for _ in range(2):  # Warm-up.
    jax.block_until_ready(jax_step())
    peer.train_step(False, torch_batch)
    if compile_:
      peer.train_step(True, torch_batch)
  fns = {
      "rflow_jax": lambda: jax.block_until_ready(jax_step()),
      "diffusers_eager": lambda: peer.train_step(False, torch_batch),
  }
  if compile_:
    fns["diffusers_compile"] = lambda: peer.train_step(True, torch_batch)
  # The machine's matmul rate, peak_fraction's denominator, is timed in the same interleaved loop as the steps it
  # divides, so that both see the same machine (timed alone at the end, it varied 106-125 GFLOP/s between runs).
  matmuls = matmul_fns()
  fns |= {f"matmul_{k}": fn for k, fn in matmuls.items()}
  log("timing train steps and matmuls")
  train = median_interleaved(fns, args.train_reps)
  log(f"train medians {train}")
  mm = matmul_gflops({k: train.pop(f"matmul_{k}") for k in matmuls})

  # --- sampling ---
  sb = args.sample_batch
  srng = np.random.RandomState(1)
  s_tokens = jnp.asarray(srng.randint(1, setup.task.tokenizer.vocab_size, (sb, config.text.max_length), np.int32))
  cond = text_encoders.drop_and_compose(
      setup.task.text_stack.apply({"params": holder["state"].text_params}, s_tokens), None, 0.0
  )
  uncond = jax.tree.map(jnp.zeros_like, cond)
  noise = jnp.asarray(srng.randn(sb, s, s, ch).astype(np.float32))
  sigmas = jnp.asarray(schedules.flow_sigmas(args.sample_steps, 1.0, "diffusers"), jnp.float32)
  model, cfg = setup.task.model, float(config.sample.cfg_scale)

  @jax.jit
  def jax_sample(p, x, cond, uncond):
    net = lambda z, sig, c: model.apply({"params": p}, z, sig, *c)
    return solvers.sample(guidance.cfg_velocity(net, cond, uncond, cfg), x, sigmas, "euler")

  sparams = holder["state"].params
  sample_args = (sparams, noise, cond, uncond)
  _, compile_s["rflow_jax_sample"] = timed(lambda: jax_sample.lower(*sample_args).compile())
  ours_img = np.asarray(jax_sample(*sample_args))
  log("sampler compiled")
  # The torch side samples with the weights it has now (trained the same number of steps, not the same values).
  t_noise, t_ctx, t_pooled = nchw(noise), tt(cond[0]), tt(cond[1])
  run = lambda c: peer.sample(c, t_noise, t_ctx, t_pooled, args.sample_steps, cfg)
  run(False)
  if compile_:
    _, compile_s["diffusers_sample"] = timed(lambda: run(True))
  sfns = {"rflow_jax": lambda: jax_sample(*sample_args).block_until_ready(), "diffusers_eager": lambda: run(False)}
  if compile_:
    sfns["diffusers_compile"] = lambda: run(True)
  log("timing sampling")
  sample = median_interleaved(sfns, args.sample_reps)
  log(f"sampling medians {sample}")

  mm_end = matmul_gflops(median_interleaved(matmuls, reps=3 if args.quick else 5))  # Alone, after the sampling.
  gflops = flops / train["rflow_jax"] / 1e9
  # The sampler's XLA cost analysis counts its loop body once, so its rate uses the model's FLOPs instead: a forward
  # pass per image and step, two per image with CFG.
  sample_flops = flops_lib.forward_flops(config)["total"] * 2 * sb * args.sample_steps
  sample_gflops = sample_flops / sample["rflow_jax"] / 1e9
  result = {
      "train_step": {
          "rflow_jax_s": round(train["rflow_jax"], 4),
          "diffusers_eager_s": round(train["diffusers_eager"], 4),
          "diffusers_compile_s": round(train["diffusers_compile"], 4) if compile_ else None,
          "speedup_vs_eager": round(train["diffusers_eager"] / train["rflow_jax"], 3),
          "speedup_vs_compile": round(train["diffusers_compile"] / train["rflow_jax"], 3) if compile_ else None,
          "rflow_jax_gflops": round(gflops, 1),
          "peak_fraction": round(gflops / mm["xla"], 3),
      },
      "sampling": {
          "rflow_jax_s": round(sample["rflow_jax"], 3),
          "diffusers_eager_s": round(sample["diffusers_eager"], 3),
          "diffusers_compile_s": round(sample["diffusers_compile"], 3) if compile_ else None,
          "speedup_vs_eager": round(sample["diffusers_eager"] / sample["rflow_jax"], 3),
          "speedup_vs_compile": round(sample["diffusers_compile"] / sample["rflow_jax"], 3) if compile_ else None,
          "rflow_jax_gflops": round(sample_gflops, 1),
          "peak_fraction": round(sample_gflops / mm["xla"], 3),
      },
      "goals": goals(train, sample, flops, sample_flops, mm["xla"], gflops),
      "matmul_gflops": mm,
      "matmul_gflops_end": mm_end,
      "config": {
          "depth": args.depth,
          "width": args.width,
          "heads": args.heads,
          "patch": args.patch,
          "image": [s, s, ch],
          "image_tokens": (s // args.patch) ** 2,
          "text_tokens": context.shape[1],
          "batch": b,
          "sample_batch": sb,
          "sample_steps": args.sample_steps,
          "dtype": "float32",
          "attention_impl": config.model.attention_impl,
          # Why attention_impl=native ran the blocked kernel instead (the library is not built), else null.
          "native_fallback": native_attention.load() if config.model.attention_impl == "native" else None,
          "update_impl": config.optim.update_impl,
          # Why update_impl=native ran optax's update instead, else null.
          "update_fallback": native_update.fallback_reason(params) if config.optim.update_impl == "native" else None,
          "train_reps": args.train_reps,
          "sample_reps": args.sample_reps,
          "ema": "both",
          "params_m": round(sum(a.size for a in jax.tree.leaves(params)) / 1e6, 1),
          "quick": args.quick,
      },
      "loss": {
          "rflow_jax": float(m0["loss"]),
          "diffusers": loss_torch,
          "rel_diff": abs(float(m0["loss"]) - loss_torch) / abs(loss_torch),
      },
      "sample_shape": list(ours_img.shape),
      "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
      "flops_per_step": flops,
      "threads": args.threads,
      "host_malloc": malloc,
      "backend": jax.default_backend(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
