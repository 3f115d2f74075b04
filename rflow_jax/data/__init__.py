"""Data sources and grain input pipelines for rflow_jax.

`shapes` is the built-in procedural text-to-image dataset (coloured shapes with
captions); `convert` turns an image folder, webdataset tars or a TFDS dataset
into ArrayRecord shards (`records` defines their format, `ingest` the input
formats) that `arrayrecord` serves for training; `pipeline` turns any
random-access source into a per-process, checkpointable grain iterator of
training batches.
"""
