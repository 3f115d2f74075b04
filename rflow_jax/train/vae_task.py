"""The "vae" training task: a KL autoencoder (rflow_jax.model.vae) trained as the LDM/SD autoencoders are.

Loss of the autoencoder, per example and normalised per pixel (so weights mean what they mean in the LDM code, whose
losses are sums over pixels):

  L = |x - x̂|₁ (mean over pixels)                                  reconstruction
    + vae.kl_weight · KL(q(z|x) || N(0, I)) / (H·W·C)               KL, summed over latent elements
    + vae.perceptual_weight · d(x, x̂)                               perceptual hook (off by default)
    + λ · vae.disc_weight · (-E[D(x̂)])                             hinge GAN, from step vae.disc_start

with λ = ‖∇_w L_rec‖ / (‖∇_w L_gan‖ + 1e-4), w = the decoder's last conv kernel, clipped to
[0, vae.adaptive_weight_max] and not differentiated (the LDM "adaptive weight", arXiv 2012.09841 eq. 7). L_rec here is the reconstruction plus
perceptual term. The PatchGAN discriminator (model/patchgan.py) is trained with the hinge loss by its own optimiser
in the same step, on the same reconstructions.

`vae.decoder_only` freezes the encoder (and quant_conv): existing latents stay valid while the decoder improves.
The perceptual network is pluggable: `register_perceptual(name, factory)` where factory(config) returns a pure
function (x, x̂) -> (B,) distances (e.g. LPIPS with weights loaded from a file); `vae.perceptual` names it.

The Task interface (init / train_step / batch_spec / make_iterator / preview) is the one the trainer drives.
"""

import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rflow_jax import config_lib
from rflow_jax.data import pipeline as data_pipeline, pixels, registry as data_registry
from rflow_jax.model import patchgan, registry as model_registry, vae as vae_lib
from rflow_jax.sampling import pipeline as sampling
from rflow_jax.train import optimizer as optim_lib

# The modules `vae.decoder_only` freezes: everything that decides what a latent means.
ENCODER_PARTS = ("encoder", "quant_conv")
ADAPTIVE_EPS = 1e-4
PERCEPTUAL_NETS: dict[str, Callable[[Any], Callable[[jax.Array, jax.Array], jax.Array]]] = {}


def register_perceptual(name: str, factory: Callable[[Any], Callable[[jax.Array, jax.Array], jax.Array]]) -> None:
  """Makes `vae.perceptual=name` use factory(config): a pure (x, x̂) -> per-example distance (B,) function."""
  PERCEPTUAL_NETS[name] = factory


@flax.struct.dataclass
class VAEState:
  """Checkpointed state of VAE training.

  Attributes:
    step / skipped_steps: updates applied / dropped by the non-finite guard (int32 scalars).
    params, opt_state, ema_params: the autoencoder, its optimiser state, its EMA (used for evaluation and export).
    disc_params, disc_opt_state: the discriminator and its optimiser state (empty dicts without one).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  disc_params: Any
  disc_opt_state: Any
  skipped_steps: jax.Array


def _tokenize_nothing(text: str) -> np.ndarray:
  """The shared data pipeline tokenizes captions; an autoencoder reads none (module-level: grain pickles it)."""
  del text
  return np.zeros((1,), np.int32)


def build_model(config) -> vae_lib.AutoencoderKL:
  """The AutoencoderKL of `config.vae`."""
  v = config.vae
  return vae_lib.AutoencoderKL(
      block_out_channels=tuple(v.block_out_channels),
      layers_per_block=v.layers_per_block,
      norm_num_groups=v.norm_num_groups,
      latent_channels=v.latent_channels,
      use_quant_conv=v.use_quant_conv,
      use_post_quant_conv=v.use_post_quant_conv,
      mid_block_attention=v.mid_block_attention,
      scaling_factor=v.scaling_factor,
      shift_factor=v.shift_factor,
      remat=v.remat,
      dtype=model_registry.DTYPES[v.dtype],
  )


def validate(config) -> None:
  """Raises config_lib.ConfigError naming the first bad `vae` field, before anything is built or compiled."""
  v = config.vae

  def require(ok, message):
    if not ok:
      raise config_lib.ConfigError(message)

  require(v.dtype in model_registry.DTYPES, f"vae.dtype={v.dtype!r}; valid: {sorted(model_registry.DTYPES)}")
  model = build_model(config)
  try:
    model.check_config()
    model.check_image_size(config.data.image_size, config.data.image_size)
    if config.model.in_channels != model.in_channels:  # The MM-DiT is configured for latents, so they must agree.
      vae_lib.check_latent_channels(v.latent_channels, config.model.in_channels)
  except ValueError as e:
    raise config_lib.ConfigError(f"vae: {e}") from None
  require(
      v.kl_weight >= 0 and v.perceptual_weight >= 0 and v.disc_weight >= 0,
      f"vae.kl_weight={v.kl_weight}, perceptual_weight={v.perceptual_weight} and disc_weight={v.disc_weight} "
      "must be >= 0",
  )
  require(
      not v.perceptual_weight or v.perceptual in PERCEPTUAL_NETS,
      f"vae.perceptual={v.perceptual!r} is not a registered perceptual network (registered: "
      f"{sorted(PERCEPTUAL_NETS)}); set vae.perceptual_weight=0 to train without one",
  )
  require(
      v.disc_start >= 0 and v.disc_layers > 0 and v.disc_channels > 0,
      f"vae.disc_start={v.disc_start}, disc_layers={v.disc_layers}, disc_channels={v.disc_channels}: "
      "start must be >= 0, layers and channels positive",
  )
  require(v.adaptive_weight_max > 0, f"vae.adaptive_weight_max={v.adaptive_weight_max} must be positive")
  require(
      v.eval_per_kind > 0 and v.preview_examples > 0,
      f"vae.eval_per_kind={v.eval_per_kind} and vae.preview_examples={v.preview_examples} must be positive",
  )


class VAETask:
  """What the trainer trains when config.task == "vae" (see the module docstring for the loss)."""

  buckets = None  # One image size (data.buckets trains the flow task only).
  flops_per_step = None  # No FLOP formula for the autoencoder: the trainer logs no TFLOP/s or MFU for it.

  weight_groups = ("params", "ema_params", "disc_params")

  def __init__(self, config):
    """Builds the autoencoder, the discriminator (if vae.disc_weight > 0) and both optimisers; compiles nothing."""
    validate(config)
    self.config = config
    v = config.vae
    self.model = build_model(config)
    self.use_disc = v.disc_weight > 0
    self.disc = patchgan.PatchDiscriminator(
        channels=v.disc_channels,
        num_layers=v.disc_layers,
        groups=v.norm_num_groups,
        dtype=model_registry.DTYPES[v.dtype],
    )
    self.perceptual = PERCEPTUAL_NETS[v.perceptual](config) if v.perceptual_weight else None
    tx = optim_lib.make_optimizer(config.optim, config.train.num_steps)
    if v.decoder_only:
      label = lambda p: {k: "frozen" if k in ENCODER_PARTS else "train" for k in p}
      tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)
    self.tx = tx
    disc_optim = ml_collections.ConfigDict(config.optim.to_dict())
    disc_optim.learning_rate = v.disc_learning_rate
    self.disc_tx = optim_lib.make_optimizer(disc_optim, config.train.num_steps)

  # --- Interface ------------------------------------------------------------------------------------------------

  def init(self, key) -> VAEState:
    """Fresh state (params still boxed with their logical axes)."""
    k_ae, k_disc = jax.random.split(key)
    s = self.config.data.image_size
    image = jnp.zeros((1, s, s, self.model.in_channels), jnp.float32)
    params = self.model.init(k_ae, image)["params"]
    disc_params = self.disc.init(k_disc, image)["params"] if self.use_disc else {}
    return VAEState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        ema_params=jax.tree.map(lambda p: p, params),
        disc_params=disc_params,
        disc_opt_state=self.disc_tx.init(disc_params),
        skipped_steps=jnp.zeros((), jnp.int32),
    )

  def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = self.config.data.image_size
    return {"image": jax.ShapeDtypeStruct((global_batch_size, s, s, self.model.in_channels), jnp.float32)}

  def make_iterator(self, process_index: int, process_count: int, start: int = 0):
    """The shared grain pipeline (global shuffle, per-process shards) from global stream position `start`; captions
    are not read."""
    c = self.config
    return data_pipeline.make_train_iterator(
        source=data_registry.make_source(c.data),
        tokenize=_tokenize_nothing,
        global_batch_size=c.train.global_batch_size,
        seed=c.seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=c.data.worker_count,
        start=start,
    )

  def train_step(self, state: VAEState, batch) -> tuple[VAEState, dict[str, jax.Array]]:
    """One update of the autoencoder and (when on) the discriminator; non-finite updates are dropped whole."""
    v = self.config.vae
    images = batch["image"]
    key = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
    disc_on = (state.step >= v.disc_start) & self.use_disc  # Traced: one program before and after the switch.

    (loss, (aux, recon)), grads = jax.value_and_grad(self._ae_loss, has_aux=True)(
        state.params, state.disc_params, images, key, disc_on
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = optim_lib.ema_decay(state.step, self.config.optim.ema_decay)
    ema = optim_lib.ema_average(state.ema_params, params, decay)

    if self.use_disc:
      d_loss, d_grads = jax.value_and_grad(self._disc_loss)(state.disc_params, images, jax.lax.stop_gradient(recon))
      d_updates, d_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
      d_params = optax.apply_updates(state.disc_params, d_updates)
    else:
      d_loss, d_grads, d_params, d_opt_state = jnp.zeros(()), {}, state.disc_params, state.disc_opt_state

    norms = {
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "disc_grad_norm": optax.tree.norm(d_grads),
        "disc_param_norm": optax.tree.norm(d_params),
    }
    finite = jnp.isfinite(loss) & jnp.isfinite(d_loss)
    for value in norms.values():  # A non-finite gradient, update or new parameter has a non-finite norm.
      finite &= jnp.isfinite(value)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    pick_disc = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite & disc_on, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=pick(params, state.params),
        opt_state=pick(opt_state, state.opt_state),
        ema_params=pick(ema, state.ema_params),
        disc_params=pick_disc(d_params, state.disc_params),
        disc_opt_state=pick_disc(d_opt_state, state.disc_opt_state),
        skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(state.skipped_steps.dtype),
    )
    metrics = {
        "loss": loss,
        "disc_loss": d_loss,
        **aux,
        **norms,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "skipped_steps": new_state.skipped_steps,
    }
    return new_state, metrics

  def preview(self, state: VAEState, step: int, workdir: str, writer) -> None:
    """Originals (top row) over their EMA reconstructions (bottom row): TensorBoard and WORKDIR/samples/."""
    from rflow_jax.eval import vae_recon  # pylint: disable=g-import-not-at-top  (scipy only when evaluating)

    v = self.config.vae
    images, _ = vae_recon.heldout_set(v.eval_per_kind, v.eval_seed, self.config.data.image_size)
    images = images[:: max(1, len(images) // v.preview_examples)][: v.preview_examples]
    recon = self.reconstruct(state, images)
    grid = sampling.make_grid(np.concatenate([pixels.to_uint8(images), pixels.to_uint8(recon)]), ncols=len(images))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    sampling.save_png(grid, os.path.join(workdir, "samples", f"recon_{step:06d}.png"))
    writer.write_images(step, {"reconstructions": grid[None]})

  # --- Helpers ----------------------------------------------------------------------------------------------------

  def reconstruct(self, state: VAEState, images) -> jax.Array:
    """Posterior-mean reconstructions of [-1, 1] NHWC images with the EMA weights."""
    if not hasattr(self, "_reconstruct"):
      self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])
    return self._reconstruct(state.ema_params, jnp.asarray(images, jnp.float32))

  def _ae_loss(self, params, disc_params, images, key, disc_on):
    """Total autoencoder loss and its parts; also returns the reconstructions (for the discriminator)."""
    v = self.config.vae
    if v.decoder_only:  # No gradient flows into the frozen encoder (its optimiser also zeroes any update).
      params = {k: jax.lax.stop_gradient(p) if k in ENCODER_PARTS else p for k, p in params.items()}
    recon, mean, logvar = self.model.apply({"params": params}, images, key)
    rec = self._rec_loss(images, recon)
    kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / np.prod(images.shape[1:])
    aux = {"rec_loss": jnp.mean(jnp.abs(recon.astype(jnp.float32) - images)), "kl": kl}
    loss = rec + v.kl_weight * kl
    if self.use_disc:
      g_loss = patchgan.hinge_g_loss(self.disc.apply({"params": disc_params}, recon))
      weight = self._adaptive_weight(params, images, key, disc_params) * v.disc_weight
      weight = jnp.where(disc_on, weight, 0.0)
      loss += weight * g_loss
      aux.update(g_loss=g_loss, disc_weight=weight)
    aux["perceptual"] = rec - aux["rec_loss"]
    return loss, (aux, recon)

  def _rec_loss(self, images, recon):
    """L1 (+ the weighted perceptual distance when a network is configured)."""
    rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - images))
    if self.perceptual is not None:
      rec += self.config.vae.perceptual_weight * jnp.mean(self.perceptual(images, recon))
    return rec

  def _adaptive_weight(self, params, images, key, disc_params):
    """‖∇_w L_rec‖ / (‖∇_w L_gan‖ + ε) at the decoder's last conv kernel w, clipped, as a constant."""

    def with_last(kernel):
      decoder = {**params["decoder"], "conv_out": {**params["decoder"]["conv_out"], "kernel": kernel}}
      recon = self.model.apply({"params": {**params, "decoder": decoder}}, images, key)[0]
      return recon

    last = params["decoder"]["conv_out"]["kernel"]
    g_rec = jax.grad(lambda w: self._rec_loss(images, with_last(w)))(last)
    g_gan = jax.grad(lambda w: patchgan.hinge_g_loss(self.disc.apply({"params": disc_params}, with_last(w))))(last)
    weight = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + ADAPTIVE_EPS)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, self.config.vae.adaptive_weight_max))

  def _disc_loss(self, disc_params, images, recon):
    apply = lambda x: self.disc.apply({"params": disc_params}, x)
    return patchgan.hinge_d_loss(apply(images), apply(recon))
