"""Step profiler (train.profile_steps = (N, M)): a jax.profiler trace of steps N..M into WORKDIR/profile.

The trace starts before step N is dispatched and stops once step M's outputs are ready, so it holds exactly those
steps' host and device work (and whatever earlier step the device was still finishing: the loop does not wait for
the device except at metric fetches). Start and stop happen outside the jitted step, which is untouched: steps
outside the window run at full speed, and the only synchronisations added are the one before N (so the window does
not start with a backlog of earlier steps) and the one on step M's outputs.

Open WORKDIR/profile with TensorBoard's profile plugin (`tensorboard --logdir WORKDIR/profile`, Profile tab) or load
the `*.trace.json.gz` file under plugins/profile/<run>/ in https://ui.perfetto.dev (docs/scaling.md reads one).
"""

import os

import jax
from absl import logging


class StepProfiler:
  """Starts a jax.profiler trace before step N and stops it after step M (both 1-based; () = never)."""

  def __init__(self, profile_steps, workdir: str):
    """Args: profile_steps: train.profile_steps. workdir: the run's workdir (the trace goes to WORKDIR/profile)."""
    steps = tuple(profile_steps)
    self.first, self.last = steps if steps else (0, -1)
    self.logdir = os.path.join(workdir, "profile")
    self.active = False

  def before(self, step: int, state) -> None:
    """Call before dispatching step `step` (1-based); `state` is that step's input (waited for at the start)."""
    if step == self.first and not self.active:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info("Profiling steps %d..%d into %s", self.first, self.last, self.logdir)

  def after(self, step: int, outputs, end: bool = False) -> None:
    """Call after dispatching step `step`; at the window's last step (or the run's, `end`) waits for `outputs` and
    writes the trace."""
    if self.active and (step >= self.last or end):
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profile of steps %d..%d written to %s", self.first, self.last, self.logdir)
