"""SD3's VAE configuration on this machine: parameter count, encode and decode throughput; prints one JSON line last.

  python benchmarks/vae.py [--size=256] [--batch=1] [--reps=3]

The SD3 architecture (widths (128, 256, 512, 512), 2 res blocks per level, 16 latent channels, no quant convs) with
random weights (throughput does not depend on them), float32. Encode = images -> (mean, logvar); decode = latents ->
images. Each is jitted, run once to compile (timed separately), then timed over `reps` calls (the median is
reported), as images/s.
"""

import json
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

flags.DEFINE_integer("size", 256, "Image side.")
flags.DEFINE_integer("batch", 1, "Images per call.")
flags.DEFINE_integer("reps", 3, "Timed calls (after the compiling one).")
FLAGS = flags.FLAGS


def _time(fn, *args, reps: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `reps` further calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def main(argv):
  del argv
  from rflow_jax.model import vae as vae_lib  # pylint: disable=g-import-not-at-top

  model = vae_lib.AutoencoderKL()  # SD3's configuration (the defaults).
  s, b, f = FLAGS.size, FLAGS.batch, vae_lib.AutoencoderKL().downsample_factor
  model.check_image_size(s, s)
  images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (b, s, s, 3)), jnp.float32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:1, :f, :f])["params"])
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
  latents = jnp.zeros((b, s // f, s // f, model.latent_channels), jnp.float32)
  enc_first, enc_s = _time(encode, params, images, reps=FLAGS.reps)
  dec_first, dec_s = _time(decode, params, latents, reps=FLAGS.reps)
  print(
      json.dumps(
          {
              "config": "sd3",
              "params": num_params,
              "size": s,
              "batch": b,
              "reps": FLAGS.reps,
              "device": jax.devices()[0].device_kind,
              "num_devices": jax.device_count(),
              "encode_compile_s": round(enc_first, 2),
              "decode_compile_s": round(dec_first, 2),
              "encode_s": round(enc_s, 4),
              "decode_s": round(dec_s, 4),
              "encode_images_per_s": round(b / enc_s, 3),
              "decode_images_per_s": round(b / dec_s, 3),
          }
      )
  )


if __name__ == "__main__":
  app.run(main)
