"""Training entry point.

  python -m rflow_jax.main --config=configs/quickstart.py --workdir=runs/quickstart [--config.train.num_steps=100]

Multi-process (one process per host): on TPU VMs and SLURM, jax.distributed finds its peers by itself
(--distributed=auto); elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from rflow_jax import cli
from rflow_jax import config_lib
from rflow_jax.train import multihost, trainer

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with optional :arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where config.json, checkpoints, TensorBoard events and samples go.")
multihost.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_orbax()
  multihost.init_distributed()
  with cli.clean_errors():
    try:
      results = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_lib.ConfigError as e:
      raise ValueError(f"bad config: {e}") from None
  logging.info("Final: %s", results)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
