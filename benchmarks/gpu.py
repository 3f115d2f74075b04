"""One-GPU performance call: the d24 (2B) train step at 256² in bf16, rflow_jax vs diffusers, plus shapes:gpu examples/s.

  python benchmarks/gpu.py [--batch=32] [--steps=10] [--peak_tflops=989] [--budget_s=480]   # on one H100/H200
  python benchmarks/gpu.py --smoke                                                          # anywhere (CPU ok)
  (on a lent device machine: `make device-wheels` here, then run(command="bash launch/device_perf.sh", carry=[".whl"]))

Each part runs in a process of its own (`--part=NAME`), one after the other, so that each has the whole GPU (JAX
reserves most of the device's memory for its process) and a part that fails or runs out of time costs only its
own result. In order of importance:

1. rflow_jax: configs/sd3.py:d24 (width 1536, 24 heads, qk RMS-norm, 2x2 patches on 32x32x16 latents = 256 image
   tokens, 2 x 77 text tokens), bf16 compute, float32 params, blocks scanned, remat --remat (default none, as the
   diffusers side), attention_impl "auto" (cuDNN flash on NVIDIA), the jitted `Setup.train_step` (donated state;
   gradient clipping, AdamW, EMA) at --batch; and JAX's bf16 matmul rate (the practical peak).
2. diffusers_eager: SD3Transformer2DModel with the same config (rflow_jax.export.diffusers.diffusers_config, its own
   random init), float32 params, bf16 autocast, the same work: MSE, backward, clip_grad_norm_, fused AdamW, a
   foreach EMA; the same batch and token counts; and torch's bf16 matmul rate.
3. shapes: configs/shapes.py:gpu's train step, examples/s.
4. diffusers_compile: (2) under torch.compile (last: its compile time is the hardest to bound).
rflow_jax:ATTENTION:REMAT[:unrolled] in --parts adds (1) with another model.attention_impl and model.remat (and the
blocks unrolled instead of scanned), to compare variants in one call (e.g. rflow_jax:einsum:dots_no_batch:unrolled).

Step time is the median of --steps timed steps after two warm-up steps (compile time apart). TFLOP/s counts model
FLOPs (rflow_jax.utils.flops: 6·params·tokens + attention, remat's recomputation not counted; the same count for
both sides). MFU = TFLOP/s / --peak_tflops (989: H100/H200 SXM dense bf16 datasheet peak); peak_fraction = TFLOP/s
over the measured matmul rate of the same framework. Every part prints its JSON line as it finishes; the last line
is one JSON object with all of them. --budget_s bounds the whole run: each part gets what is left, and a part cut
off reports {"error": "timeout after N s"}.
--smoke: sd3.py:d2 on 8x8 latents with 2 x 8 text tokens, batch 2, 2 steps, float32, 256² matmuls, no
torch.compile; shapes:gpu at depth 1, width 64, batch 4: exercises every part's code on a CPU.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

H100_BF16_PEAK_TFLOPS = 989.0  # Dense bf16 tensor-core peak of an H100 SXM / H200 (NVIDIA datasheets).
PARTS = ("rflow_jax", "diffusers_eager", "shapes", "diffusers_compile")
# Seconds a part may take at most (the rflow_jax:... variants: 180); the others take whatever budget is left.
PART_CAP_S = {"diffusers_eager": 150, "shapes": 150}
VARIANT_CAP_S = 180


def parse_args(argv=None):
  """Command-line options (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
  p.add_argument("--remat", default="none", help="model.remat of the rflow_jax side (the diffusers side keeps all).")
  p.add_argument("--budget_s", type=float, default=480.0, help="Wall-clock bound of the whole run.")
  p.add_argument(
      "--parts",
      default=",".join(PARTS),
      help=f"Comma-separated, from {','.join(PARTS)}; rflow_jax:ATTENTION:REMAT[:unrolled] adds the rflow_jax step"
      " with that model.attention_impl and model.remat (blocks unrolled), e.g. rflow_jax:einsum:dots_no_batch.",
  )
  p.add_argument("--smoke", action="store_true", help="Tiny sizes, float32, no torch.compile (runs on a CPU).")
  p.add_argument("--dump_dir", help="rflow_jax's optimised HLO and a profiler trace of two steps go here (dump()).")
  p.add_argument("--part", help="Run one part of --parts in this process (what the driver calls).")
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.budget_s <= 0:
    p.error(f"--batch={args.batch}, --steps={args.steps} and --budget_s={args.budget_s} must be positive")
  for spec in args.parts.split(",") + ([args.part] if args.part else []):
    if not valid_part(spec):
      p.error(f"--parts: unknown part {spec!r}; expected {','.join(PARTS)} or rflow_jax:ATTENTION:REMAT[:unrolled]")
  if args.smoke:
    args.batch, args.steps = 2, 2
  return args


def valid_part(spec: str) -> bool:
  """Whether spec names a part: one of PARTS, or rflow_jax:ATTENTION:REMAT[:unrolled] (known impl and remat)."""
  if spec in PARTS:
    return True
  fields = spec.split(":")
  if len(fields) not in (3, 4) or fields[0] != "rflow_jax" or fields[3:] not in ([], ["unrolled"]):
    return False
  from rflow_jax.model import layers, mmdit  # pylint: disable=g-import-not-at-top

  return fields[1] in layers.ATTENTION_IMPLS and fields[2] in mmdit.REMAT_CHOICES


def sd3_config(args):
  """configs/sd3.py:d24 at --batch, EMA and clipping as configured (d2 in float32 for --smoke)."""
  from configs import sd3  # pylint: disable=g-import-not-at-top

  c = sd3.get_config("d2" if args.smoke else "d24")
  c.train.global_batch_size, c.train.microbatches = args.batch, 1
  c.model.scan_blocks, c.model.remat = True, args.remat
  c.model.attention_impl = "einsum" if args.smoke else "auto"
  if args.smoke:
    c.model.dtype = "float32"
    c.data.image_size, c.model.pos_embed_max_size, c.text.max_length = 8, 4, 8
  c.sharding.mesh_shape = (1, 1, 1)  # One device.
  return c


def median_s(fn, reps: int) -> float:
  from rflow_jax.utils import flops  # pylint: disable=g-import-not-at-top  # Imports JAX: not in the driver.

  return flops.median_seconds(fn, reps)


def jax_matmul_tflops(smoke: bool) -> float:
  """JAX's rate on an n³ matmul (bf16 8192³ on a GPU; float32 256³ for --smoke): the practical peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  n, dtype, reps = (256, jnp.float32, 4) if smoke else (8192, jnp.bfloat16, 20)
  ka, kb = jax.random.split(jax.random.key(0))  # Random data: zeros run faster than real inputs on some GPUs.
  a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  s = median_s(lambda: jax.block_until_ready([f(a, b) for _ in range(reps)]), 5)
  return 2 * n**3 * reps / s / 1e12


def time_rflow_jax(config, steps: int, dump_dir: str | None = None) -> dict:
  """Compile seconds and median step seconds of config's jitted train step on a random batch (see dump())."""
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import tasks, trainer  # pylint: disable=g-import-not-at-top

  setup = trainer.Setup(config, devices=jax.devices()[:1])
  spec = setup.task.batch_spec(config.train.global_batch_size)
  batch = setup.global_batch(tasks.random_batch(spec, setup.task.tokenizer.vocab_size))
  state = setup.init_state()
  t0 = time.perf_counter()
  with setup.step_context():
    compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    holder["state"], holder["metrics"] = compiled(holder["state"], batch)
    jax.block_until_ready(holder["metrics"])

  step(), step()  # Warm-up.
  out = {
      "step_s": median_s(step, steps),
      "compile_s": compile_s,
      "loss": float(holder["metrics"]["loss"]),
      "device": str(jax.devices()[0].device_kind),
  }
  if dump_dir:  # After the timing, which it must not disturb.
    out["dump"] = dump(compiled, step, dump_dir)
  return out


MAX_DUMP_BYTES = 15 * 2**20  # The device tool brings back files of at most 16 MiB.


def dump(compiled, step, dump_dir: str) -> dict:
  """Writes what a later session can study without the GPU: the optimised HLO (hlo.txt.gz) and the profiler's
  Perfetto trace of two steps (trace.json.gz; read it with benchmarks/profile_step.py's kernel_times). Failures are
  reported, not raised: the step time is already measured."""
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  os.makedirs(dump_dir, exist_ok=True)
  written = {}
  try:
    with gzip.open(os.path.join(dump_dir, "hlo.txt.gz"), "wt") as f:
      f.write(compiled.as_text())
    written["hlo"] = "hlo.txt.gz"
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        step(), step()
      (path,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
      if os.path.getsize(path) > MAX_DUMP_BYTES:
        raise ValueError(f"trace of {os.path.getsize(path)} bytes > {MAX_DUMP_BYTES}: not kept")
      shutil.copy(path, os.path.join(dump_dir, "trace.json.gz"))
      written["trace"] = "trace.json.gz (2 steps)"
  except Exception as e:  # pylint: disable=broad-exception-caught
    written["error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return written


def time_diffusers(config, steps: int, compile_: bool) -> dict:
  """The same step in diffusers/PyTorch: autocast, MSE, backward, clipping, fused AdamW, EMA; optional compile."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
  from rflow_jax.export import diffusers as export  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import registry  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import optimizer as optim_lib  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  model = registry.build_model(config)  # The module definition only: diffusers_config reads its fields.
  cfg = {k: v for k, v in export.diffusers_config(model).items() if not k.startswith("_")}
  with dev:  # Initialised on the device: a 2B model's init on the host takes longer than its timed steps.
    net = SD3Transformer2DModel(**cfg)
  o = config.optim
  ps = list(net.parameters())
  groups = [  # AdamW as ours: decay only on matrices.
      {"params": [p for p in ps if p.ndim >= 2], "weight_decay": o.weight_decay},
      {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, fused=cuda, foreach=not cuda)
  ema = [p.detach().clone() for p in ps]
  ema_decay = float(optim_lib.ema_decay(0, o.ema_decay))
  fwd = torch.compile(net) if compile_ else net
  b, s, ch = config.train.global_batch_size, config.data.image_size, config.model.in_channels
  z, target = torch.randn(b, ch, s, s, device=dev), torch.randn(b, ch, s, s, device=dev)
  t = torch.rand(b, device=dev) * 1000
  ctx = torch.randn(b, 2 * config.text.max_length, cfg["joint_attention_dim"], device=dev)
  pooled = torch.randn(b, cfg["pooled_projection_dim"], device=dev)
  dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
      out = fwd(hidden_states=z, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]
    loss = torch.mean(torch.square(out.float() - target))
    loss.backward()
    if o.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(ps, o.grad_clip_norm, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, ps, 1.0 - ema_decay)  # pylint: disable=protected-access
    losses.append(float(loss.detach()))  # Synchronises.

  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  step()
  return {
      "step_s": median_s(step, steps),
      "compile_s": compile_s,
      "loss": losses[-1],
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "torch": torch.__version__,
      "autocast": str(dtype),
  }


def torch_matmul_tflops(smoke: bool) -> float:
  """torch's rate on the same matmul as jax_matmul_tflops."""
  import torch  # pylint: disable=g-import-not-at-top

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  n, dtype, reps = (256, torch.float32, 4) if smoke else (8192, torch.bfloat16, 20)
  a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def run():
    for _ in range(reps):
      a @ b
    sync()

  run()
  return 2 * n**3 * reps / median_s(run, 5) / 1e12


def shapes_config(args):
  """configs/shapes.py:gpu (its batch, bf16; depth 1, width 64, batch 4, float32 for --smoke)."""
  from configs import shapes  # pylint: disable=g-import-not-at-top

  c = shapes.get_config("gpu")
  if args.smoke:
    c.train.global_batch_size, c.model.dtype = 4, "float32"
    c.model.depth, c.model.hidden_size, c.model.num_heads = 1, 64, 1
  return c


def run_part(args) -> dict:
  """One part's result (in this process)."""
  from rflow_jax.utils import flops as flops_lib  # pylint: disable=g-import-not-at-top

  config = sd3_config(args)
  flops = flops_lib.train_flops_per_step(config)
  if args.part.startswith("rflow_jax:"):
    _, config.model.attention_impl, config.model.remat, *unrolled = args.part.split(":")
    config.model.scan_blocks = not unrolled
    r = time_rflow_jax(config, args.steps)
    r.update(attention_impl=config.model.attention_impl, remat=config.model.remat, scan_blocks=not unrolled)
    return {**r, "flops_per_step": flops, "matmul_tflops": jax_matmul_tflops(args.smoke)}
  if args.part == "rflow_jax":
    error = None
    try:
      r = time_rflow_jax(config, args.steps, args.dump_dir)
    except Exception as e:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      error = f"{type(e).__name__}: {str(e)[:300]}"
    if error:  # Outside the handler: the traceback's frames (and their device arrays) are gone.
      # One GPU call is all a lease may allow: rather than no number, retry once with the portable attention and the
      # preset's memory policy, and say so in the result.
      from configs import sd3  # pylint: disable=g-import-not-at-top

      config.model.attention_impl, config.model.remat = "einsum", sd3.pod_defaults(config.model.depth)[0]
      r = {**time_rflow_jax(config, args.steps, args.dump_dir), "retried_after": error}
      r["attention_impl"], r["remat"] = config.model.attention_impl, config.model.remat
    return {**r, "flops_per_step": flops, "matmul_tflops": jax_matmul_tflops(args.smoke)}
  if args.part.startswith("diffusers"):
    r = time_diffusers(config, args.steps, compile_=args.part == "diffusers_compile")
    return {**r, "flops_per_step": flops, "matmul_tflops": torch_matmul_tflops(args.smoke)}
  c = shapes_config(args)
  r = time_rflow_jax(c, args.steps)
  return {**r, "examples_per_s": c.train.global_batch_size / r["step_s"], "batch": c.train.global_batch_size}


def spawn(part: str, argv: list[str], timeout_s: float) -> dict:
  """Runs `--part=part` in a new process group; its last stdout line (JSON), or {"error": ...}."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--part={part}", *argv]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)  # stderr: ours.
  try:
    out, _ = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # With its children (torch.compile's workers).
    proc.communicate()
    return {"error": f"timeout after {timeout_s:.0f} s"}
  lines = out.strip().splitlines()
  if proc.returncode != 0 or not lines:
    return {"error": f"exit status {proc.returncode} (its traceback is on stderr)"}
  try:
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 1)}
  except ValueError:  # Something printed after the part's JSON line.
    return {"error": f"no JSON line last on stdout: {lines[-1][:200]!r}"}


def summarize(args, results: dict) -> dict:
  """The final JSON object: per side step time, TFLOP/s, MFU, peak fraction; speedups; shapes; config."""
  flops = next((r["flops_per_step"] for r in results.values() if "flops_per_step" in r), None)
  out = {}
  for name in ["rflow_jax", "diffusers_eager", "diffusers_compile"] + [p for p in results if ":" in p]:
    r = results.get(name)
    if r is None or "error" in r:
      out[name] = r
      continue
    tflops = flops / r["step_s"] / 1e12
    out[name] = {
        "step_s": round(r["step_s"], 4),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / args.peak_tflops, 4),
        "peak_fraction": round(tflops / r["matmul_tflops"], 4),
        "matmul_tflops": round(r["matmul_tflops"], 1),
        "compile_s": round(r["compile_s"], 1),
        "loss": r["loss"],
        "device": r["device"],
        **{
            k: r[k]
            for k in ("torch", "autocast", "retried_after", "attention_impl", "remat", "scan_blocks", "dump")
            if k in r
        },
    }
  ours = out.get("rflow_jax")
  for peer in ("diffusers_eager", "diffusers_compile"):
    if ours and "step_s" in ours and out.get(peer) and "step_s" in out[peer]:
      out[f"speedup_vs_{peer.split('_')[1]}"] = round(out[peer]["step_s"] / ours["step_s"], 3)
  s = results.get("shapes")
  out["shapes_gpu"] = (
      s
      if s is None or "error" in s
      else {
          "step_s": round(s["step_s"], 4),
          "examples_per_s": round(s["examples_per_s"], 1),
          "batch": s["batch"],
          "compile_s": round(s["compile_s"], 1),
      }
  )
  c = sd3_config(args)
  m = c.model
  out["config"] = {
      "variant": "d2" if args.smoke else "d24",
      "width": m.hidden_size,
      "depth": m.depth,
      "image_tokens": (c.data.image_size // m.patch_size) ** 2,
      "text_tokens": 2 * c.text.max_length,
      "batch": args.batch,
      "dtype": m.dtype,
      "remat": m.remat,
      "attention_impl": m.attention_impl,
      "flops_per_step": flops,
      "peak_tflops": args.peak_tflops,
      "smoke": args.smoke,
  }
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.part:
    # Set before JAX starts a backend. The torch parts touch JAX only for the config and the EMA decay: on the CPU, or
    # JAX's allocator would reserve 75% of the GPU there. The JAX parts take 95% (the d24 step at batch 32 without
    # remat needs ~112 GiB: 74 GiB of temporaries beside the 38 GiB of params, grads, AdamW moments and EMA).
    if args.part.startswith("diffusers"):
      os.environ["JAX_PLATFORMS"] = "cpu"  # Whatever the caller's: this process's GPU memory is torch's.
    else:
      os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    print(json.dumps(run_part(args)), flush=True)
    return
  forward = [a for a in argv if not a.startswith(("--parts", "--budget_s"))]
  deadline = time.monotonic() + args.budget_s
  results = {}
  for part in args.parts.split(","):
    left = deadline - time.monotonic()
    if part == "diffusers_compile" and args.smoke:
      results[part] = {"error": "skipped: --smoke runs no torch.compile"}
    elif left < 10:
      results[part] = {"error": f"skipped: {args.budget_s:.0f} s budget spent"}
    else:
      results[part] = spawn(part, forward, min(left, VARIANT_CAP_S if ":" in part else PART_CAP_S.get(part, left)))
    print(json.dumps({part: results[part]}), flush=True)
  print(json.dumps(summarize(args, results)), flush=True)


if __name__ == "__main__":
  main()
