"""Builds the device mesh from `config.sharding.mesh_shape`."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rflow_jax.sharding import rules


def resolve_mesh_shape(mesh_shape, num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals `num_devices`; errors name the offending sizes."""
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != len(rules.MESH_AXES):
    raise ValueError(f"sharding.mesh_shape={shape} must have {len(rules.MESH_AXES)} sizes for axes "
                     f"{rules.MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"sharding.mesh_shape={shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"sharding.mesh_shape={shape} cannot fill {num_devices} devices ({known} does not divide it)")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"sharding.mesh_shape={shape} multiplies to {math.prod(shape)}, but there are "
                     f"{num_devices} devices")
  return shape


def make_mesh(mesh_shape, devices=None) -> Mesh:
  """A Mesh over all (or the given) devices with axes (data, fsdp, tensor), Auto axis types (GSPMD propagation)."""
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), rules.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(rules.MESH_AXES))
