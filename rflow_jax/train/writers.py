"""The trainer's metric writer: console, WORKDIR/metrics.jsonl and (with TensorFlow) TensorBoard, in one MultiWriter.

`metrics.jsonl` is plain text any tool can read: one JSON line per write, {"step": N, name: value, ...}. Training
scalars and evaluator scores of one step are separate lines; a resumed run re-logs the steps after its checkpoint, and
for each key of a step the last line that has it is the one that counts.

TensorFlow is optional (a GPU box may have only JAX): CLU's `metric_writers` package imports its TensorBoard writer,
and that writer imports TensorFlow, when the package is imported. Without TensorFlow a stand-in takes that one
module's place, here and only here, and the run writes no TensorBoard events; everything else is unchanged.
RFLOW_JAX_TENSORBOARD=0 in the environment does the same with TensorFlow installed: importing it costs seconds of
every process start (a restarted run, each CLI call), and metrics.jsonl holds the same scalars.
"""

import importlib.util
import json
import os
import sys
import types
from typing import Any, Mapping

from absl import logging
import numpy as np

_SUMMARY_WRITER_MODULE = "clu.metric_writers.summary_writer"
# find_spec also answers None for a module blocked with sys.modules[name] = None.
HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
TENSORBOARD_OFF = os.environ.get("RFLOW_JAX_TENSORBOARD", "1") == "0"
TENSORBOARD = HAVE_TENSORFLOW and not TENSORBOARD_OFF

if not TENSORBOARD and _SUMMARY_WRITER_MODULE not in sys.modules:
  _stand_in = types.ModuleType(_SUMMARY_WRITER_MODULE)
  _stand_in.SummaryWriter = None  # Never built: see make_writer.
  sys.modules[_SUMMARY_WRITER_MODULE] = _stand_in

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers
from clu import periodic_actions

if TENSORBOARD:
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # TensorFlow (only writing events) must never take accelerator memory.
# pylint: enable=g-import-not-at-top,wrong-import-position

METRICS_FILE = "metrics.jsonl"
WEIGHT_PREFIX, LOSS_PREFIX = "count_", "loss_"  # A step's metric count_X weighs its loss_X in the window's mean.


def average_metrics(fetched: list[Mapping[str, Any]]) -> dict[str, float]:
  """Host-side mean of the per-step metrics of one logging window.

  A metric `count_X` (not logged) is the number of examples behind `loss_X` (e.g. the flow task's per-quarter-of-t
  losses loss_tK): that loss is weighted by it, and left out when the window has no such example, rather than logged
  as a loss of 0, which would read as a perfect score. `skipped_steps`, a count, is the latest value.
  """
  last = fetched[-1]
  weighted = {LOSS_PREFIX + k[len(WEIGHT_PREFIX) :] for k in last if k.startswith(WEIGHT_PREFIX)}
  out = {
      k: float(np.mean([m[k] for m in fetched])) for k in last if not k.startswith(WEIGHT_PREFIX) and k not in weighted
  }
  for loss in sorted(weighted):
    weight = WEIGHT_PREFIX + loss[len(LOSS_PREFIX) :]
    count = sum(float(m[weight]) for m in fetched)
    if count > 0:
      out[loss] = sum(float(m[loss]) * float(m[weight]) for m in fetched) / count
  if "skipped_steps" in last:
    out["skipped_steps"] = float(last["skipped_steps"])
  return out


class JsonlWriter(metric_writers.MetricWriter):
  """Appends the scalars of each write as one JSON line to a file; other kinds of values are not written."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(workdir: str, *, is_main_process: bool) -> metric_writers.MetricWriter:
  """Process 0: console + metrics.jsonl + TensorBoard events (when TensorFlow is installed); others: console only."""
  writers = [metric_writers.LoggingWriter()]
  if is_main_process:
    writers.append(JsonlWriter(os.path.join(workdir, METRICS_FILE)))
    if TENSORBOARD:
      writers.append(metric_writers.SummaryWriter(workdir))
    else:
      why = "RFLOW_JAX_TENSORBOARD=0" if TENSORBOARD_OFF else "TensorFlow is not installed"
      logging.warning("%s: no TensorBoard events (metrics.jsonl, PNGs and evals as usual)", why)
  return metric_writers.AsyncMultiWriter(writers)  # One background thread: writes keep their order.


def progress_reporter(num_steps: int, writer: metric_writers.MetricWriter) -> periodic_actions.ReportProgress:
  """CLU's steps/s and ETA report, called after each metrics fetch only (so every call reports: every_secs=0, and no
  every_steps, which would demand a call per step)."""
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=0.0)
