"""One Orbax CheckpointManager for the train state and the data position; params-only restore for samplers.

Layout: WORKDIR/checkpoints/<step>/{state, position}. Orbax writes each step into a temporary directory and renames
it when complete, so a crash mid-save leaves the previous checkpoint untouched and the partial one is never restored.
`position` is global (examples of the one shuffled stream consumed, see rflow_jax/train/resume.py), so a run resumes
with any number of processes; checkpoints written before it hold grain's per-process iterator state (`data`) instead.
A committed checkpoint damaged later (a truncated or deleted file) is named, skipped for the previous complete one,
and, by the trainer, moved aside to WORKDIR/damaged_checkpoints/ (never deleted): `restore_newest`.
`restore_params` does not import the trainer: sampling and export use it. `restore_weights` reads only the weights
of another run, for a warm start (train.init_from).
"""

import os
import shutil
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from absl import logging

from rflow_jax.model import mmdit_tree
from rflow_jax.train import multihost

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointWriteError(ValueError):
  """A checkpoint could not be written; the message says which complete checkpoint is still there."""


class IncompatibleCheckpointError(ValueError):
  """The checkpoint is readable but of another model: refused, never skipped as damaged."""


class DamagedCheckpointError(ValueError):
  """No checkpoint of a workdir can be read; the message names each step and why."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _handlers(partial_state: bool):
  # Named explicitly so that metadata and params-only restores work in a manager that has not saved yet.
  # StandardCheckpointHandler writes the state as a PyTree checkpoint; reading it back with the PyTree handler allows
  # a partial restore (a subset of the saved tree).
  state = ocp.PyTreeCheckpointHandler() if partial_state else ocp.StandardCheckpointHandler()
  return {"state": state, "data": grain.checkpoint.CheckpointHandler(), "position": ocp.JsonCheckpointHandler()}


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, minus its own use of JAX's preemption sync point.

  The trainer alone asks the sync point, once per step with its own step count (train/preemption.py). Orbax would
  also ask it from save() and from its finalize thread with checkpoint steps, moving the counter the processes agree
  on while they agree: a stop at different steps, and a hang. Orbax uses the answer only to log and to decide
  whether to save; the trainer saves at the agreed step explicitly.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def make_manager(
    workdir: str,
    *,
    max_to_keep: int = 1,
    async_save: bool = False,
    read_only: bool = False,
    partial_state: bool = False,
) -> ocp.CheckpointManager:
  """The workdir's manager. partial_state (read-only use): restore a subset of the state with PyTreeRestore."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only, enable_async_checkpointing=async_save
  )
  return _Manager(checkpoint_dir(workdir), item_handlers=_handlers(partial_state), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, position: dict[str, int]) -> None:
  """Starts saving (asynchronously if so configured) the state and the global data position (resume.data_position)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict[str, int] | None]:
  """(state with the shardings of `abstract_state`, saved data position or None for a checkpoint without one)."""
  has_position = os.path.isdir(os.path.join(manager.directory, str(step), "position"))
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if has_position:
    items["position"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], (dict(restored["position"]) if has_position else None)


def last_good_message(manager: ocp.CheckpointManager) -> str:
  """'Last good checkpoint: step N ...' naming the newest *committed* step (in-flight saves are waited for first).

  Good means: committed, and every update in it finite (the step's guard drops a non-finite update and, under
  train.nonfinite=halt, the trainer checks the guard before each save). Proved by tests/reliability_test.py.
  """
  manager.wait_until_finished()
  step = manager.latest_step()
  if step is None:
    return "No checkpoint was written; a restart begins at step 0"
  return f"Last good checkpoint: step {step} (committed; a restart resumes from it)"


def _reason(e: BaseException) -> str:
  """First line of an exception's root cause, capped: a damaged file gives Orbax/TensorStore messages of hundreds of
  lines, whose outermost layer ("Encountered error while reading array index") does not say what is wrong."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  line = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {line[:200]}"


def restore_newest(manager: ocp.CheckpointManager, attempt: Callable[[int], Any], *, move_damaged: bool = False):
  """attempt(step) for the newest step it succeeds on: (result, step), or (None, None) without checkpoints.

  A step whose attempt fails (a truncated array file, a deleted _METADATA, ...) is named in a warning and the next
  older complete step is tried. IncompatibleCheckpointError (another model) is raised at once: that is a refusal,
  not damage. With move_damaged (the trainer, which will save those step numbers again), damaged steps newer than the
  one restored are moved to WORKDIR/damaged_checkpoints/ (and the manager reloaded); they are never deleted. Nothing
  is moved when no step can be read (then it may be this program, not the files, that fails).

  Raises:
    DamagedCheckpointError: no step could be read; names each step and its error.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      result = attempt(step)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise many types for a bad file)
      damaged.append((step, _reason(e)))
      continue
    if damaged:  # One line: which step is damaged, why, what is used instead and where the damaged one is.
      moved = _move_aside(manager, [s for s, _ in damaged]) if move_damaged else []
      where = f"moved to {os.path.dirname(moved[0])}/ (kept, not deleted)" if moved else "left in place"
      logging.warning(
          "Damaged checkpoint %s in %s; using the previous complete checkpoint, step %d (the damaged one " "is %s)",
          "; ".join(f"step {s} ({r})" for s, r in damaged),
          manager.directory,
          step,
          where,
      )
    return result, step
  if damaged:
    raise DamagedCheckpointError(
        f"no checkpoint in {str(manager.directory)!r} can be read: "
        + "; ".join(f"step {s}: {r}" for s, r in damaged)
        + ". Move the damaged step directories away to start over"
    )
  return None, None


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves damaged step directories out of the checkpoint directory (process 0; all processes wait for it)."""
  directory = os.fspath(manager.directory)
  target = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
  moved = []
  if jax.process_index() == 0:
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest = os.path.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      shutil.move(os.path.join(directory, str(step)), dest)
      moved.append(dest)
  multihost.barrier("rflow_jax_damaged_checkpoints_moved")
  manager.reload()
  return moved or [os.path.join(target, str(s)) for s in steps]


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/kernel' -> shape for every leaf with a .shape (arrays, ShapeDtypeStructs, Orbax metadata)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state, weight_groups, metadata=None) -> None:
  """Raises IncompatibleCheckpointError naming the first weight whose presence or shape differs from the checkpoint.

  Runs before any compilation, so that a workdir of another model is reported in one line and left untouched.
  The task's weight groups (state fields) are compared; optimizer state mirrors them. `metadata`: the saved state's
  metadata when the caller has read it already.
  """
  metadata = manager.item_metadata(step)["state"] if metadata is None else metadata
  _check_shapes(manager, step, metadata, {group: getattr(abstract_state, group) for group in weight_groups})


def _check_shapes(manager: ocp.CheckpointManager, step: int, metadata, groups: dict[str, Any]) -> None:
  """check_compatible against the saved state's `metadata` (read by the caller), for {group: tree}: a whole state's
  weight groups, or a warm start's renamed subset. Names are "<group>/<path>", e.g. "params/blocks_0/..."."""
  where = f"checkpoint at step {step} in {manager.directory}"
  for group, tree in groups.items():
    saved = _param_shapes(metadata[group]) if group in metadata else {}
    want = _param_shapes(tree)
    for key in sorted(set(saved) | set(want)):
      name = f"{group}/{key}"
      if key not in saved:
        raise IncompatibleCheckpointError(
            f"{where} has no parameter {name} (this config expects shape {want[key]}): "
            "it was written by a different model"
        )
      if key not in want:
        raise IncompatibleCheckpointError(
            f"{where} has parameter {name} (shape {saved[key]}) that this config does "
            "not: it was written by a different model"
        )
      if saved[key] != want[key]:
        raise IncompatibleCheckpointError(
            f"{where}: parameter {name} has shape {saved[key]}, but this config expects {want[key]}"
        )


def restore_weights(
    workdir: str, abstract_state, weight_groups, *, grow_depth: bool = False
) -> tuple[dict[str, Any], int]:
  """({group: weights} for the task's weight groups, step) of `workdir`'s newest readable checkpoint, placed like
  `abstract_state`.

  The warm start of train.init_from: optimizer state, step and data position are not read, so the other run may
  have used any optimizer or schedule. Checked before anything is compiled. A damaged newest checkpoint is named in
  a warning and the previous complete one is read (restore_newest).

  With grow_depth (train.init_grow_depth) the source may have fewer joint blocks than this model: block i is read into
  this model's block mmdit_tree.grown_block_positions(...)[i], and the params and EMA params returned lack the other
  blocks, which the caller keeps from its fresh init (identity blocks under adaLN-zero).

  Raises:
    FileNotFoundError: `workdir` holds no complete checkpoint.
    IncompatibleCheckpointError: its model or text encoders differ from `abstract_state`'s (check_compatible), other
      than in depth with grow_depth; or it is deeper than this model, or either model scans its blocks, with
      grow_depth.
  """
  if latest_step(workdir) is None:
    raise FileNotFoundError(f"train.init_from={workdir!r} holds no complete checkpoint")
  source_of = {}  # This model's top-level param name -> the source's (growth only; identity otherwise).

  def attempt(step):
    target = {name: getattr(abstract_state, name) for name in weight_groups}
    metadata = manager.item_metadata(step)["state"]  # Read once: growth names and the shape check both use it.
    source_of.clear()
    if grow_depth:
      source_of.update(_grown_names(list(metadata["params"]), list(target["params"]), workdir))
      for group in ("params", "ema_params"):
        target[group] = {
            source_of.get(k, k): v
            for k, v in target[group].items()
            if k in source_of or mmdit_tree.parse_block_name(k) is None
        }
    _check_shapes(manager, step, metadata, target)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )["state"]

  # Only the weights are read (partial_restore), each leaf straight into this run's sharding.
  with make_manager(workdir, read_only=True, partial_state=True) as manager:
    restored, step = restore_newest(manager, attempt)
  this_of = {v: k for k, v in source_of.items()}
  for group in ("params", "ema_params"):
    restored[group] = {this_of.get(k, k): v for k, v in restored[group].items()}
  return restored, step


def _grown_names(source_params: list[str], params: list[str], workdir: str) -> dict[str, str]:
  """{this model's block name: the source block read into it} for a depth-growing warm start."""
  spans = {n: mmdit_tree.parse_block_name(n) for n in source_params + params}  # [start, stop) of each block group.
  blocks = lambda names: [n for n in names if spans[n] is not None]
  scanned = [n for n in blocks(source_params) + blocks(params) if spans[n][1] - spans[n][0] > 1]  # e.g. blocks_0_12
  if scanned:
    raise IncompatibleCheckpointError(
        f"train.init_grow_depth reads and writes single blocks, but {scanned[0]!r} is "
        "a scanned group: set model.scan_blocks=False in both runs"
    )
  src_depth, depth = len(blocks(source_params)), len(blocks(params))
  try:
    positions = mmdit_tree.grown_block_positions(src_depth, depth)
  except ValueError as e:
    raise IncompatibleCheckpointError(f"train.init_from={workdir!r}: {e}") from None
  return {mmdit_tree.block_name(p, p + 1): mmdit_tree.block_name(i, i + 1) for i, p in enumerate(positions)}


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
  checkpoint samples on a laptop: the target's shardings, not the saved ones, decide placement). Without `step`, the
  newest readable checkpoint: a damaged newer one is named in a warning and skipped (restore_newest).

  Raises:
    FileNotFoundError: naming the workdir, when it holds no complete checkpoint.
  """
  directory = checkpoint_dir(workdir)
  if latest_step(workdir) is None:
    raise FileNotFoundError(f"no checkpoint in {directory!r}: train first (python -m rflow_jax.main ...)")
  group = "ema_params" if use_ema else "params"

  def attempt(step):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
        # A task without text encoders (the VAE) has no text_params.
        {group: metadata[group], **{k: metadata[k] for k in ("text_params",) if k in metadata}},
        is_leaf=lambda x: hasattr(x, "shape"),
    )
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )["state"]

  with make_manager(workdir, read_only=True, partial_state=True) as manager:
    if step is None:
      state, step = restore_newest(manager, attempt)
    else:
      state = attempt(step)
  return state[group], state.get("text_params"), step
