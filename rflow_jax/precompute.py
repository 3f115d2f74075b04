"""Encodes a converted dataset once: VAE posterior moments and text-encoder outputs, for `data.name="precomputed"`.

  python -m rflow_jax.precompute --config=configs/my_precompute.py --out=data/my_latents
  python -m rflow_jax.main --config=... --workdir=runs/x --config.data.name=precomputed \
      --config.data.path=data/my_latents --config.data.image_size=<pixel side / f> --config.model.in_channels=<c>

The config names the converted dataset (data.name="arrayrecord", data.path, data.image_size: the pixel side the
images are resized and centre-cropped to), the VAE (vae.path, a diffusers AutoencoderKL directory; vae.dtype) and the
text encoders (config.text, as in training); config.precompute gives the storage dtypes and the encoder batch. With
data.buckets (pixel sizes) each image is fitted to its aspect-ratio bucket instead, by the pixel-space source's own
code (rflow_jax/data/arrayrecord.py), and encoded at that size; training then passes the same data.buckets.

Input shard K becomes OUT/latents-K-of-N.arrayrecord and OUT/text-K-of-N.arrayrecord (rflow_jax/data/precomputed.py:
format), each written under a hidden temporary name and renamed, then a note OUT/shard-K-of-N.json (their sha256 and
the fingerprint of everything that decides their bytes). Process p of P encodes shards K = p, p + P, ... with its own
devices; every encoder call has the same shape (precompute.batch_size per device, the last one padded; with buckets,
one shape per bucket: a shard is encoded bucket by bucket, precomputed.stored_order), so a record's bytes do not
depend on the process count. When all shards are done, process 0 writes the empty prompt's embedding (and the
bucket assignment) and manifest.json, last. A killed job, restarted, keeps every shard whose note matches and whose files
still have the noted sha256, and redoes the rest: the result is byte for byte the uninterrupted run's.
"""

import dataclasses
import glob
import json
import os

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax import cli
from rflow_jax.data import arrayrecord, buckets as bucket_lib, pixels, precomputed, records
from rflow_jax.model import text_encoders
from rflow_jax.train import latent_data, multihost


@dataclasses.dataclass
class Job:
  """Everything a process needs to encode shards, built once from the config (`build`)."""

  config: object
  out: str
  source: arrayrecord.ArrayRecordImageSource
  shards: list  # The converted dataset's manifest entries.
  vae_model: object
  vae_params: object
  tokenizer: object
  text_stack: object
  text_params: object
  manifest_head: dict  # What the output manifest says about its inputs (shards added by `finalize`).
  fingerprint: dict  # What decides a shard's bytes besides its own input shard.


def _check_config(config, out: str) -> None:
  """Cheap checks, each one line naming the bad value, before any file is hashed or model loaded."""
  if not out:
    raise ValueError("--out is required: the directory of the precomputed records")
  if config.data.name != "arrayrecord" or not config.data.path:
    raise ValueError(
        f"data.name={config.data.name!r}, data.path={config.data.path!r}: precompute reads a converted "
        'dataset (data.name="arrayrecord", data.path=the --out of python -m rflow_jax.data.convert)'
    )
  bucket_lib.check(config.data.buckets)  # Sizes and pixel counts; training checks the patch grids.
  precomputed.storage_dtype(config.precompute.latent_dtype, "precompute.latent_dtype")
  precomputed.storage_dtype(config.precompute.text_dtype, "precompute.text_dtype")
  if config.precompute.batch_size < 1:
    raise ValueError(f"precompute.batch_size={config.precompute.batch_size} must be >= 1")
  text_encoders.validate(config.text)


def build(config, out: str) -> Job:
  """Checks the config, verifies the converted dataset and loads the VAE and text encoders (nothing is encoded)."""
  _check_config(config, out)
  vae_model, vae_params = latent_data.load_vae(config.vae.path, config.vae.dtype)
  sizes = bucket_lib.sizes(config.data.buckets)
  for h, w in sizes or [(config.data.image_size,) * 2]:
    vae_model.check_image_size(h, w)
  in_manifest = records.load_manifest(config.data.path)
  # Hashes every input shard; with buckets, also reads every record's size and assigns its bucket.
  source = arrayrecord.ArrayRecordImageSource(config.data.path, config.data.image_size, sizes)
  tokenizer, text_stack = text_encoders.build(config.text)
  text_params = nn.meta.unbox(text_encoders.init_params(text_stack, config.text))
  f, s = vae_model.downsample_factor, config.data.image_size
  _, shapes = latent_data.text_treedef(text_stack, config.text)
  _, n_context, d_context, d_pooled = text_encoders.dims(config.text)
  head = {
      "format": precomputed.FORMAT,
      "format_version": precomputed.FORMAT_VERSION,
      "num_records": in_manifest["num_records"],
      "image_size": s,
      "source": {
          "path": os.path.abspath(config.data.path),
          "shard_sha256": [x["sha256"] for x in in_manifest["shards"]],
      },
      "vae": {
          "path": os.path.abspath(config.vae.path),
          "identity": latent_data.vae_identity(vae_model, vae_params),
          "scaling_factor": vae_model.scaling_factor,
          "shift_factor": vae_model.shift_factor,
          "dtype": config.vae.dtype,
      },
      "latent": {"shape": [s // f, s // f, vae_model.latent_channels], "dtype": config.precompute.latent_dtype},
      "text": {
          "identity": latent_data.text_identity(config.text, tokenizer, text_params),
          "encoders": config.text.encoders,
          "dtype": config.precompute.text_dtype,
          "shapes": [list(x) for x in shapes],
          "dims": {"context_tokens": n_context, "context_width": d_context, "pooled_width": d_pooled},
      },
  }
  if sizes:  # The bucket sizes decide every record's shape: they replace the square's, in the fingerprint too.
    del head["image_size"]
    head["format_version"] = precomputed.BUCKETED_FORMAT_VERSION
    head["latent"] = {
        "shapes": [[h // f, w // f, vae_model.latent_channels] for h, w in sizes],
        "dtype": config.precompute.latent_dtype,
    }
    head["buckets"] = {"sizes": [list(x) for x in sizes], "factor": f}
  fingerprint = {k: head[k] for k in ("format_version", "image_size", "latent", "text", "buckets") if k in head}
  fingerprint.update(vae=head["vae"]["identity"], vae_dtype=config.vae.dtype, batch_size=config.precompute.batch_size)
  return Job(
      config=config,
      out=out,
      source=source,
      shards=in_manifest["shards"],
      vae_model=vae_model,
      vae_params=vae_params,
      tokenizer=tokenizer,
      text_stack=text_stack,
      text_params=text_params,
      manifest_head=head,
      fingerprint=fingerprint,
  )


def _note_path(job: Job, k: int) -> str:
  return os.path.join(job.out, f"shard-{k:05d}-of-{len(job.shards):05d}.json")


def _shard_fingerprint(job: Job, k: int) -> dict:
  shard = job.shards[k]
  return {
      **job.fingerprint,
      "input_sha256": shard["sha256"],
      "first_index": shard["first_index"],
      "num_records": shard["num_records"],
  }


def finished_note(job: Job, k: int) -> dict | None:
  """The note of shard k if an earlier run finished it with the same inputs and its files still match."""
  try:
    with open(_note_path(job, k)) as f:
      note = json.load(f)
  except (OSError, ValueError):
    return None
  if note.get("fingerprint") != _shard_fingerprint(job, k):
    return None
  for kind in precomputed.KINDS:
    path = os.path.join(job.out, precomputed.shard_file(kind, k, len(job.shards)))
    if not os.path.isfile(path) or records.sha256_file(path) != note["sha256"][kind]:
      return None
  return note


def _encoder(job: Job):
  """(encode(images, tokens) -> (mean, logvar, text leaves) as numpy, rows per call): jitted over local devices."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  latent_dtype = precomputed.STORAGE_DTYPES[job.config.precompute.latent_dtype]
  text_dtype = precomputed.STORAGE_DTYPES[job.config.precompute.text_dtype]
  vae_params, text_params = jax.device_put((job.vae_params, job.text_params), replicated)

  @jax.jit
  def run(vae_params, text_params, images, tokens):
    mean, logvar = job.vae_model.apply({"params": vae_params}, images, method="encode")
    leaves = jax.tree.leaves(job.text_stack.apply({"params": text_params}, tokens))
    return mean.astype(latent_dtype), logvar.astype(latent_dtype), [x.astype(text_dtype) for x in leaves]

  def encode(images, tokens):
    out = run(vae_params, text_params, jax.device_put(images, rows), jax.device_put(tokens, rows))
    return jax.tree.map(np.asarray, out)

  return encode, job.config.precompute.batch_size * len(devices)


def encode_shard(job: Job, k: int, encode, rows: int) -> dict:
  """Encodes shard k into its two record files (atomically) and writes its note; returns the note."""
  shard = job.shards[k]
  first, n = shard["first_index"], shard["num_records"]
  writers = {
      kind: precomputed.ShardWriter(os.path.join(job.out, precomputed.shard_file(kind, k, len(job.shards))))
      for kind in precomputed.KINDS
  }
  assignment = job.source.assignment  # None without buckets: one run of index order.
  order = precomputed.stored_order(assignment, first, n)
  # Calls never mix buckets (one image shape each): each run of one bucket in `order` is cut into calls of `rows`.
  cuts = [] if assignment is None else np.flatnonzero(np.diff(assignment[order])) + 1
  calls = [run[i : i + rows] for run in np.split(order, cuts) for i in range(0, len(run), rows)]
  try:
    for call in calls:
      items = [job.source[int(i)] for i in call]
      pad = rows - len(items)  # Every call of a bucket has one shape: the same rows give the same bytes in any run.
      images = pixels.to_float(np.stack([x["image"] for x in items] + [np.zeros_like(items[0]["image"])] * pad))
      tokens = job.tokenizer.batch([x["caption"] for x in items] + [""] * pad)
      mean, logvar, leaves = encode(images, tokens)
      bucket = None if assignment is None else assignment[call[0]]
      for r in range(len(items)):
        writers["latents"].write(precomputed.encode_arrays({"mean": mean[r], "logvar": logvar[r]}, bucket))
        writers["text"].write(precomputed.encode_arrays({precomputed.text_key(i): x[r] for i, x in enumerate(leaves)}))
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  sha = {kind: writer.commit() for kind, writer in writers.items()}
  note = {"fingerprint": _shard_fingerprint(job, k), "num_records": n, "sha256": sha}
  records.write_json_atomic(_note_path(job, k), note)
  return note


def encode_process(job: Job, process_index: int, process_count: int) -> list[int]:
  """Encodes this process's shards (k % process_count == process_index) not finished before; returns those encoded."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  os.makedirs(job.out, exist_ok=True)
  mine = range(process_index, len(job.shards), process_count)
  for k in mine:  # Temporaries a killed run left of this process's shards; never listed anywhere.
    for kind in precomputed.KINDS:
      for stale in glob.glob(os.path.join(job.out, f".{precomputed.shard_file(kind, k, len(job.shards))}.tmp-*")):
        os.remove(stale)
  pending = [k for k in mine if finished_note(job, k) is None]
  if pending:  # It would describe shards about to be rewritten.
    try:
      os.remove(os.path.join(job.out, records.MANIFEST))
    except FileNotFoundError:
      pass
    encode, rows = _encoder(job)
    for k in pending:
      encode_shard(job, k, encode, rows)
  return pending


def finalize(job: Job) -> dict:
  """After every process's shards: writes the empty prompt's embedding and manifest.json (last); returns it.

  Raises:
    records.ManifestError: a shard is not finished (a process failed or has not run).
  """
  shards = {kind: [] for kind in precomputed.KINDS}
  for k, shard in enumerate(job.shards):
    note = finished_note(job, k)
    if note is None:
      raise records.ManifestError(
          f"shard {k} of {len(job.shards)} is not finished in {job.out}: run precompute "
          "again (every process) to encode it"
      )
    for kind in precomputed.KINDS:
      shards[kind].append(
          {
              "file": precomputed.shard_file(kind, k, len(job.shards)),
              "num_records": note["num_records"],
              "first_index": shard["first_index"],
              "sha256": note["sha256"][kind],
          }
      )
  empty = jax.tree.leaves(job.text_stack.apply({"params": job.text_params}, jnp.asarray(job.tokenizer.batch([""]))))
  empty_sha = precomputed.save_empty_prompt(os.path.join(job.out, precomputed.EMPTY_PROMPT), empty)
  manifest = {**job.manifest_head, "shards": shards, "empty_prompt_sha256": empty_sha}
  if "buckets" in manifest:  # The assignment the shards were encoded with (a function of their inputs and sizes).
    assignment = job.source.assignment
    manifest["buckets"] = {
        **manifest["buckets"],
        "counts": np.bincount(assignment, minlength=len(manifest["buckets"]["sizes"])).tolist(),
        "assignment_sha256": precomputed.save_assignment(job.out, assignment),
    }
  records.write_json_atomic(os.path.join(job.out, records.MANIFEST), manifest)
  return manifest


def run(config, out: str) -> dict:
  """The whole job for this process (every process of a multi-process run calls it); returns the manifest."""
  job = build(config, out)
  encode_process(job, jax.process_index(), jax.process_count())
  multihost.barrier("rflow_jax_precompute_encoded")
  manifest = finalize(job) if jax.process_index() == 0 else {}
  multihost.barrier("rflow_jax_precompute_done")
  return manifest


def main(argv):
  del argv
  multihost.init_distributed()
  with cli.clean_errors():
    manifest = run(FLAGS.config, FLAGS.out)
  if manifest:
    print(
        json.dumps(
            {
                "out": FLAGS.out,
                "num_records": manifest["num_records"],
                "latent": manifest["latent"],
                "vae": manifest["vae"]["identity"][:12],
                "text": manifest["text"]["identity"][:12],
            }
        )
    )


FLAGS = flags.FLAGS

if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config",
      None,
      "A configs/*.py file naming the converted dataset (data), the VAE " "(vae.path) and the text encoders (text).",
      lock_config=True,
  )
  flags.DEFINE_string("out", None, "Output directory of the precomputed records and manifest.json.")
  multihost.define_distributed_flags()
  flags.mark_flags_as_required(["config", "out"])
  app.run(main, flags_parser=cli.parse_flags)
