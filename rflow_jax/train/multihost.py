"""Host-side barriers for multi-process runs, through the coordination service jax.distributed started.

Why not a collective (multihost_utils.sync_global_devices): on CPU, collectives go through gloo, whose first use of a
device group waits only 30 s for every peer to arrive. Processes start their first step apart by more than that
when one compiles slower, or process 0 does its extra start-up work (the metrics writer, config.json) on a loaded
machine: the run then dies in its first collective. A coordination-service barrier costs no device work and waits
as long as it is told. Orbax's own barriers (checkpoint save and restore) use collectives by default; on CPU
`use_host_barriers_for_orbax` switches them to the coordination service too.
"""

import jax
import orbax.checkpoint as ocp
from absl import flags, logging

TIMEOUT_S = 30 * 60  # A peer later than this is gone or stuck; its collectives would hang anyway.


def barrier(name: str, timeout_s: int = TIMEOUT_S) -> None:
  """Every process waits here until all have arrived (a no-op with one process). `name`: unique per call site."""
  if jax.process_count() == 1:
    return
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def use_host_barriers_for_orbax() -> None:
  """Multi-process CPU runs (gloo): Orbax's checkpoint barriers wait in the coordination service (see above).

  TPU/GPU keep Orbax's default (device collectives, which wait without gloo's 30 s limit). Call after
  jax.distributed.initialize, with absl flags parsed.
  """
  if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    logging.info("CPU multi-process run: Orbax barriers use the coordination service (gloo waits only 30 s)")


def define_distributed_flags() -> None:
  """The flags of init_distributed, for entry points that may run as one process of many (main, precompute)."""
  flags.DEFINE_enum(
      "distributed",
      "off",
      ["off", "auto", "explicit"],
      "jax.distributed.initialize: off (one process), auto (TPU/SLURM detection), explicit (flags " "below).",
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed=explicit).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed=explicit).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --distributed=explicit).")


def init_distributed() -> None:
  """jax.distributed.initialize as the flags of define_distributed_flags say, then the Orbax barrier setting."""
  f = flags.FLAGS
  if f.distributed == "auto":
    jax.distributed.initialize()
  elif f.distributed == "explicit":
    jax.distributed.initialize(
        coordinator_address=f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id
    )
  use_host_barriers_for_orbax()
