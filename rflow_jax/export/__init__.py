"""Interop with PyTorch checkpoints: diffusers and the original SD3 layouts.

All layout differences between our Flax param tree and the PyTorch state
dicts live in `rflow_jax.export.diffusers` (and the key renaming for the
original single-file layout in `rflow_jax.export.original`); the VAE's in
`rflow_jax.export.vae` (`load_vae`, `save_vae`).
"""

from rflow_jax.export.vae import load_vae, save_vae  # noqa: F401
