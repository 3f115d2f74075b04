"""Small helpers shared across rflow_jax (FLOP accounting, ...)."""
