"""Scores a "vae" workdir's newest checkpoint (EMA weights) with the vae_recon evaluator.

  python -m rflow_jax.eval.run_vae_recon --workdir=runs/shapes_vae

Prints one JSON line ({"step", "psnr", "ssim", ShapesEval of reconstructions and originals}) and writes the
reconstruction grid and scores.json into WORKDIR/eval_step<step>/.
"""

import json
import os
import types

from absl import app, flags

from rflow_jax import cli, rundir
from rflow_jax.eval import vae_recon
from rflow_jax.train import checkpoint, vae_task

flags.DEFINE_string("workdir", None, "A 'vae' task training workdir.", required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  with cli.clean_errors():
    config = rundir.load_config(FLAGS.workdir)
    task = vae_task.VAETask(config)  # Checks the config before the checkpoint is read.
    params, _, step = checkpoint.restore_params(FLAGS.workdir, use_ema=True)
    scores = vae_recon.evaluate(
        task, types.SimpleNamespace(ema_params=params), step, os.path.join(FLAGS.workdir, f"eval_step{step}")
    )
    print(json.dumps({"step": step, **scores}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
