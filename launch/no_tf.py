"""`python -m rflow_jax.main` (or another script) on a machine without TensorFlow, e.g. a GPU box with only JAX.

  python launch/no_tf.py --config=configs/shapes.py --workdir=runs/shapes [--config.x=y ...]
  python launch/no_tf.py benchmarks/train_step.py --config=configs/shapes.py   # any script that imports the trainer

TensorFlow is a dependency only because CLU's `metric_writers` package imports its TensorBoard writer, and that writer
imports TensorFlow, when the package is imported. When TensorFlow is missing, this launcher puts a stand-in for that
one module in its place before anything imports CLU, and makes every writer CLU's logging writer. Scalars still go to
the console and to WORKDIR/metrics.jsonl, sample grids to WORKDIR/samples/*.png and ShapesEval scores to
WORKDIR/eval*/. Only the TensorBoard event files are missing. With TensorFlow installed, nothing is replaced and the
script runs as it would by itself.
"""

import os
import pathlib
import runpy
import sys
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # rflow_jax importable from any cwd.

_SUMMARY_WRITER = "clu.metric_writers.summary_writer"


class _NoTensorBoardWriter:
  """Takes the TensorBoard writer's place; `create_default_writer(..., just_logging=True)` never builds it."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    raise RuntimeError("the TensorBoard writer needs TensorFlow, which is not installed; launch/no_tf.py logs only")


def tensorflow_available() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def install_logging_only_writers():
  """Lets `clu.metric_writers` import without TensorFlow; its default writer becomes logging-only."""
  stand_in = types.ModuleType(_SUMMARY_WRITER)
  stand_in.SummaryWriter = _NoTensorBoardWriter
  sys.modules[_SUMMARY_WRITER] = stand_in
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  create = metric_writers.create_default_writer

  def create_logging_only(logdir=None, *, just_logging=False, **kwargs):
    del just_logging
    return create(logdir, just_logging=True, **kwargs)

  metric_writers.create_default_writer = create_logging_only


if __name__ == "__main__":
  if not tensorflow_available():
    print("launch/no_tf.py: TensorFlow is not installed; writing no TensorBoard events (metrics.jsonl, PNGs and "
          "evals as usual)", file=sys.stderr)
    install_logging_only_writers()
  if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):  # A script to run instead of rflow_jax.main.
    script = sys.argv.pop(1)
    sys.argv[0] = script
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
  else:
    from absl import app  # pylint: disable=g-import-not-at-top
    from rflow_jax import cli, main  # pylint: disable=g-import-not-at-top
    app.run(main.main, flags_parser=cli.parse_flags)
