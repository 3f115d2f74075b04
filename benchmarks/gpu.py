"""One-GPU performance call: the d24 (2B) train step at 256² in bf16, rflow_jax vs diffusers, plus shapes:gpu examples/s.

  python launch/no_tf.py benchmarks/gpu.py [--batch=32] [--steps=10] [--peak_tflops=989]   # on one H100/H200
  python benchmarks/gpu.py --smoke                                                       # anywhere: a tiny size, CPU ok
  (on a lent device machine: `make device-wheels` here, then run(command="bash launch/device_perf.sh", carry=[".whl"]))

1. rflow_jax: configs/sd3.py:d24 (width 1536, 24 heads, qk RMS-norm, 2x2 patches on 32x32x16 latents = 256 image
   tokens, 2 x 77 text tokens), bf16 compute, float32 params, blocks scanned (compile time), attention_impl "auto"
   (cuDNN flash on NVIDIA), the jitted `Setup.train_step` (AdamW, EMA, donation) at --batch.
2. diffusers: SD3Transformer2DModel with the same config (rflow_jax.export.diffusers.diffusers_config), float32
   params, bf16 autocast, torch.compile, fused AdamW, the same batch and token counts; skipped (null) when torch with
   CUDA or diffusers is not importable there.
3. configs/shapes.py:gpu's train step: examples/s.

Step time is the median of --steps timed steps after warm-up (compile time apart). TFLOP/s counts model FLOPs
(rflow_jax.utils.flops: 6·params·tokens + attention, the same count for both sides); MFU = TFLOP/s / --peak_tflops
(989: H100/H200 SXM dense bf16 tensor-core peak). The last line printed is one JSON object.
--smoke: sd3.py:d2 on 8x8 latents with 2 x 8 text tokens, batch 2, 2 steps, float32, no torch.compile; shapes:gpu at
depth 1, width 64, batch 4: exercises the code on a CPU.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

H100_BF16_PEAK_TFLOPS = 989.0  # Dense bf16 tensor-core peak of an H100 SXM / H200 (NVIDIA datasheets).


def parse_args(argv=None):
  """Command-line options (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
  p.add_argument("--smoke", action="store_true", help="Tiny sizes, float32, no torch.compile (runs on a CPU).")
  p.add_argument("--skip_diffusers", action="store_true")
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    raise SystemExit(f"error: --batch={args.batch} and --steps={args.steps} must be >= 1")
  if args.smoke:
    args.batch, args.steps = 2, 2
  return args


def sd3_config(args):
  """configs/sd3.py:d24 at --batch (d2 in float32 for --smoke)."""
  from configs import sd3  # pylint: disable=g-import-not-at-top

  c = sd3.get_config("d2" if args.smoke else "d24")
  c.train.global_batch_size = args.batch
  c.model.scan_blocks = True
  c.model.attention_impl = "einsum" if args.smoke else "auto"
  if args.smoke:
    c.model.dtype = "float32"
    c.data.image_size, c.model.pos_embed_max_size, c.text.max_length = 8, 4, 8
  c.sharding.mesh_shape = (1, 1, 1)  # One device.
  return c


def time_rflow_jax(config, steps: int) -> dict:
  """Compile seconds and median step seconds of config's jitted train step on a random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  setup = trainer.Setup(config, devices=jax.devices()[:1])
  b, s, ch = config.train.global_batch_size, config.data.image_size, config.model.in_channels
  rng = np.random.RandomState(0)
  batch = setup.global_batch(
      {
          "image": rng.uniform(-1, 1, (b, s, s, ch)).astype(np.float32),
          "tokens": rng.randint(1, setup.task.tokenizer.vocab_size, (b, config.text.max_length)).astype(np.int32),
      }
  )
  state = setup.init_state()
  t0 = time.perf_counter()
  with setup.step_context():
    compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # Warm-up.
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  del jnp
  return {
      "step_s": statistics.median(times),
      "compile_s": compile_s,
      "loss": float(m["loss"]),
      "model": setup.task.model,
  }


def time_diffusers(config, model, steps: int, compile_: bool) -> dict:
  """The same step in diffusers/PyTorch: bf16 autocast (on CUDA), fused AdamW, optional torch.compile."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
  from rflow_jax.export import diffusers as export  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  net = SD3Transformer2DModel(**{k: v for k, v in export.diffusers_config(model).items() if not k.startswith("_")}).to(
      dev
  )
  opt = torch.optim.AdamW(net.parameters(), lr=config.optim.learning_rate, fused=cuda)
  fwd = torch.compile(net) if compile_ else net
  b, s, ch = config.train.global_batch_size, config.data.image_size, config.model.in_channels
  z = torch.randn(b, ch, s, s, device=dev)
  target = torch.randn_like(z)
  t = torch.rand(b, device=dev) * 1000
  ctx = torch.randn(b, 2 * config.text.max_length, config.text.width, device=dev)
  pooled = torch.randn(b, config.text.width, device=dev)
  dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
      out = fwd(hidden_states=z, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]
    loss = torch.mean(torch.square(out.float() - target))
    loss.backward()
    opt.step()
    if cuda:
      torch.cuda.synchronize()
    return float(loss.detach())

  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {
      "step_s": statistics.median(times),
      "compile_s": compile_s,
      "device": str(dev),
      "torch_compile": compile_,
      "autocast": str(dtype),
  }


def shapes_gpu_examples_per_s(args) -> dict:
  """configs/shapes.py:gpu's train step (its batch, bf16; batch 4 in float32 for --smoke)."""
  from configs import shapes  # pylint: disable=g-import-not-at-top

  c = shapes.get_config("gpu")
  if args.smoke:
    c.train.global_batch_size, c.model.dtype = 4, "float32"
    c.model.depth, c.model.hidden_size, c.model.num_heads = 1, 64, 1
  r = time_rflow_jax(c, args.steps)
  return {
      "step_s": round(r["step_s"], 4),
      "examples_per_s": round(c.train.global_batch_size / r["step_s"], 1),
      "batch": c.train.global_batch_size,
      "compile_s": round(r["compile_s"], 1),
  }


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.utils import flops as flops_lib  # pylint: disable=g-import-not-at-top

  config = sd3_config(args)
  flops = flops_lib.train_flops_per_step(config)
  rate = lambda step_s: {
      "tflops": round(flops / step_s / 1e12, 4),
      "mfu": round(flops / step_s / 1e12 / args.peak_tflops, 6),
  }
  ours = time_rflow_jax(config, args.steps)
  print(json.dumps({"rflow_jax": {"step_s": ours["step_s"], **rate(ours["step_s"])}}), flush=True)
  result = {
      "rflow_jax": {
          "step_s": round(ours["step_s"], 4),
          **rate(ours["step_s"]),
          "compile_s": round(ours["compile_s"], 1),
          "loss": ours["loss"],
      }
  }
  try:
    if args.skip_diffusers:
      raise ImportError("--skip_diffusers")
    peer = time_diffusers(config, ours["model"], args.steps, compile_=not args.smoke)
    result["diffusers"] = {
        "step_s": round(peer["step_s"], 4),
        **rate(peer["step_s"]),
        **{k: v for k, v in peer.items() if k != "step_s"},
    }
    result["speedup_vs_diffusers"] = round(peer["step_s"] / ours["step_s"], 3)
  except ImportError as e:  # No torch / diffusers on the machine: report ours only.
    result["diffusers"] = None
    result["diffusers_skipped"] = str(e)
  result["shapes_gpu"] = shapes_gpu_examples_per_s(args)
  m = config.model
  result["config"] = {
      "variant": "d2" if args.smoke else "d24",
      "width": m.hidden_size,
      "depth": m.depth,
      "image_tokens": (config.data.image_size // m.patch_size) ** 2,
      "text_tokens": 2 * config.text.max_length,
      "batch": args.batch,
      "dtype": m.dtype,
      "attention_impl": m.attention_impl,
      "flops_per_step": flops,
      "peak_tflops": args.peak_tflops,
      "smoke": args.smoke,
  }
  result["device"] = str(jax.devices()[0].device_kind)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
