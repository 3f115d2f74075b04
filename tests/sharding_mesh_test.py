"""Mesh construction (ICI × DCN, -1 fill, hybrid multi-slice order), rule validation and the pre-compile checks.

Fast, in-process: multi-device and multi-slice layouts use stand-in device objects (mesh_utils only reads their
id / process_index / slice_index / platform) and AbstractMesh, so no fake XLA devices are needed here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from rflow_jax import config_lib
from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  slice_index: int | None = None
  platform: str = "cpu"
  device_kind: str = "cpu"


def _devices(n, per_granule, by_slice=False):
  return [FakeDevice(i, i // per_granule, i // per_granule if by_slice else None) for i in range(n)]


def _ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices)


@pytest.mark.parametrize(
    "shape, n, want",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((2, 4, 1), 8, (2, 4, 1)),
    ],
)
def test_resolve_fills_minus_one(shape, n, want):
  assert mesh_lib.resolve_mesh_shape(shape, n) == want


@pytest.mark.parametrize(
    "shape, n, message",
    [
        ((2, 2, 1), 8, r"sharding.mesh_shape=\(2, 2, 1\) multiplies to 4, but there are 8 devices"),
        ((3, -1, 1), 8, r"sharding.mesh_shape=\(3, -1, 1\) cannot fill 8 devices \(3 does not divide it\)"),
        ((-1, -1, 1), 8, "at most one -1"),
        ((0, 8, 1), 8, "sizes must be positive"),
        ((8, 1), 8, r"must have 3 sizes for axes \('data', 'fsdp', 'tensor'\)"),
    ],
)
def test_resolve_rejects_bad_sizes(shape, n, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.resolve_mesh_shape(shape, n)


def test_hybrid_mesh_puts_each_process_in_one_block_of_the_dcn_axis():
  # 2 hosts × 4 devices, data parallel across hosts (DCN), fsdp within a host (ICI).
  mesh = mesh_lib.make_mesh((1, -1, 1), (2, 1, 1), _devices(8, 4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  np.testing.assert_array_equal(_ids(mesh)[:, :, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])
  # fsdp across 2 slices, tensor inside each: the DCN factor multiplies the ICI size of its axis.
  mesh = mesh_lib.make_mesh((1, 2, 2), (1, -1, 1), _devices(8, 4, by_slice=True))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  np.testing.assert_array_equal(_ids(mesh)[0], [[0, 1], [2, 3], [4, 5], [6, 7]])


def test_slices_are_tpu_slices_when_devices_have_a_slice_index():
  devices = [FakeDevice(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]  # 2 hosts per slice
  assert mesh_lib.granules(devices) == ("slice_index", 2)
  assert mesh_lib.granules(_devices(8, 2)) == ("process_index", 4)
  # CPU/GPU devices of several processes all report slice 0: processes are the slices.
  assert mesh_lib.granules([FakeDevice(i, i // 2, slice_index=0) for i in range(8)]) == ("process_index", 4)
  assert mesh_lib.resolve_shapes((-1, 1, 1), (-1, 1, 1), devices) == ((4, 1, 1), (2, 1, 1))


def test_dcn_shape_must_match_the_number_of_slices():
  with pytest.raises(
      ValueError,
      match=r"sharding.dcn_mesh_shape=\(3, 1, 1\) multiplies to 3, but there are 2 " r"slices \(by process_index\)",
  ):
    mesh_lib.make_mesh((-1, 1, 1), (3, 1, 1), _devices(8, 4))
  with pytest.raises(ValueError, match=r"sharding.mesh_shape=\(8, 1, 1\) multiplies to 8, but there are 4"):
    mesh_lib.make_mesh((8, 1, 1), (2, 1, 1), _devices(8, 4))


def test_single_device_mesh_keeps_auto_axes():
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  assert mesh.axis_names == rules_lib.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_parse_mesh_flag():
  assert mesh_lib.parse_mesh_flag("data=1,fsdp=64,tensor=1") == (1, 64, 1)
  assert mesh_lib.parse_mesh_flag("fsdp=-1") == (1, -1, 1)
  with pytest.raises(ValueError, match="'model=2' is not axis=size"):
    mesh_lib.parse_mesh_flag("data=2,model=2")


def test_rule_overrides_replace_the_preset_entry_in_place():
  rules = dict(rules_lib.get_rules("fsdp", (("mlp", "tensor"), ("heads", ["fsdp", "tensor"]))))
  assert rules["mlp"] == "tensor" and rules["heads"] == ("fsdp", "tensor") and rules["embed"] == "fsdp"
  assert [k for k, _ in rules_lib.get_rules("fsdp")] == list(rules)  # Order (Flax's priority) unchanged.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((("mlp", "model"),), r"names mesh axis 'model', which is not one of \('data', 'fsdp', 'tensor'\)"),
        ((("hidden", "fsdp"),), "names an unknown logical axis"),
        ((("batch", ("data", "data")),), "uses a mesh axis twice"),
        ((("mlp",),), "must be a \\(logical, mesh axes\\) pair"),
    ],
)
def test_bad_rules_are_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    rules_lib.get_rules("fsdp", overrides)


def test_presets_shard_every_param_axis_over_a_known_mesh_axis():
  for name in rules_lib.PRESETS:
    rules_lib.validate_rules(rules_lib.get_rules(name))
  assert partition.batch_mesh_axes(rules_lib.get_rules("fsdp_tp")) == ("data", "fsdp")


def test_batch_must_split_over_data_times_fsdp():
  mesh = AbstractMesh((2, 4, 2), rules_lib.MESH_AXES)
  partition.check_batch(16, mesh, rules_lib.get_rules("fsdp_tp"))
  with pytest.raises(ValueError, match=r"train.global_batch_size=12 is not divisible by data=2 × fsdp=4 = 8"):
    partition.check_batch(12, mesh, rules_lib.get_rules("fsdp_tp"))


def test_indivisible_param_sharding_names_the_param():
  mesh = AbstractMesh((1, 8, 1), rules_lib.MESH_AXES)
  tree = {
      "blocks_0": {
          "kernel": jax.ShapeDtypeStruct((36, 144), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
      },
      "ok": jax.ShapeDtypeStruct((32,), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
  }
  with pytest.raises(
      ValueError,
      match=r"blocks_0/kernel has shape \(36, 144\); dimension 0 \(36\) cannot be split "
      r"8 ways over mesh axes \('fsdp',\)",
  ):
    partition.check_divisible(tree)
  partition.check_divisible({"ok": tree["ok"]})
  assert partition.shard_bytes({"ok": tree["ok"]}) == 4 * 4


def test_validate_reports_sharding_errors_as_config_errors():
  from configs import debug  # pylint: disable=g-import-not-at-top

  config = debug.get_config()
  config.sharding.mesh_shape = (2, 1, 1)  # This process has one device.
  with pytest.raises(config_lib.ConfigError, match=r"multiplies to 2, but there are 1 devices"):
    config_lib.validate(config)
  config = debug.get_config()
  config.sharding.rule_overrides = (("mlp", "expert"),)
  with pytest.raises(config_lib.ConfigError, match="names mesh axis 'expert'"):
    config_lib.validate(config)
  config = debug.get_config()
  config.train.global_batch_size = 6
  config.sharding.mesh_shape = (1, 4, 1)
  with pytest.raises(config_lib.ConfigError, match=r"global_batch_size=6 is not divisible by data=1 × fsdp=4 = 4"):
    config_lib.validate_sharding(config, devices=_devices(4, 4))
