"""Neural network definitions: MM-DiT backbone, its layers and embeddings.

Modules are Flax Linen; params are stored in `param_dtype` (float32) and every
param carries logical-axis names (see `rflow_jax.model.layers`) that the
sharding rules map onto mesh axes.
"""
