"""Prompts -> tokens -> frozen text encoders -> one jitted guided solve -> images (and grids, PNGs, ShapesEval).

Used by the trainer (periodic grids, the end-of-training eval) and by `python -m rflow_jax.sample`. The initial noise
of prompt i is drawn from k_i = fold_in(key(seed), i), and a stochastic solver's per-step noise from fold_in(k_i, 1),
so an image depends only on (params, prompt, seed, i), never on how prompts were batched.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rflow_jax.data import pixels
from rflow_jax.flow import formulations
from rflow_jax.model import text_encoders, vae as vae_lib
from rflow_jax.sampling import guidance, schedules, solvers


def make_grid(images: np.ndarray, ncols: int = 8, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image on a grey background."""
  n, h, w, c = images.shape
  ncols = min(ncols, n)
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 64, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  Image.fromarray(image).save(path)


def _sample(
    params,
    text_params,
    tokens,
    keys,
    noise=None,
    negative_tokens=None,
    *,
    model,
    text_stack,
    formulation,
    image_shape,
    sigmas,
    solver,
    cfg_scale,
    vae=None,
    empty_tokens=None,
    interval=None,
    skip=None,
):
  """Jitted body: tokens (B, L), keys (B,) -> images (B, H, W, C) in data space (decoded by `vae` if given).

  `noise` (B, H, W, C) replaces the keys' initial noise; `negative_tokens` (B, L) replace the stack's default negative.
  """
  cond = text_encoders.drop_and_compose(text_stack.apply({"params": text_params}, tokens), None, 0.0)
  if negative_tokens is None:
    uncond = text_encoders.negative_condition(text_stack, text_params, cond, empty_tokens)
  else:
    uncond = text_encoders.drop_and_compose(text_stack.apply({"params": text_params}, negative_tokens), None, 0.0)
  if noise is None:
    x_init = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(keys)  # (B, H, W, C) pure noise
  else:
    x_init = noise.astype(jnp.float32)

  def velocity_of(net_model):
    def rf_velocity(x, sigma, c):  # Any formulation's network, seen as an rf velocity field at noise level sigma.
      net = lambda z, t: net_model.apply({"params": params}, z, t, *c)
      return formulation.as_velocity_fn(net)(x, sigma)

    return rf_velocity

  skip_args = None
  if skip is not None:  # (SkipLayerGuidance, (σ_lo, σ_hi)): the same params in the model that skips its layers.
    slg, lo_hi = skip
    skip_args = (velocity_of(model.clone(skip_layers=tuple(slg.layers))), slg.scale, lo_hi)
  velocity_fn = guidance.cfg_velocity(velocity_of(model), cond, uncond, cfg_scale, interval, skip_args)
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1)  # A stream apart from x_init's.
  x = solvers.sample(velocity_fn, x_init, sigmas, solver, key=step_keys)
  if vae is None:
    return x
  vae_model, vae_params = vae
  latents = vae_lib.denormalize_latents(x, vae_model.scaling_factor, vae_model.shift_factor)
  return vae_model.apply({"params": vae_params}, latents, method="decode").astype(jnp.float32)


class Sampler:
  """A compiled sampler for one (model, text stack, formulation, sampling config, image shape)."""

  def __init__(
      self,
      *,
      model,
      text_stack,
      tokenizer,
      formulation,
      sample_config,
      image_shape,
      vae=None,
      empty_tokens=None,
      guidance_interval=None,
      skip_layer_guidance=None,
  ):
    """`image_shape`: what the backbone generates; `vae`: (AutoencoderKL, params) decoding it when it is a latent;
    `empty_tokens`: the empty prompt's tokens when training dropped encoders to it (text.drop_to="empty");
    `guidance_interval`: (σ_lo, σ_hi) where classifier-free guidance applies (None: everywhere);
    `skip_layer_guidance`: a guidance.SkipLayerGuidance (None or no layers: off)."""
    self.tokenizer = tokenizer
    self.config = sample_config
    self.latent_shape = self.image_shape = tuple(image_shape)
    if vae is not None:
      f = vae[0].downsample_factor
      self.image_shape = (image_shape[0] * f, image_shape[1] * f, vae[0].out_channels)
    sigmas = schedules.flow_sigmas(sample_config.num_steps, sample_config.shift, sample_config.schedule)
    skip = None
    if skip_layer_guidance is not None:
      skip_layer_guidance.check(model.depth)
      lo_hi = skip_layer_guidance.step_sigmas(sigmas)
      # As diffusers: only with classifier-free guidance on (g > 1) and at the steps of its rule.
      skip = (skip_layer_guidance, lo_hi) if lo_hi is not None and sample_config.cfg_scale > 1 else None
    self._fn = jax.jit(
        functools.partial(
            _sample,
            model=model,
            text_stack=text_stack,
            formulation=formulation,
            image_shape=tuple(image_shape),
            sigmas=jnp.asarray(sigmas, jnp.float32),
            solver=sample_config.solver,
            cfg_scale=sample_config.cfg_scale,
            vae=vae,
            empty_tokens=empty_tokens,
            interval=None if guidance_interval is None else tuple(float(s) for s in guidance_interval),
            skip=skip,
        )
    )

  @classmethod
  def from_config(
      cls, config, *, model, text_stack, tokenizer, vae=None, guidance_interval=None, skip_layer_guidance=None
  ):
    """The sampler of a run's config: its formulation, config.sample and image shape (latents decoded by `vae`)."""
    return cls(
        guidance_interval=guidance_interval,
        skip_layer_guidance=skip_layer_guidance,
        model=model,
        text_stack=text_stack,
        tokenizer=tokenizer,
        vae=vae,
        empty_tokens=text_encoders.drop_tokens(config.text, tokenizer),
        formulation=formulations.get(config.flow.formulation, shift=config.flow.shift),
        sample_config=config.sample,
        image_shape=(config.data.image_size, config.data.image_size, config.model.in_channels),
    )

  def generate(
      self, params, text_params, prompts, seed: int, *, noise=None, negative_prompts=None, as_float: bool = False
  ) -> np.ndarray:
    """Images (N, H, W, C) for N prompts; batches are padded to one shape so the sampler compiles once.

    Args:
      params, text_params: the backbone's and the text stack's weights.
      prompts: N texts.
      seed: the initial (and stochastic solvers') noise of prompt i comes from fold_in(key(seed), i).
      noise: optional (N, *latent_shape) float32 initial noise (NHWC) instead of the seed's.
      negative_prompts: optional N texts for the classifier-free-guidance negative (None: the stack's default).
      as_float: float32 images in data space ([-1, 1]) instead of uint8.
    """
    bs = self.config.batch_size
    base = jax.random.key(seed)
    if noise is not None and tuple(noise.shape) != (len(prompts),) + self.latent_shape:
      raise ValueError(f"initial noise of shape {tuple(noise.shape)}, expected {(len(prompts),) + self.latent_shape}")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
      raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    out = []
    for start in range(0, len(prompts), bs):
      n = len(prompts[start : start + bs])
      pad = lambda texts: list(texts[start : start + bs]) + [""] * (bs - n)  # Padding prompts; images dropped.
      tokens = jnp.asarray(self.tokenizer.batch(pad(prompts)))
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + bs))
      x0 = None
      if noise is not None:
        x0 = np.zeros((bs,) + self.latent_shape, np.float32)
        x0[:n] = noise[start : start + n]
      negative = None if negative_prompts is None else jnp.asarray(self.tokenizer.batch(pad(negative_prompts)))
      images = self._fn(params, text_params, tokens, keys, x0, negative)
      out.append(np.asarray(images)[:n] if as_float else pixels.to_uint8(images)[:n])
    if not out:
      return np.zeros((0,) + self.image_shape, np.float32 if as_float else np.uint8)
    return np.concatenate(out)

  def params_of(self, state):
    """The weights this sampler uses from a TrainState (EMA unless sample.use_ema is False)."""
    return state.ema_params if self.config.use_ema else state.params

  def write_grid(self, state, step: int, workdir: str, writer) -> np.ndarray:
    """Samples the config's fixed grid prompts; writes TensorBoard images and WORKDIR/samples/grid_<step>.png."""
    images = self.generate(
        self.params_of(state), state.text_params, list(self.config.grid_prompts), self.config.eval_seed
    )
    grid = make_grid(images, ncols=4)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    save_png(grid, os.path.join(workdir, "samples", f"grid_{step:06d}.png"))
    writer.write_images(step, {"samples": grid[None]})
    return grid
