"""Dataset registry: `config.data.name` -> a function building the random-access source from `config.data`."""

from rflow_jax.data import shapes


def _shapes(data_config):
  return shapes.ShapesSource(size=data_config.image_size, seed=data_config.seed,
                             num_records=data_config.num_records, caption_style=data_config.caption_style)


SOURCES = {"shapes": _shapes}


def make_source(data_config):
  """The grain RandomAccessDataSource named by `data_config.name`."""
  if data_config.name not in SOURCES:
    raise ValueError(f"data.name={data_config.name!r} is not a dataset; valid: {sorted(SOURCES)}")
  return SOURCES[data_config.name](data_config)
