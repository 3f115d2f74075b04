"""rflow_jax: rectified-flow MM-DiT (Stable Diffusion 3 style) training in JAX/Flax."""

__version__ = "0.1.0"
