"""When the loop does its periodic work (log, checkpoint, preview, evaluate): decided here, once per step.

The last step and a stop request (SIGTERM) always log and checkpoint. Previews and evaluations inside the loop skip
the last step, because the trainer writes the final preview and runs the final evaluation after the loop (also when
a finished run is started again), and skip a stopping step, whose run exits as soon as its checkpoint is committed.
"""

import dataclasses


def is_time(step: int, every: int) -> bool:
  """True at every `every`-th step (step > 0); `every` = 0 means never."""
  return every > 0 and step > 0 and step % every == 0


@dataclasses.dataclass(frozen=True)
class Due:
  """What to do after a step."""

  log: bool
  checkpoint: bool
  preview: bool
  evaluate: bool


def due(step: int, train_config, *, stopping: bool) -> Due:
  """The periodic work after `step` (1-based: the number of updates applied), per config.train's intervals."""
  t = train_config
  last = step == t.num_steps
  mid_run = not last and not stopping
  return Due(
      log=is_time(step, t.log_every) or last or stopping,
      checkpoint=is_time(step, t.checkpoint_every) or last or stopping,
      preview=mid_run and is_time(step, t.sample_every),
      evaluate=mid_run and is_time(step, t.eval_every) and bool(t.evaluators),
  )
