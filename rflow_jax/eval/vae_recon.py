"""The "vae_recon" evaluator: how well a VAE reconstructs a fixed held-out set of shapes images.

Scores (prefixed "vae_recon/" by the trainer): PSNR and SSIM of the reconstructions (images mapped to [0, 1]; SSIM
with the usual 11x11 Gaussian window of σ 1.5, K1 0.01, K2 0.03, averaged over channels and positions), and
ShapesEval accuracy of the reconstructions and of the originals on the same scenes' sentence prompts
(`shapes_overall` vs `shapes_overall_original`; a VAE good enough for latent training keeps the originals' score).

The held-out scenes come from shapes_scenes.eval_scenes (a seed stream disjoint from the training records). Images and a
side-by-side grid (originals above reconstructions) go to out_dir.

The trainer runs it every train.eval_every steps and at the end; on a workdir's newest checkpoint (EMA weights):

  python -m rflow_jax.eval.vae_recon --workdir=runs/shapes_vae    # prints one JSON line; writes WORKDIR/eval_step{N}/
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.data import pixels, shapes, shapes_scenes
from rflow_jax.eval import shapes_eval
from rflow_jax.sampling import pipeline as sampling

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(images: jax.Array, reference: jax.Array) -> jax.Array:
  """Per-example PSNR in dB of [-1, 1] images (peak 1 after mapping to [0, 1]): shape (B,)."""
  err = (images.astype(jnp.float32) - reference.astype(jnp.float32)) / 2.0
  mse = jnp.mean(err**2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def ssim(images: jax.Array, reference: jax.Array) -> jax.Array:
  """Per-example SSIM of [-1, 1] NHWC images (valid-window Gaussian filtering): shape (B,)."""
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  y = (reference.astype(jnp.float32) + 1.0) / 2.0
  t = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2.0
  g = np.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
  g /= g.sum()

  def band(n):  # (n - W + 1, n): row i holds the window at offsets i..i+W-1 ('valid' borders).
    m = np.zeros((n - SSIM_WINDOW + 1, n), np.float32)
    for i in range(m.shape[0]):
      m[i, i : i + SSIM_WINDOW] = g
    return jnp.asarray(m)

  mh, mw = band(x.shape[1]), band(x.shape[2])
  blur = lambda a: jnp.einsum("ih,jw,bhwc->bijc", mh, mw, a)  # Separable Gaussian, per channel.

  c1, c2 = SSIM_K1**2, SSIM_K2**2
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def heldout_set(per_kind: int, seed: int, size: int) -> tuple[np.ndarray, list[str]]:
  """The fixed held-out images ((N, S, S, 3) float32 in [-1, 1]) and their sentence prompts."""
  scenes = shapes_scenes.eval_scenes(per_kind, seed, size)
  images = np.stack([shapes.render(s, size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
  return images, [shapes.caption(s, "sentence") for s in scenes]


def evaluate(task, state, step: int, out_dir: str) -> dict[str, float]:
  """Reconstructs the task's held-out set with its evaluation weights; returns and writes the scores.

  Args:
    task: a VAETask (its `reconstruct(state, images)` and `config.vae.eval_*` / `config.data.image_size`).
    state: the training state.
    step: the training step (recorded in scores.json).
    out_dir: where scores.json and recon.png go (created).

  Returns:
    {"psnr", "ssim", "shapes_overall", "shapes_overall_original"} (floats).
  """
  v = task.config.vae
  images, prompts = heldout_set(v.eval_per_kind, v.eval_seed, task.config.data.image_size)
  recon = np.asarray(task.reconstruct(state, images))
  recon_u8, images_u8 = pixels.to_uint8(recon), pixels.to_uint8(images)
  # Scored on the uint8 images a user would save: rounding is part of what the VAE hands on.
  as_float = lambda u8: jnp.asarray(u8, jnp.float32) / 127.5 - 1.0
  scores = {
      "psnr": float(jnp.mean(psnr(as_float(recon_u8), as_float(images_u8)))),
      "ssim": float(jnp.mean(ssim(as_float(recon_u8), as_float(images_u8)))),
      "shapes_overall": shapes_eval.evaluate(list(recon_u8), prompts)["overall"],
      "shapes_overall_original": shapes_eval.evaluate(list(images_u8), prompts)["overall"],
  }
  os.makedirs(out_dir, exist_ok=True)
  pairs = np.concatenate([images_u8[:12], recon_u8[:12]])
  sampling.save_png(sampling.make_grid(pairs, ncols=min(12, len(images_u8))), os.path.join(out_dir, "recon.png"))
  with open(os.path.join(out_dir, "scores.json"), "w") as f:
    json.dump({"step": step, "n": len(prompts), **scores}, f, indent=2)
  return scores
