"""Interop with PyTorch checkpoints: diffusers and the original SD3 layouts, and Hugging Face text encoders.

All layout differences between our Flax param tree and the PyTorch state
dicts live in `rflow_jax.export.diffusers` (and the key renaming for the
original single-file layout in `rflow_jax.export.original`); the text
encoders' in `rflow_jax.export.text`, the VAE's in `rflow_jax.export.vae`:

  from rflow_jax.export import load_clip, load_t5, load_tokenizer, load_vae, save_vae
"""

from rflow_jax.export.text import load_clip, load_t5, load_tokenizer  # noqa: F401
from rflow_jax.export.vae import load_vae, save_vae  # noqa: F401
