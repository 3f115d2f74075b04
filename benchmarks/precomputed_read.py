"""Precomputed records (python -m rflow_jax.precompute) against the train step that consumes them; one JSON line.

  python benchmarks/precomputed_read.py [--config=configs/shapes_latent.py] [--path=DIR] [--reads=2000] \
      [--batches=100] [--steps=10] [--config.x=y ...]

Measured in one process, on the config's own training path (trainer.Setup, as benchmarks/train_step.py):
  raw_records_per_s        random reads of a record's bytes from both ArrayRecord files (latents and text)
  source_records_per_s     the same through PrecomputedSource (msgpack, np.frombuffer): what grain reads
  pipeline_batches_per_s   next() of the trainer's iterator (grain: global shuffle, batch train.global_batch_size,
                           data.worker_count workers; 0 = this process, one read thread)
  delivered_batches_per_s  next() plus Setup.global_batch (host to device), the host's whole share of a step: the
                           posterior draw x = mean + exp(logvar/2)·ε and the VAE's shift/scale run inside the
                           jitted step (rflow_jax/train/step.py), so no latent work is done on the host
  steps_per_s              the compiled train step (Setup.compile_step, the trainer's executable), median of --steps
  ratio                    delivered_batches_per_s / steps_per_s; the pipeline is never the bottleneck when it
                           is well above 1 (target >= 10)

Without --path it makes its own set: --num_images shapes scenes at the pixel side the config's latents need
(data.image_size × the VAE factor), converted, then precomputed with a random VAE of config.vae's architecture
(throughput does not depend on the weights) and the config's text encoders.
"""

import copy
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags
import grain
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `launch` importable from any cwd.
from launch import shapes_folder  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax import cli, precompute  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.data import convert, precomputed, records  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.export import vae as export_vae  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.train import trainer, vae_task  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def build_set(config, directory: str, num_images: int) -> str:
  """Renders, converts and precomputes `num_images` shapes scenes for `config` into `directory`; returns the output."""
  model = vae_task.build_model(config)
  pixels = config.data.image_size * model.downsample_factor
  params = model.init(jax.random.key(0), np.zeros((1, pixels, pixels, 3), np.float32))["params"]
  vae_dir = str(export_vae.save_vae(params, model, os.path.join(directory, "vae")))
  images = shapes_folder.write(os.path.join(directory, "images"), num_images, size=pixels)
  converted = os.path.join(directory, "converted")
  convert.convert(convert.Options("imagefolder", images, converted, records_per_shard=256))
  job_config = copy.deepcopy(config)
  job_config.data.name, job_config.data.path, job_config.data.image_size = "arrayrecord", converted, pixels
  job_config.vae.path = vae_dir
  out = os.path.join(directory, "latents")
  precompute.run(job_config, out)
  return out


def _per_s(fn, n: int) -> float:
  t = time.perf_counter()
  for i in range(n):
    fn(i)
  return n / (time.perf_counter() - t)


def measure(config, path: str, *, reads: int, batches: int, steps: int) -> dict:
  """The rates of the module docstring for `config` training on the precompute output `path`."""
  config = copy.deepcopy(config)
  config.data.name, config.data.path, config.vae.path = "precomputed", path, ""  # The VAE the records name.
  manifest = precomputed.load_manifest(path)
  files = {
      kind: records.verify_shards(path, {"shards": [s for s in manifest["shards"][kind] if s["num_records"]]})
      for kind in precomputed.KINDS
  }
  raw = [grain.sources.ArrayRecordDataSource(paths) for paths in files.values()]
  indices = np.random.default_rng(0).integers(0, manifest["num_records"], reads)
  raw_rate = _per_s(lambda i: [r[int(indices[i])] for r in raw], reads)
  source = precomputed.PrecomputedSource(path)
  source_rate = _per_s(lambda i: source[int(indices[i])], reads)

  setup = trainer.Setup(config)
  it = setup.data_iterator()
  jax.block_until_ready(setup.global_batch(next(it)))  # Warm-up: grain's reader threads start.
  pipeline_rate = _per_s(lambda i: next(it), batches)
  delivered_rate = _per_s(lambda i: jax.block_until_ready(setup.global_batch(next(it))), batches)

  state = setup.init_state()
  batch = setup.global_batch(next(it))
  t = time.perf_counter()
  step_fn = setup.compile_step(state)
  compile_s = time.perf_counter() - t
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  steps_rate = 1.0 / float(np.median(times))
  b = config.train.global_batch_size
  return {
      "num_records": manifest["num_records"],
      "latent": manifest["latent"],
      "text_shapes": manifest["text"]["shapes"],
      "global_batch": b,
      "worker_count": config.data.worker_count,
      "raw_records_per_s": round(raw_rate, 1),
      "source_records_per_s": round(source_rate, 1),
      "pipeline_batches_per_s": round(pipeline_rate, 2),
      "delivered_batches_per_s": round(delivered_rate, 2),
      "delivered_records_per_s": round(delivered_rate * b, 1),
      "step_compile_s": round(compile_s, 1),
      "steps_per_s": round(steps_rate, 3),
      "step_records_per_s": round(steps_rate * b, 1),
      "ratio": round(delivered_rate / steps_rate, 1),
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "backend": jax.default_backend(),
  }


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    path = FLAGS.path or build_set(FLAGS.config, tmp, FLAGS.num_images)
    result = measure(FLAGS.config, path, reads=FLAGS.reads, batches=FLAGS.batches, steps=FLAGS.steps)
  print(json.dumps(result))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  # Defined here, not on import: tests import this module next to other modules defining --config.
  config_flags.DEFINE_config_file("config", "configs/shapes_latent.py", "Training config.", lock_config=True)
  flags.DEFINE_string("path", "", "Precompute output to read ('' = build one from --num_images shapes scenes).")
  flags.DEFINE_integer("num_images", 512, "Scenes in the self-built set (without --path).")
  flags.DEFINE_integer("reads", 2000, "Random record reads timed (raw and source each).")
  flags.DEFINE_integer("batches", 100, "Batches timed from the training iterator (after one warm-up batch).")
  flags.DEFINE_integer("steps", 10, "Train steps timed (after one warm-up step).")
  app.run(main, flags_parser=cli.parse_flags)
