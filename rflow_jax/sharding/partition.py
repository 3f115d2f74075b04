"""Checks and measurements of shardings: batch and parameter divisibility, bytes held per device.

The checks run when the trainer's Setup is built (and in `config_lib.validate`), before anything is compiled: an
indivisible sharding otherwise surfaces as an XLA or `device_put` error deep inside the first step.
"""

import collections
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_mesh_axes(logical_rules) -> tuple[str, ...]:
  """The mesh axes the logical "batch" axis is sharded over (e.g. ("data", "fsdp"))."""
  axes = dict(logical_rules).get("batch")
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, logical_rules) -> NamedSharding:
  """Leading (example) axis sharded over the batch mesh axes, the rest replicated."""
  axes = batch_mesh_axes(logical_rules)
  return NamedSharding(mesh, P(axes if axes else None))


def check_batch(global_batch_size: int, mesh: Mesh, logical_rules) -> None:
  """Raises ValueError unless the global batch splits evenly over the batch mesh axes."""
  axes = batch_mesh_axes(logical_rules)
  ways = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % ways:
    sizes = " × ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(
        f"train.global_batch_size={global_batch_size} is not divisible by {sizes} = {ways} "
        f"(the mesh axes the batch is sharded over)"
    )


def check_microbatches(
    global_batch_size: int, microbatches: int, mesh: Mesh, logical_rules, process_count: int | None = None
) -> None:
  """Raises ValueError unless train.microbatches splits the batch of every process and every data shard evenly."""
  if microbatches < 1:
    raise ValueError(f"train.microbatches={microbatches} must be >= 1")
  process_count = jax.process_count() if process_count is None else process_count
  ways = math.prod(mesh.shape[a] for a in batch_mesh_axes(logical_rules))
  for what, n in (("process", global_batch_size // process_count), ("data shard", global_batch_size // ways)):
    if n % microbatches:
      raise ValueError(
          f"train.microbatches={microbatches} does not divide the {n} examples per {what} "
          f"(train.global_batch_size={global_batch_size})"
      )


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_divisible(abstract_tree) -> None:
  """Raises ValueError naming the first array whose sharded dimension the mesh axes do not divide.

  jax refuses unevenly sharded jit arguments, and it would say so only when the first step runs.

  Args:
    abstract_tree: ShapeDtypeStructs (or arrays) carrying NamedShardings.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):
      continue
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(sharding.mesh.shape[a] for a in axes)
      if leaf.shape[dim] % ways:
        raise ValueError(
            f"{_path(path)} has shape {tuple(leaf.shape)}; dimension {dim} ({leaf.shape[dim]}) cannot be split "
            f"{ways} ways over mesh axes {axes} (mesh {dict(sharding.mesh.shape)}). Change model.hidden_size, the "
            f"mesh shape or sharding.rule_overrides"
        )


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """Bytes of `tree`'s arrays resident on each device, from their addressable shards."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)


def total_bytes(tree) -> int:
  """Bytes of `tree`'s arrays (or ShapeDtypeStructs) counted once, as if unsharded."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def shard_bytes(abstract_tree) -> int:
  """Bytes one device holds of `abstract_tree`, from the shardings its ShapeDtypeStructs carry."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def place(values, boxed_abstract, mesh: Mesh, logical_rules):
  """Host `values` put on `mesh` by the logical axes of `boxed_abstract` (the same tree with nn.Partitioned boxes).

  For inference on whatever devices there are, where a mesh axis that does not divide a dimension cannot be
  refused: that dimension is replicated instead (check_divisible is the training-time refusal).
  """
  specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract), mesh, logical_rules)

  def put(value, sharding):
    spec = []
    for dim, axes in enumerate(sharding.spec):
      named = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      spec.append(axes if value.shape[dim] % math.prod(mesh.shape[a] for a in named) == 0 else None)
    # From a callback: on several processes each places only its own shards.
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P(*spec)), lambda index: value[index])

  return jax.tree.map(put, values, specs)
