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
):
  """Jitted body: tokens (B, L), keys (B,) -> images (B, H, W, C) in data space (decoded by `vae` if given)."""
  cond = text_encoders.drop_and_compose(text_stack.apply({"params": text_params}, tokens), None, 0.0)
  uncond = text_encoders.negative_condition(text_stack, text_params, cond, empty_tokens)
  x_init = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(keys)  # (B, H, W, C) pure noise

  def rf_velocity(x, sigma, c):  # Any formulation's network, seen as an rf velocity field at noise level sigma.
    net = lambda z, t: model.apply({"params": params}, z, t, *c)
    return formulation.as_velocity_fn(net)(x, sigma)

  velocity_fn = guidance.cfg_velocity(rf_velocity, cond, uncond, cfg_scale)
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
      self, *, model, text_stack, tokenizer, formulation, sample_config, image_shape, vae=None, empty_tokens=None
  ):
    """`image_shape`: what the backbone generates; `vae`: (AutoencoderKL, params) decoding it when it is a latent;
    `empty_tokens`: the empty prompt's tokens when training dropped encoders to it (text.drop_to="empty")."""
    self.tokenizer = tokenizer
    self.config = sample_config
    self.image_shape = tuple(image_shape)
    if vae is not None:
      f = vae[0].downsample_factor
      self.image_shape = (image_shape[0] * f, image_shape[1] * f, vae[0].out_channels)
    sigmas = jnp.asarray(
        schedules.flow_sigmas(sample_config.num_steps, sample_config.shift, sample_config.schedule), jnp.float32
    )
    self._fn = jax.jit(
        functools.partial(
            _sample,
            model=model,
            text_stack=text_stack,
            formulation=formulation,
            image_shape=tuple(image_shape),
            sigmas=sigmas,
            solver=sample_config.solver,
            cfg_scale=sample_config.cfg_scale,
            vae=vae,
            empty_tokens=empty_tokens,
        )
    )

  @classmethod
  def from_config(cls, config, *, model, text_stack, tokenizer, vae=None):
    """The sampler of a run's config: its formulation, config.sample and image shape (latents decoded by `vae`)."""
    return cls(
        model=model,
        text_stack=text_stack,
        tokenizer=tokenizer,
        vae=vae,
        empty_tokens=text_encoders.drop_tokens(config.text, tokenizer),
        formulation=formulations.get(config.flow.formulation, shift=config.flow.shift),
        sample_config=config.sample,
        image_shape=(config.data.image_size, config.data.image_size, config.model.in_channels),
    )

  def generate(self, params, text_params, prompts, seed: int) -> np.ndarray:
    """uint8 images (N, H, W, C) for N prompts; batches are padded to one shape so the sampler compiles once."""
    bs = self.config.batch_size
    base = jax.random.key(seed)
    out = []
    for start in range(0, len(prompts), bs):
      chunk = list(prompts[start : start + bs])
      n = len(chunk)
      chunk += [""] * (bs - n)  # Padding prompts; their images are dropped.
      tokens = jnp.asarray(self.tokenizer.batch(chunk))
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + bs))
      out.append(pixels.to_uint8(self._fn(params, text_params, tokens, keys))[:n])
    return np.concatenate(out) if out else np.zeros((0,) + self.image_shape, np.uint8)

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
