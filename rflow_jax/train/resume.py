"""What a resume may change, and where the data stream resumes.

A workdir with a checkpoint is resumed with the config of the new start. What that config may change is listed in
RESUMABLE: how long to train (train.num_steps, upward), how often to log, checkpoint, sample and evaluate, sampling
settings, the mesh and the number of processes (the data position is global), compute settings that leave the
function unchanged (dtype, attention implementation, rematerialisation), the input workers and fault injection.
Everything else (model shape, text stack, formulation, optimizer, data, batch size, seed) defines what is being
trained: a change is refused in one line naming the field, before anything is built, and config.json is left as it
was. To train something else from a run's weights, start a new workdir with train.init_from.

The data position saved with each checkpoint is {"examples": examples of the one global shuffled stream consumed,
"global_batch_size": ...}: a global quantity, so P' processes resume exactly the stream P processes left. With
aspect-ratio buckets it also holds each bucket stream's position ("bucket_examples", with the bucket "sizes"); they
follow from the step (rflow_jax/data/buckets.py), and a resume refuses a checkpoint whose positions the data no longer
gives (a dataset changed under the run).
"""

import json
import os

from rflow_jax import config_lib
from rflow_jax.train import checkpoint

# Fields (or whole sections, as "section.") a resume may change.
RESUMABLE = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.eval_every",
    "train.eval_at_end",
    "train.preview_at_end",
    "train.nonfinite",
    "train.poison_step",
    "train.signal_step",
    "train.signal_process",
    "train.peak_tflops_per_device",
    "train.record_seen_indices",
    "train.init_from",
    "train.init_grow_depth",
    "train.evaluators",
    "train.profile_steps",
    "train.microbatches",
    "eval.",
    "sample.",
    "sharding.",
    "ckpt.",
    "runtime.",
    "data.worker_count",
    "model.dtype",
    "model.attention_impl",
    "model.remat",
)


class ResumeError(config_lib.ConfigError):
  """A resume whose config changes what is trained; the message names the field and both values."""


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _resumable(field: str) -> bool:
  return any(field == r or (r.endswith(".") and field.startswith(r)) for r in RESUMABLE)


def _latest_step(workdir: str) -> int | None:
  return checkpoint.latest_step(workdir) if os.path.isdir(checkpoint.checkpoint_dir(workdir)) else None


def has_checkpoint(workdir: str) -> bool:
  """Whether a start in `workdir` resumes it (a complete checkpoint exists) rather than starting a run."""
  return _latest_step(workdir) is not None


def check_config(config, workdir: str) -> None:
  """Refuses (ResumeError, one line) a restart of `workdir` whose config changes a non-resumable field, or whose
  train.num_steps is below the newest checkpoint's step. Reads config.json and the checkpoint list only."""
  path = os.path.join(workdir, "config.json")
  step = _latest_step(workdir)
  if step is None or not os.path.isfile(path):
    return  # A fresh run (or a warm start): nothing to resume.
  with open(path) as f:
    saved = _flat(json.load(f))
  new = _flat(json.loads(config.to_json_best_effort()))  # The same JSON encoding config.json was written with.
  for field in sorted(set(saved) & set(new)):  # Fields only one side knows (another code version) are not compared.
    if saved[field] != new[field] and not _resumable(field):
      raise ResumeError(
          f"{field}={new[field]!r}, but {workdir!r} was trained with {field}={saved[field]!r} (checkpoint step {step}): "
          "a resume may change only when and how long to train, sampling, sharding and compute settings "
          "(rflow_jax/train/resume.py); start a new --workdir, with train.init_from to reuse its weights"
      )
  if config.train.num_steps < step:
    raise ResumeError(
        f"train.num_steps={config.train.num_steps} is below the checkpoint step {step} of {workdir!r}: "
        f"nothing to train; pass --config.train.num_steps={step} or more"
    )


def data_position(step: int, global_batch_size: int, plan=None) -> dict:
  """The global data position after `step` steps (each step consumes one global batch of the one stream); with a
  bucket plan (data/buckets.py), also the position of each bucket's stream."""
  position = {"examples": int(step) * int(global_batch_size), "global_batch_size": int(global_batch_size)}
  if plan is not None:
    position["sizes"] = [list(s) for s in plan.sizes]
    position["bucket_examples"] = plan.examples_before(step).tolist()
  return position


def start_position(saved: dict | None, step: int, global_batch_size: int, plan=None) -> int:
  """Where the stream resumes: the saved position, or step × batch for a checkpoint saved without one.

  Raises:
    ResumeError: the checkpoint's bucket positions are not the ones this run's data gives after `step` steps.
  """
  if step is None:
    return 0
  if plan is not None and saved and "bucket_examples" in saved:
    want = data_position(step, global_batch_size, plan)
    if [saved["sizes"], saved["bucket_examples"]] != [want["sizes"], want["bucket_examples"]]:
      raise ResumeError(
          f"the checkpoint of step {step} left the buckets {saved['sizes']} at examples {saved['bucket_examples']}, "
          f"but this run's data gives {want['bucket_examples']} for buckets {want['sizes']}: the dataset's records "
          "or sizes changed under the run; start a new --workdir"
      )
  return int(saved["examples"]) if saved else data_position(step, global_batch_size)["examples"]
