"""Data sources and grain input pipelines for rflow_jax.

`shapes` is the built-in procedural text-to-image dataset (coloured shapes with
captions) and `pipeline` turns any random-access source into a per-process,
checkpointable grain iterator of training batches.
"""
