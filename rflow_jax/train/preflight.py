"""Memory pre-flight: refuse a train step that cannot fit the device's memory, in one line, before it runs.

Two users: launch/aot_compile.py --device_memory_gb=N (fake CPU devices, XLA:CPU's estimate) and the trainer on
TPU/GPU (the real compiler's memory_analysis() against device.memory_stats()["bytes_limit"]), which otherwise fails
with a runtime out-of-memory error after minutes of compilation on every host.

The advice names what would fit. The state's share of a device (params, Adam moments, EMA; sharded by fsdp) is
exact; the rest (activations, gradients, temporaries) scales with the examples each device processes at once, so
dividing it by train.microbatches is a linear estimate, and remat "full" keeps only each block's inputs.
"""

import math

GB = 1e9  # Vendors' "80 GB" / "95 GB" (decimal), as --device_memory_gb reads it.
GIB = 2**30
_GRADIENT_BYTES_PER_STATE_BYTE = 0.25  # f32 gradient (4 B/param) next to the 16 B/param state.


class InsufficientMemoryError(ValueError):
  """The compiled train step needs more memory per device than the device has."""


def step_bytes(memory) -> int:
  """Per-device live bytes of a compiled step from its memory_analysis(): arguments + outputs + temporaries, the
  donated (aliased) state counted once."""
  return int(
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
  )


def advice(
    *, needed: int, limit: int, state: int, microbatches: int, examples_per_shard: int, remat: str, fsdp: int
) -> str:
  """What would fit, from the step's bytes split into state (exact) and the rest (linear in examples at once).

  Args:
    needed: per-device bytes of the step.
    limit: per-device bytes available.
    state: per-device bytes of the train state.
    microbatches: train.microbatches of the step measured.
    examples_per_shard: examples of one data shard per step (global batch / (data × fsdp)).
    remat: model.remat of the step measured.
    fsdp: size of the fsdp mesh axis.

  Returns:
    A semicolon-separated list of remedies, most specific first.
  """
  fixed = state * (1 + _GRADIENT_BYTES_PER_STATE_BYTE)
  rest = max(needed - fixed, 0)
  options = []
  if fixed < limit:
    whole_batch = rest * microbatches  # The non-state bytes if the shard's whole batch went through at once.
    for k in range(microbatches + 1, examples_per_shard + 1):
      if examples_per_shard % k == 0 and fixed + whole_batch / k <= limit:
        options.append(
            f"--config.train.microbatches={k} ({examples_per_shard // k} examples per device at once, "
            f"≈{(fixed + whole_batch / k) / GIB:.1f} GiB by linear scaling)"
        )
        break
    if remat != "full":
      options.append("--config.model.remat=full (saves only each block's input; ~1/3 more FLOPs)")
  grow = 2  # More devices on the fsdp axis, same global batch: state and examples per device both shrink.
  while needed / grow > limit:
    grow *= 2
  options.append(
      f"a larger fsdp axis over more devices (fsdp={fsdp * grow}, {grow}× the devices: "
      f"≈{needed / grow / GIB:.1f} GiB)"
  )
  return "; ".join(options)


def check(*, needed: int, limit: int, source: str, **advice_kwargs) -> None:
  """Raises InsufficientMemoryError (one line: the estimate, the limit and what would fit) if needed > limit.

  Args:
    needed: per-device bytes of the step.
    limit: per-device bytes available.
    source: where `needed` comes from, e.g. "XLA:CPU estimate".
    **advice_kwargs: the rest of `advice`'s arguments.
  """
  if needed <= limit:
    return
  raise InsufficientMemoryError(
      f"the train step needs {needed / GIB:.1f} GiB per device ({source}), more than the {limit / GIB:.1f} GiB "
      f"({limit / GB:.1f} GB) available; would fit: {advice(needed=needed, limit=limit, **advice_kwargs)}"
  )


def advice_kwargs(setup) -> dict:
  """`advice`'s config-dependent arguments for a trainer.Setup."""
  from rflow_jax.sharding import partition  # pylint: disable=g-import-not-at-top

  config = setup.config
  ways = math.prod(setup.mesh.shape[a] for a in partition.batch_mesh_axes(setup.rules))
  return {
      "state": partition.shard_bytes(setup.abstract_state),
      "microbatches": config.train.microbatches,
      "examples_per_shard": config.train.global_batch_size // ways,
      "remat": config.model.remat,
      "fsdp": setup.mesh.shape.get("fsdp", 1),
  }


def device_limit(device) -> int | None:
  """Bytes the runtime lets one accelerator allocate (memory_stats()["bytes_limit"]); None on CPU or if unknown."""
  if device.platform not in ("tpu", "gpu"):
    return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def check_train_step(setup, compiled) -> None:
  """On TPU/GPU: refuses (InsufficientMemoryError) a compiled step (Setup.compile_step) that cannot fit a device."""
  limit = device_limit(setup.mesh.devices.flat[0])
  if limit is None:
    return
  memory = compiled.memory_analysis()
  if memory is not None:
    check(needed=step_bytes(memory), limit=limit, source="compiled memory analysis", **advice_kwargs(setup))
