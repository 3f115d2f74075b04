"""The exact, compile-free part of docs/scaling.md's preset table: state per device and step FLOPs of every cell.

  python benchmarks/preset_grid.py

For each pod preset of configs/sd3.py × resolution (256², 512², 1024²) × recommended mesh of 8, 64 and 256 devices
(RECOMMENDED_MESH), builds the trainer's Setup on that many fake CPU devices (abstract state and shardings only;
nothing is compiled or allocated) and prints one JSON line: preset, resolution, mesh, the train state's bytes on
one device (params, Adam moments, EMA, text encoders: exact, from the shardings) and the analytic model FLOPs of
a step (rflow_jax/utils/flops.py: exact for the formula; remat's recomputation not counted). The per-device total
and the compile time need a compile: launch/aot_compile.py. The last line is a summary {"cells": N}.
"""

import os
import sys

if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=256"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

PRESETS = ("d15", "d18", "d21", "d24", "d30", "d38", "sd3-medium", "sd3.5-medium", "sd3.5-large")


def recommended_mesh(depth: int, devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): fsdp as large as the width 64·depth allows (a power of two ≤ devices), data the rest."""
  fsdp = devices
  while (64 * depth) % fsdp:
    fsdp //= 2
  return (devices // fsdp, fsdp, 1)


def main():
  import jax
  from configs import sd3
  from rflow_jax.sharding import partition
  from rflow_jax.train import trainer
  from rflow_jax.utils import flops as flops_lib

  cells = 0
  for name in PRESETS:
    for devices in (8, 64, 256):
      config = sd3.get_config(name)
      config.sharding.mesh_shape = recommended_mesh(config.model.depth, devices)
      # The state does not depend on the resolution (the positional table is the same size at any crop).
      state = partition.shard_bytes(trainer.Setup(config, devices=jax.devices()[:devices]).abstract_state)
      for resolution in sd3.RESOLUTIONS:
        config = sd3.get_config(f"{name}@{resolution}")
        print(
            json.dumps(
                {
                    "preset": name,
                    "resolution": resolution,
                    "mesh": recommended_mesh(config.model.depth, devices),
                    "state_bytes_per_device": state,
                    "flops_per_step": flops_lib.train_flops_per_step(config),
                    "image_tokens": (config.data.image_size // config.model.patch_size) ** 2,
                    "shift": config.flow.shift,
                    "pos_table": config.model.pos_embed_max_size,
                }
            ),
            flush=True,
        )
        cells += 1
  print(json.dumps({"cells": cells}))


if __name__ == "__main__":
  main()
