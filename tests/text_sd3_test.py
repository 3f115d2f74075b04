"""SD3 text conditioning against diffusers' StableDiffusion3Pipeline.encode_prompt (tiny pipeline); tokenizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rflow_jax.export import text as text_export
from rflow_jax.model.text import sd3, sd3_tokenizer

WORDS = ("a", "red", "blue", "circle", "square", "two", "of", "left", "the", "to")
T5_LENGTH = 20
PROMPTS = ["a red circle to the left of two blue squares", "squares!"]


def _clip(tokenizer, act, seed):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer),
      hidden_size=32,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=2,
      max_position_embeddings=77,
      hidden_act=act,
      projection_dim=24,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
  )
  return transformers.CLIPTextModelWithProjection(cfg).eval()


def build_pipeline(path):
  """A tiny random StableDiffusion3Pipeline with tiny tokenizers, saved to `path`; returns the pipeline."""
  import diffusers  # pylint: disable=g-import-not-at-top

  tok_l = sd3_tokenizer.tiny_clip_tokenizer(WORDS)
  tok_g = sd3_tokenizer.tiny_clip_tokenizer(WORDS, pad_token="!")
  tok_t5 = sd3_tokenizer.tiny_t5_tokenizer(WORDS)
  torch.manual_seed(2)
  t5 = transformers.T5EncoderModel(
      transformers.T5Config(
          vocab_size=len(tok_t5), d_model=64, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"
      )
  ).eval()
  transformer = diffusers.SD3Transformer2DModel(
      sample_size=8,
      patch_size=2,
      in_channels=4,
      num_layers=1,
      attention_head_dim=8,
      num_attention_heads=2,
      joint_attention_dim=64,
      caption_projection_dim=16,
      pooled_projection_dim=48,
      out_channels=4,
      pos_embed_max_size=8,
  )
  vae = diffusers.AutoencoderKL(
      block_out_channels=(8,),
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",),
      up_block_types=("UpDecoderBlock2D",),
  )
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer,
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
      vae=vae,
      text_encoder=_clip(tok_l, "quick_gelu", 0),
      tokenizer=tok_l,
      text_encoder_2=_clip(tok_g, "gelu", 1),
      tokenizer_2=tok_g,
      text_encoder_3=t5,
      tokenizer_3=tok_t5,
  )
  pipe.save_pretrained(path)
  return pipe


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("sd3")
  return build_pipeline(path), path


NEGATIVE = "two blue squares"


def parity(pipe, path, use_t5) -> float:
  """Largest relative error of our (context, pooled) of prompts, "" and an explicit negative vs encode_prompt's."""
  errors = []
  if not use_t5:  # diffusers' T5-off mode: the pipeline without text_encoder_3 and tokenizer_3.
    pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
  tokenizer, stack = text_export.sd3_stack(path, T5_LENGTH, use_t5=use_t5)
  params = text_export.sd3_params(path, stack)
  n = len(PROMPTS)
  # One batch, one compile: the prompts, the default negative (the empty prompt) and an explicit negative.
  context, pooled = jax.jit(lambda ids: sd3.compose(stack.apply({"params": params}, ids)))(
      jnp.asarray(tokenizer.batch(PROMPTS + [""] * n + [NEGATIVE] * n))
  )
  assert context.shape == (3 * n, 77 + T5_LENGTH, 64) and pooled.shape == (3 * n, 48)
  for rows, negative_prompt in ((slice(n, 2 * n), None), (slice(2 * n, 3 * n), NEGATIVE)):
    with torch.no_grad():  # (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)
      ref = pipe.encode_prompt(
          PROMPTS,
          None,
          None,
          do_classifier_free_guidance=True,
          negative_prompt=negative_prompt,
          max_sequence_length=T5_LENGTH,
      )
    ours = (context[:n], context[rows], pooled[:n], pooled[rows])
    for a, b in zip(ours, ref):
      b = b.numpy()
      assert a.shape == b.shape
      errors.append(float(np.abs(np.asarray(a) - b).max() / np.abs(b).max()))
  if not use_t5:
    assert not np.asarray(context[:, 77:]).any()
  return max(errors)


@pytest.mark.slow
@pytest.mark.parametrize("use_t5", [True, False])
def test_equals_encode_prompt(pipeline_dir, use_t5):
  assert parity(*pipeline_dir, use_t5) <= 1e-5


def test_per_encoder_dropout():
  outputs = {
      "clip_l": (jnp.ones((256, 3, 4)), jnp.ones((256, 4))),
      "clip_g": (jnp.ones((256, 3, 4)), jnp.ones((256, 5))),
      "t5": (jnp.ones((256, 6, 10)), None),
  }
  context, pooled = sd3.compose(outputs, jax.random.key(0), 0.463)
  kept = np.stack([context[:, 0, 0], context[:, 0, 4], context[:, 3, 0]], 1)  # CLIP-L, CLIP-G, T5 per example.
  np.testing.assert_array_equal(pooled[:, 0], kept[:, 0])
  np.testing.assert_array_equal(pooled[:, 4], kept[:, 1])
  assert not np.asarray(context[:, :3, 8:]).any()  # Zero padding to the T5 width.
  assert 0.4 < 1 - kept.mean() < 0.53  # Each encoder dropped ~46% of the time ...
  both = (kept == 0).all(1).mean()  # ... independently: all three together ~10%.
  assert 0.04 < both < 0.17
  assert len({tuple(r) for r in kept}) == 8


def test_tokenizer_layout_and_vocab_check(pipeline_dir, tmp_path):
  _, path = pipeline_dir
  tokenizer, stack = text_export.sd3_stack(path, T5_LENGTH)
  ids = tokenizer.batch(["a red circle"])
  assert ids.shape == (1, 77 + 77 + T5_LENGTH) and ids.dtype == np.int32
  l_ids, g_ids, t_ids = ids[0, :77], ids[0, 77:154], ids[0, 154:]
  eos = tokenizer.clip_l.eos_token_id
  assert list(l_ids[:4]) == [
      tokenizer.clip_l.bos_token_id,
      tokenizer.clip_l.convert_tokens_to_ids("a</w>"),
      tokenizer.clip_l.convert_tokens_to_ids("red</w>"),
      tokenizer.clip_l.convert_tokens_to_ids("circle</w>"),
  ]
  assert (l_ids[4:] == eos).all() and g_ids[4] == eos and (g_ids[5:] == tokenizer.clip_g.pad_token_id).all()
  assert list(t_ids[:5]) == [3, 4, 6, 1, 0]  # ▁a ▁red ▁circle </s> <pad>
  assert stack.empty_tokens == tuple(tokenizer(""))
  # A tokenizer directory without its vocabulary loads as a near-empty tokenizer: refused against the model.
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(path / "tokenizer", tmp_path / "tok")
  (tmp_path / "tok" / "tokenizer.json").unlink()
  for f in ("vocab.json", "merges.txt"):
    if (tmp_path / "tok" / f).exists():
      (tmp_path / "tok" / f).unlink()
  with pytest.raises(
      text_export.WeightsError,
      match=r"tok: tokenizer has \d+ tokens but the model's embedding has "
      rf"{stack.clip_l.cfg.vocab_size} rows \(a vocabulary file missing from the directory\?\)$",
  ):
    text_export.load_tokenizer(tmp_path / "tok", stack.clip_l.cfg.vocab_size)
