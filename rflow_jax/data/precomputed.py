"""Precomputed latent and text-embedding records: their format, their manifest, and the grain source reading them.

`python -m rflow_jax.precompute` encodes a converted dataset (rflow_jax/data/records.py) once with a VAE and the
frozen text encoders; `data.name = "precomputed"` trains on the result. Input shard K becomes two ArrayRecord files
holding the same global record indices in the same order:

  latents-K-of-N.arrayrecord   record i: msgpack {"mean": bytes, "logvar": bytes}, the VAE posterior's moments
                               (h, w, latent_channels) each, at the storage dtype `latent.dtype`
  text-K-of-N.arrayrecord      record i: msgpack {"text_0": bytes, ...}, the text stack's per-encoder outputs
                               (contexts and pooled vectors, in jax.tree.leaves order), at `text.dtype`
  empty_prompt.safetensors     the same outputs for the empty prompt, once (float32, batch 1)

Why the moments and not a latent: training draws a fresh latent x = mean + exp(logvar / 2)·ε every step, from the
step's key, as it would after encoding in the step. Why per-encoder outputs and not the composed context: caption
dropout acts per encoder before the composition, so the trainer composes at each step exactly as the in-step path.
Why raw bytes of a fixed shape (named once in the manifest): a record decodes with one np.frombuffer per array.

`manifest.json` (written last, by rename; format "rflow_jax.precomputed_records" version 1): num_records, `source`
(the converted dataset's path and its manifest's shard hashes), `vae` (path, identity = sha256 of its architecture
and weights, scaling/shift factors at encoding time), `text` (config fields, identity = sha256 of the tokenizations
of probe prompts and the weights), `latent` and `text` array specs, and per output kind the shards (file, num_records,
first_index, sha256) as rflow_jax/data/records.py lists them, so records.verify_shards checks them.

Version 2: aspect-ratio buckets (data.buckets at precompute). Record i's image was fitted to its bucket's (h, w)
pixels (rflow_jax/data/buckets.py assigns it) before encoding, so its moments are (h/f, w/f, latent_channels); its
latent record also holds "bucket" (int), the index of its shape. The manifest's `latent` lists one shape per bucket
("shapes" instead of "shape"), and `buckets` holds their pixel "sizes", the VAE "factor" f, the records per bucket
("counts") and the sha256 of `bucket_assignment.npy` ((N,) int32, record i's bucket), which training reads instead
of scanning every record. Within each shard the two files hold the records ordered by (bucket, index)
(`stored_order`): the encoder then runs one shape per bucket, every call full but each bucket's last. Unbucketed
outputs are still written as version 1, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os

import grain
import ml_dtypes
import msgpack
import numpy as np

from rflow_jax.data import records

FORMAT = "rflow_jax.precomputed_records"
FORMAT_VERSION = 1
BUCKETED_FORMAT_VERSION = 2  # Written with data.buckets only; the reader reads both.
ASSIGNMENT = "bucket_assignment.npy"
KINDS = ("latents", "text")  # The two record files of each shard, in this order.
EMPTY_PROMPT = "empty_prompt.safetensors"
STORAGE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
LATENT_KEYS = ("latent_mean", "latent_logvar")  # The example keys the source serves (and the train step reads).


def text_key(i: int) -> str:
  """The record and example key of the i-th text-stack output (jax.tree.leaves order)."""
  return f"text_{i}"


def shard_file(kind: str, index: int, count: int) -> str:
  return f"{kind}-{index:05d}-of-{count:05d}.arrayrecord"


def tree_sha256(flat: dict[str, np.ndarray]) -> str:
  """sha256 of named arrays (sorted by name; name, dtype, shape and bytes each): the identity of a set of weights."""
  digest = hashlib.sha256()
  for name in sorted(flat):
    array = np.ascontiguousarray(np.asarray(flat[name]))
    digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def json_sha256(obj) -> str:
  """sha256 of a JSON-able object (sorted keys): the identity of a configuration."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def storage_dtype(name: str, key: str) -> np.dtype:
  """The numpy dtype of a storage dtype name; ValueError naming the config key and the valid names."""
  if name not in STORAGE_DTYPES:
    raise ValueError(f"{key}={name!r}; valid: {sorted(STORAGE_DTYPES)}")
  return STORAGE_DTYPES[name]


def encode_arrays(arrays: dict[str, np.ndarray], bucket: int | None = None) -> bytes:
  """One record: named arrays as raw bytes (their shape and dtype live in the manifest), and its bucket if any."""
  record = {k: np.ascontiguousarray(v).tobytes() for k, v in arrays.items()}
  if bucket is not None:
    record["bucket"] = int(bucket)
  return msgpack.packb(record, use_bin_type=True)


def decode_arrays(data: bytes | dict, specs: dict[str, dict]) -> dict[str, np.ndarray]:
  """Inverse of encode_arrays (of its bytes, or of their msgpack dict) for the keys of `specs` ({key: {"shape",
  "dtype"}})."""
  raw = msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else data
  return {k: np.frombuffer(raw[k], STORAGE_DTYPES[s["dtype"]]).reshape(s["shape"]) for k, s in specs.items()}


def bucket_sizes(manifest: dict) -> tuple[tuple[int, int], ...]:
  """The (height, width) pixel sizes the records were fitted to; () for squares of one size (version 1)."""
  return tuple(tuple(x) for x in manifest["buckets"]["sizes"]) if "buckets" in manifest else ()


def latent_shapes(manifest: dict) -> list[list[int]]:
  """(h, w, channels) of the stored moments: one per bucket, or the one shape of an unbucketed output."""
  return manifest["latent"]["shapes"] if "buckets" in manifest else [manifest["latent"]["shape"]]


def latent_specs(manifest: dict, bucket: int = 0) -> dict[str, dict]:
  spec = {"shape": latent_shapes(manifest)[bucket], "dtype": manifest["latent"]["dtype"]}
  return {"mean": spec, "logvar": spec}


def stored_order(assignment: np.ndarray | None, first: int, count: int) -> np.ndarray:
  """The record indices of the shard [first, first + count) in the order its files hold them: by bucket, then index."""
  if assignment is None:
    return np.arange(first, first + count)
  return first + np.argsort(assignment[first : first + count], kind="stable")


def text_specs(manifest: dict) -> dict[str, dict]:
  dtype = manifest["text"]["dtype"]
  return {text_key(i): {"shape": shape, "dtype": dtype} for i, shape in enumerate(manifest["text"]["shapes"])}


class ShardWriter:
  """An ArrayRecord file written under a hidden temporary name and renamed by `commit`: a reader sees all or nothing.

  Records are written as they come (a shard of T5-XXL embeddings does not fit in host memory); `abort` removes the
  temporary. A killed process leaves it behind, and the next precompute removes it.
  """

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    directory, name = os.path.split(path)
    self.path, self._tmp = path, os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    self._writer = ArrayRecordWriter(self._tmp, "group_size:1")

  def write(self, data: bytes) -> None:
    self._writer.write(data)

  def commit(self) -> str:
    """Closes the file and renames it into place; returns its sha256."""
    self._writer.close()
    digest = records.sha256_file(self._tmp)
    os.replace(self._tmp, self.path)
    return digest

  def abort(self) -> None:
    self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


def load_manifest(directory: str) -> dict:
  """DIR/manifest.json of a precompute output; records.ManifestError in one line if it is missing or not ours."""
  return records.load_manifest(
      directory,
      fmt=FORMAT,
      version=(FORMAT_VERSION, BUCKETED_FORMAT_VERSION),
      what="a precompute output",
      made_by="its precompute did not finish (run python -m rflow_jax.precompute)",
      reader='data.name="precomputed" reads',
  )


def load_empty_prompt(directory: str, manifest: dict) -> list[np.ndarray]:
  """The empty prompt's text-stack outputs (float32, batch 1, jax.tree.leaves order), checked against the manifest."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, EMPTY_PROMPT)
  if records.sha256_file(path) != manifest["empty_prompt_sha256"]:
    raise records.ManifestError(f"{path} fails its hash (changed since precompute; run precompute again)")
  arrays = load_file(path)
  return [arrays[text_key(i)] for i in range(len(manifest["text"]["shapes"]))]


def save_assignment(directory: str, assignment: np.ndarray) -> str:
  """Writes DIR/bucket_assignment.npy atomically; returns its sha256."""
  out = io.BytesIO()
  np.save(out, np.asarray(assignment, np.int32), allow_pickle=False)
  tmp = os.path.join(directory, f".{ASSIGNMENT}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(out.getvalue())
  path = os.path.join(directory, ASSIGNMENT)
  os.replace(tmp, path)
  return records.sha256_file(path)


def load_assignment(directory: str, manifest: dict) -> np.ndarray:
  """(N,) int32 bucket of each record, checked against the manifest's sha256 and counts."""
  path, b = os.path.join(directory, ASSIGNMENT), manifest["buckets"]
  if not os.path.isfile(path) or records.sha256_file(path) != b["assignment_sha256"]:
    raise records.ManifestError(f"{path} is missing or fails its hash (changed since precompute; run precompute again)")
  assignment = np.load(path, allow_pickle=False)
  counts = np.bincount(assignment, minlength=len(b["sizes"])).tolist()
  if assignment.shape != (manifest["num_records"],) or counts != b["counts"]:
    raise records.ManifestError(f"{path} gives bucket counts {counts}, but {records.MANIFEST} says {b['counts']}")
  return assignment


class PrecomputedSource(grain.sources.RandomAccessDataSource):
  """Record i of a precompute output: {latent_mean, latent_logvar, text_0, ..., index} (picklable for workers).

  Attributes:
    assignment: (N,) bucket of each record (a bucketed output), or None.
  """

  def __init__(self, path: str):
    """Verifies the manifest and the sha256 of every shard file (and of the bucket assignment), then opens them.

    Raises:
      records.ManifestError: no manifest, another format, a missing shard file or one that fails its hash.
    """
    if not path:
      raise ValueError(
          'data.name="precomputed" reads a precompute output: set data.path to the --out directory of '
          "python -m rflow_jax.precompute"
      )
    self.manifest = load_manifest(path)
    self._path, self._num_records = path, self.manifest["num_records"]
    self._latent_specs = [latent_specs(self.manifest, b) for b in range(len(latent_shapes(self.manifest)))]
    self._text_specs = text_specs(self.manifest)
    self.assignment, self._position = None, None  # Position: where record i sits in the files (stored_order).
    if bucket_sizes(self.manifest):
      self.assignment = load_assignment(path, self.manifest)
      self._position = np.zeros(self._num_records, np.int64)
      for shard in self.manifest["shards"]["latents"]:
        first, n = shard["first_index"], shard["num_records"]
        self._position[stored_order(self.assignment, first, n)] = np.arange(first, first + n)
    self._sources = {}
    for kind in KINDS:
      shards = self.manifest["shards"][kind]
      paths = records.verify_shards(path, {"shards": shards})
      self._sources[kind] = grain.sources.ArrayRecordDataSource(
          [p for p, s in zip(paths, shards) if s["num_records"]]
      )  # Empty shards add nothing to the index space.

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self._num_records:
      raise IndexError(f"record index {index} out of range [0, {self._num_records})")
    at = index if self._position is None else int(self._position[index])
    raw = msgpack.unpackb(self._sources["latents"][at], raw=False)
    latents = decode_arrays(raw, self._latent_specs[raw.get("bucket", 0)])
    example = {
        "latent_mean": latents["mean"],
        "latent_logvar": latents["logvar"],
        **decode_arrays(self._sources["text"][at], self._text_specs),
    }
    example["index"] = np.int64(index)
    return example

  def __repr__(self) -> str:
    return f"PrecomputedSource(path={self._path!r})"


def save_empty_prompt(path: str, leaves) -> str:
  """Writes the empty prompt's outputs to `path` (safetensors, atomically); returns the file's sha256."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top

  data = save({text_key(i): np.asarray(leaf, np.float32) for i, leaf in enumerate(leaves)})
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
  with io.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return records.sha256_file(path)
