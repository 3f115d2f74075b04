"""Helpers of the whole-pipeline tests: tiny random SD3 pipelines on both sides, and images from each side.

Both sides get the same prompts, initial noise (NCHW, diffusers' `latents=`), steps, guidance and shift; images are
compared as float32 pixels in [0, 1] (diffusers' output_type="np").
"""

import json

import jax
import numpy as np
import torch

from configs import debug
from rflow_jax import rundir
from rflow_jax.export import vae as export_vae
from rflow_jax.model import registry, text_encoders
from rflow_jax.model import vae as vae_lib
from rflow_jax.model.text import sd3_tokenizer

PROMPTS = ["a red circle to the left of two blue squares", "a green triangle"]
NEGATIVE = "two blue squares"
T5_LENGTH = 8
LATENT = 8  # Latent pixels per side; images are LATENT * 2 (the tiny VAE's two levels).
PARITY = 1e-3  # max |ours - diffusers| on [0, 1] pixels, fp32.


def spread(images) -> str:
  """How much of [0, 1] the images use (a comparison of near-constant images would say little)."""
  return f"pixel std {images.std():.3f}, {((images > 0) & (images < 1)).mean():.0%} unclipped"


def perturb(tree, seed: int, std: float):
  """Every weight moved by N(0, std²): zero-initialised layers (adaLN, output) take part in the comparison."""
  leaves, treedef = jax.tree.flatten(jax.device_get(tree))
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(treedef, [np.asarray(x) + std * rng.randn(*np.shape(x)).astype(np.float32) for x in leaves])


def save_tiny_vae(path):
  """Our tiny random AutoencoderKL (4 latent channels, factor 2, SD3's scaling/shift) saved as a diffusers dir."""
  model = vae_lib.AutoencoderKL(
      block_out_channels=(8, 16),
      layers_per_block=1,
      norm_num_groups=4,
      latent_channels=4,
      scaling_factor=1.5305,
      shift_factor=0.0609,
  )
  params = model.init(jax.random.key(3), np.zeros((1, 4, 4, 3), np.float32))["params"]
  export_vae.save_vae(perturb(params, 4, 0.02), model, path)
  return path


def run_config(vae_dir, use_t5: bool = True):
  """A latent-space run with SD3's text stack at tiny size (what `--format=pipeline` exports)."""
  c = debug.get_config()
  c.data.name, c.data.image_size, c.vae.path = "precomputed", LATENT, str(vae_dir)
  c.model.in_channels, c.model.patch_size, c.model.depth, c.model.pos_embed_max_size = 4, 2, 3, 8
  c.text.encoders, c.text.t5_length, c.text.use_t5 = "sd3", T5_LENGTH, use_t5
  c.sample.shift = 3.0
  return c


def write_run(workdir, config):
  """WORKDIR/config.json (the checkpoint is supplied by `random_weights`)."""
  (workdir / rundir.CONFIG_NAME).write_text(json.dumps(json.loads(config.to_json()), indent=2))


def random_weights(config):
  """(MM-DiT params, text params, step) of a run with random weights: what checkpoint.restore_params returns."""
  model = registry.build_model(config)
  x, t, ctx, pooled = registry.dummy_inputs(config)
  params = perturb(model.init(jax.random.key(0), x, t, ctx, pooled)["params"], 1, 0.05)
  _, stack = text_encoders.build(config.text)
  return params, text_encoders.init_params(stack, config.text), 7


def diffusers_images(pipe, latents, *, steps, cfg, negative=None, **kwargs):
  """diffusers' images (N, H, W, 3) in [0, 1] for PROMPTS from NCHW `latents`."""
  with torch.no_grad():
    out = pipe(
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=cfg,
        latents=torch.from_numpy(latents),
        height=latents.shape[2] * 2,
        width=latents.shape[3] * 2,
        max_sequence_length=T5_LENGTH,
        output_type="np",
        **kwargs,
    )
  return np.asarray(out.images, np.float32)


def ours(sampler, params, text_params, latents, negative):
  """Our images (N, H, W, 3) in [0, 1] for PROMPTS from the same NCHW latents (diffusers' postprocess: x/2 + 1/2)."""
  images = sampler.generate(
      params,
      text_params,
      PROMPTS,
      0,
      noise=latents.transpose(0, 2, 3, 1),
      negative_prompts=[negative] * len(PROMPTS),
      as_float=True,
  )
  return np.clip(images / 2 + 0.5, 0, 1)


def latents(seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(len(PROMPTS), 4, LATENT, LATENT).astype(np.float32)


def tiny_diffusers_pipeline(path, shift: float = 3.0):
  """A tiny random StableDiffusion3Pipeline (every weight random, 3 joint blocks, qk-norm) saved to `path`."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  words = ("a", "red", "blue", "green", "circle", "square", "squares", "triangle", "two", "of", "left", "the", "to")
  tok_l = sd3_tokenizer.tiny_clip_tokenizer(words)
  tok_g = sd3_tokenizer.tiny_clip_tokenizer(words, pad_token="!")
  tok_t5 = sd3_tokenizer.tiny_t5_tokenizer(words)
  torch.manual_seed(0)

  def clip(tok, act):
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act=act,
        projection_dim=24,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.CLIPTextModelWithProjection(cfg).eval()

  t5 = transformers.T5EncoderModel(
      transformers.T5Config(
          vocab_size=len(tok_t5), d_model=64, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"
      )
  ).eval()
  transformer = diffusers.SD3Transformer2DModel(
      sample_size=LATENT,
      patch_size=2,
      in_channels=4,
      num_layers=3,
      attention_head_dim=8,
      num_attention_heads=2,
      joint_attention_dim=64,
      caption_projection_dim=16,
      pooled_projection_dim=48,
      out_channels=4,
      pos_embed_max_size=8,
      qk_norm="rms_norm",
  ).eval()
  with torch.no_grad():  # adaLN and output layers are not zero; norms stay near 1.
    for name, p in transformer.named_parameters():
      p.copy_(
          torch.randn_like(p) * 0.2 + 1.0 if "norm" in name and "linear" not in name else torch.randn_like(p) * 0.05
      )
  vae = diffusers.AutoencoderKL(
      block_out_channels=(8, 16),
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2,
      use_quant_conv=False,
      use_post_quant_conv=False,
      scaling_factor=1.5305,
      shift_factor=0.0609,
  ).eval()
  with torch.no_grad():  # Images spread over [0, 1] (a default-init decoder stays near 0.5).
    vae.decoder.conv_out.weight.mul_(3.0)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer,
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
      vae=vae,
      text_encoder=clip(tok_l, "quick_gelu"),
      tokenizer=tok_l,
      text_encoder_2=clip(tok_g, "gelu"),
      tokenizer_2=tok_g,
      text_encoder_3=t5,
      tokenizer_3=tok_t5,
  )
  pipe.save_pretrained(path)
  return pipe


def without_t5(pipe):
  """diffusers' T5-off pipeline (zeros in T5's tokens)."""
  return type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
