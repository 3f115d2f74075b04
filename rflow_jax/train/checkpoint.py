"""One Orbax CheckpointManager for the train state and the grain iterator state; params-only restore for samplers.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint untouched and the partial one is never restored.
`restore_params` does not import the trainer: sampling and export use it. `restore_weights` reads only the weights
of another run, for a warm start (train.init_from).
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from rflow_jax.model import mmdit

CHECKPOINT_DIR = "checkpoints"


class CheckpointWriteError(ValueError):
  """A checkpoint could not be written; the message says which complete checkpoint is still there."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _handlers(partial_state: bool):
  # Named explicitly so that metadata and params-only restores work in a manager that has not saved yet.
  # StandardCheckpointHandler writes the state as a PyTree checkpoint; reading it back with the PyTree handler allows
  # a partial restore (a subset of the saved tree).
  state = ocp.PyTreeCheckpointHandler() if partial_state else ocp.StandardCheckpointHandler()
  return {"state": state, "data": grain.checkpoint.CheckpointHandler()}


def make_manager(workdir: str, *, max_to_keep: int = 1, async_save: bool = False, read_only: bool = False,
                 partial_state: bool = False) -> ocp.CheckpointManager:
  """The workdir's manager. partial_state (read-only use): restore a subset of the state with PyTreeRestore."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_handlers(partial_state), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter) -> None:
  """Starts saving (asynchronously if so configured) the state and the data iterator's position."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(data_iter)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """Restores state (with the shardings of `abstract_state`) and moves `data_iter` to the saved position."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored["state"]


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/kernel' -> shape for every leaf with a .shape (arrays, ShapeDtypeStructs, Orbax metadata)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state, weight_groups) -> None:
  """Raises ValueError naming the first weight whose presence or shape differs from the saved checkpoint.

  Runs before any compilation, so that a workdir of another model is reported in one line and left untouched.
  The task's weight groups (state fields) are compared; optimizer state mirrors them.
  """
  _check_shapes(manager, step, manager.item_metadata(step)["state"],
                {group: getattr(abstract_state, group) for group in weight_groups})


def _check_shapes(manager: ocp.CheckpointManager, step: int, metadata, groups: dict[str, Any]) -> None:
  """check_compatible against the saved state's `metadata` (read by the caller), for {group: tree}: a whole state's
  weight groups, or a warm start's renamed subset. Names are "<group>/<path>", e.g. "params/blocks_0/...". """
  where = f"checkpoint at step {step} in {manager.directory}"
  for group, tree in groups.items():
    saved = _param_shapes(metadata[group]) if group in metadata else {}
    want = _param_shapes(tree)
    for key in sorted(set(saved) | set(want)):
      name = f"{group}/{key}"
      if key not in saved:
        raise ValueError(f"{where} has no parameter {name} (this config expects shape {want[key]}): "
                         "it was written by a different model")
      if key not in want:
        raise ValueError(f"{where} has parameter {name} (shape {saved[key]}) that this config does not: "
                         "it was written by a different model")
      if saved[key] != want[key]:
        raise ValueError(f"{where}: parameter {name} has shape {saved[key]}, but this config expects {want[key]}")


def restore_weights(workdir: str, abstract_state, weight_groups, *,
                    grow_depth: bool = False) -> tuple[dict[str, Any], int]:
  """({group: weights} for the task's weight groups, step) of `workdir`'s newest checkpoint, placed like
  `abstract_state`.

  The warm start of train.init_from: optimizer state, step and data position are not read, so the other run may
  have used any optimizer or schedule. Checked before anything is compiled.

  With grow_depth (train.init_grow_depth) the source may have fewer joint blocks than this model: block i is read into
  this model's block mmdit.grown_block_positions(...)[i], and the params and EMA params returned lack the other
  blocks, which the caller keeps from its fresh init (identity blocks under adaLN-zero).

  Raises:
    FileNotFoundError: `workdir` holds no complete checkpoint.
    ValueError: its model or text encoders differ from `abstract_state`'s (check_compatible), other than in depth
      with grow_depth; or it is deeper than this model, or either model scans its blocks, with grow_depth.
  """
  step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f"train.init_from={workdir!r} holds no complete checkpoint")
  target = {name: getattr(abstract_state, name) for name in weight_groups}
  # Only the weights are read (partial_restore), each leaf straight into this run's sharding.
  with make_manager(workdir, read_only=True, partial_state=True) as manager:
    metadata = manager.item_metadata(step)["state"]  # Read once: growth names and the shape check both use it.
    source_of = {}  # This model's top-level param name -> the source's (growth only; identity otherwise).
    if grow_depth:
      source_of = _grown_names(list(metadata["params"]), list(target["params"]), workdir)
      for group in ("params", "ema_params"):
        target[group] = {source_of.get(k, k): v for k, v in target[group].items()
                         if k in source_of or mmdit.parse_block_name(k) is None}
    _check_shapes(manager, step, metadata, target)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]
  this_of = {v: k for k, v in source_of.items()}
  for group in ("params", "ema_params"):
    restored[group] = {this_of.get(k, k): v for k, v in restored[group].items()}
  return restored, step


def _grown_names(source_params: list[str], params: list[str], workdir: str) -> dict[str, str]:
  """{this model's block name: the source block read into it} for a depth-growing warm start."""
  spans = {n: mmdit.parse_block_name(n) for n in source_params + params}  # [start, stop) of each block group.
  blocks = lambda names: [n for n in names if spans[n] is not None]
  scanned = [n for n in blocks(source_params) + blocks(params) if spans[n][1] - spans[n][0] > 1]  # e.g. blocks_0_12
  if scanned:
    raise ValueError(f"train.init_grow_depth reads and writes single blocks, but {scanned[0]!r} is a scanned group: "
                     "set model.scan_blocks=False in both runs")
  src_depth, depth = len(blocks(source_params)), len(blocks(params))
  try:
    positions = mmdit.grown_block_positions(src_depth, depth)
  except ValueError as e:
    raise ValueError(f"train.init_from={workdir!r}: {e}") from None
  return {mmdit.block_name(p, p + 1): mmdit.block_name(i, i + 1) for i, p in enumerate(positions)}


def latest_step(workdir: str) -> int | None:
  """Newest complete checkpoint step in the workdir, or None (incomplete temporary directories are ignored)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with make_manager(workdir, read_only=True) as manager:
    return manager.latest_step()


def restore_params(workdir: str, *, use_ema: bool, step: int | None = None) -> tuple[Any, Any, int]:
  """Loads (backbone params, text params, step) from a workdir's checkpoint, on the host, without the trainer.

  A partial restore: only the two weight groups a sampler needs are read (not the other params set, nor the
  optimizer moments), each onto this process's first device whatever mesh wrote the checkpoint (a pod run's
  checkpoint samples on a laptop: the target's shardings, not the saved ones, decide placement).

  Raises:
    FileNotFoundError: naming the workdir, when it holds no complete checkpoint.
  """
  directory = checkpoint_dir(workdir)
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory!r}: train first (python -m rflow_jax.main ...)")
  group = "ema_params" if use_ema else "params"
  with make_manager(workdir, read_only=True, partial_state=True) as manager:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                          # A task without text encoders (the VAE) has no text_params.
                          {group: metadata[group], **{k: metadata[k] for k in ("text_params",) if k in metadata}},
                          is_leaf=lambda x: hasattr(x, "shape"))
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]
  return state[group], state.get("text_params"), step
