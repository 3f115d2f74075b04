"""Builds the device mesh from `config.sharding`: ICI (within a slice/host) and DCN (across slices) sizes.

The mesh always has the axes `rules.MESH_AXES` = (data, fsdp, tensor). Its size along each axis is
`ici[i] * dcn[i]`: `sharding.mesh_shape` (ICI) says how each slice's devices are arranged, and
`sharding.dcn_mesh_shape` (DCN) how many slices are stacked along each axis. Collectives over an axis whose DCN
size is > 1 cross the slow data-centre network, so only put cheap-to-communicate axes there (data, then fsdp; never
tensor). One -1 in each shape takes what is left.

A "slice" is a TPU slice (devices of one ICI domain, `device.slice_index`) or, where all devices report the same
slice (GPU clusters, CPU, a single TPU slice), one process. Single-slice meshes (DCN sizes all 1) go through
`mesh_utils.create_device_mesh`, which on TPU orders devices along the physical torus.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from rflow_jax.sharding import rules


def resolve_mesh_shape(
    mesh_shape, num_devices: int, name: str = "sharding.mesh_shape", unit: str = "devices"
) -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals `num_devices`; errors name the offending sizes.

  Args:
    mesh_shape: one size per mesh axis, at most one of them -1.
    num_devices: the number of devices (or slices, for the DCN shape) the sizes must multiply to.
    name: the config field, for error messages.
    unit: what is counted ("devices", "slices"), for error messages.

  Returns:
    The sizes with the -1 filled in.
  """
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != len(rules.MESH_AXES):
    raise ValueError(f"{name}={shape} must have {len(rules.MESH_AXES)} sizes for axes {rules.MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{name}={shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"{name}={shape} cannot fill {num_devices} {unit} ({known} does not divide it)")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"{name}={shape} multiplies to {math.prod(shape)}, but there are {num_devices} {unit}")
  return shape


def granules(devices: Sequence[jax.Device]) -> tuple[str, int]:
  """What a DCN "slice" is for these devices, and how many there are: ('slice_index' | 'process_index', count).

  TPU multi-slice devices carry distinct slice indices; GPU and CPU devices report one slice (or none) for all
  processes, and then each process (host) is a slice.
  """
  slices = {getattr(d, "slice_index", None) for d in devices}
  if len(slices) > 1 and None not in slices:
    return "slice_index", len(slices)
  return "process_index", len({d.process_index for d in devices})


def resolve_shapes(mesh_shape, dcn_mesh_shape, devices: Sequence[jax.Device]) -> tuple[tuple[int, ...], ...]:
  """(ici, dcn) sizes with -1 filled: dcn multiplies to the number of slices, ici to the devices per slice."""
  dcn_raw = tuple(int(s) for s in dcn_mesh_shape)
  if math.prod(dcn_raw) == 1 and -1 not in dcn_raw:
    return resolve_mesh_shape(mesh_shape, len(devices)), dcn_raw
  attr, num_slices = granules(devices)
  dcn = resolve_mesh_shape(dcn_raw, num_slices, "sharding.dcn_mesh_shape", f"slices (by {attr})")
  if len(devices) % num_slices:
    raise ValueError(f"{len(devices)} devices do not split evenly into {num_slices} slices (by {attr})")
  return resolve_mesh_shape(mesh_shape, len(devices) // num_slices), dcn


def make_mesh(mesh_shape, dcn_mesh_shape=(1, 1, 1), devices=None) -> Mesh:
  """A Mesh over all (or the given) devices with axes (data, fsdp, tensor) and Auto axis types.

  Args:
    mesh_shape: ICI sizes per axis (per slice); one -1 takes the rest.
    dcn_mesh_shape: number of slices along each axis; all 1 = one slice.
    devices: defaults to jax.devices().

  Returns:
    The mesh; axis i has size ici[i] * dcn[i]. Auto axis types: GSPMD propagates shardings between the
    annotated parameters and activation constraints (jax 0.10's `jax.make_mesh` would default to Explicit).
  """
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = resolve_shapes(mesh_shape, dcn_mesh_shape, devices)
  if math.prod(dcn) == 1:
    if devices[0].platform == "cpu":
      array = np.asarray(devices).reshape(ici)  # Keep the given order (tests pick device subsets).
    else:
      array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    attr, _ = granules(devices)
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=attr == "process_index", allow_split_physical_axes=True
    )
  return Mesh(array, rules.MESH_AXES, axis_types=(AxisType.Auto,) * len(rules.MESH_AXES))


def mesh_from_config(sharding_config, devices=None) -> Mesh:
  """`make_mesh` from `config.sharding` (mesh_shape, dcn_mesh_shape)."""
  return make_mesh(sharding_config.mesh_shape, sharding_config.dcn_mesh_shape, devices)


def parse_mesh_flag(text: str) -> tuple[int, ...]:
  """'data=1,fsdp=64,tensor=1' -> (1, 64, 1); omitted axes are 1. Errors name the bad part.

  Args:
    text: comma-separated axis=size pairs over `rules.MESH_AXES`.

  Returns:
    One size per mesh axis.
  """
  sizes = dict.fromkeys(rules.MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"mesh {text!r}: {part!r} is not axis=size with axis in {rules.MESH_AXES}")
    sizes[name] = int(value)
  return tuple(sizes[a] for a in rules.MESH_AXES)
