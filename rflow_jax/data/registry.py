"""Dataset registry: `config.data.name` -> a function building the random-access source from `config.data`."""

from rflow_jax.data import arrayrecord, buckets, precomputed, shapes


def _shapes(data_config):
  return shapes.ShapesSource(
      size=data_config.image_size,
      seed=data_config.seed,
      num_records=data_config.num_records,
      caption_style=data_config.caption_style,
  )


def _arrayrecord(data_config):
  if not data_config.path:
    raise ValueError(
        'data.name="arrayrecord" reads a converted dataset: set data.path to the output directory of '
        "python -m rflow_jax.data.convert"
    )
  return arrayrecord.ArrayRecordImageSource(
      data_config.path, data_config.image_size, buckets.sizes(data_config.buckets)
  )


def _precomputed(data_config):
  return precomputed.PrecomputedSource(data_config.path)


# The sources that serve aspect-ratio buckets (data.buckets): they know each record's stored size (or its bucket).
BUCKETED = ("arrayrecord", "precomputed")
SOURCES = {"shapes": _shapes, "arrayrecord": _arrayrecord, "precomputed": _precomputed}


def make_source(data_config):
  """The grain RandomAccessDataSource named by `data_config.name`."""
  if data_config.name not in SOURCES:
    raise ValueError(f"data.name={data_config.name!r} is not a dataset; valid: {sorted(SOURCES)}")
  return SOURCES[data_config.name](data_config)
