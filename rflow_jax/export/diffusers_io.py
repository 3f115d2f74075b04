"""diffusers SD3Transformer2DModel directories on disk: read, write (sharded), and refuse pickles.

The names and layouts are rflow_jax/export/diffusers.py's. Checkpoints are read and written with safetensors only;
pickle-based files (.bin/.pt/.ckpt/.pth) are refused, never unpickled. A directory is written to a temporary sibling
and renamed into place, so an interrupted save leaves no partial directory.
"""

from collections.abc import Mapping, Sequence
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import safetensors.numpy

from rflow_jax import paths
from rflow_jax.export import diffusers as names
from rflow_jax.model import mmdit

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")
# diffusers' save_pretrained default shard size ("10GB").
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9


def refuse_pickle(path: str | os.PathLike[str]) -> None:
  """Raises ValueError for pickle-based checkpoints (never unpickled)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise ValueError(
        f"{path} is a pickle-based PyTorch checkpoint; refusing to unpickle "
        f"it (arbitrary code execution). Convert it to safetensors first, "
        f"e.g. in a trusted environment: SD3Transformer2DModel."
        f"from_pretrained(...).save_pretrained(dir, safe_serialization=True) "
        f"or safetensors.torch.save_file(torch.load(f), out)"
    )


def load_safetensors(files: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
  """Merges safetensors files into one numpy dict (duplicates are errors)."""
  out: dict[str, np.ndarray] = {}
  for f in files:
    refuse_pickle(f)
    tensors = safetensors.numpy.load_file(str(f))
    dup = sorted(set(tensors) & set(out))
    if dup:
      raise ValueError(f"{f} repeats tensors {dup[:5]}")
    out.update(tensors)
  return out


def weight_files(
    path: pathlib.Path, weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME
) -> list[pathlib.Path]:
  """The safetensors files of a model directory: the index's shards, or the single file.

  Args:
    path: the directory.
    weights_name: the single-file name (transformers uses model.safetensors).
    index_name: the sharded index name (transformers uses model.safetensors.index.json).

  Returns:
    The files to load; pickle-only directories are refused, missing weights are a FileNotFoundError.
  """
  index = path / index_name
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]
  single = path / weights_name
  if single.exists():
    return [single]
  pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
  if pickles:
    refuse_pickle(path / pickles[0])
  raise FileNotFoundError(f"{path} has neither {weights_name} nor {index_name}")


PIPELINE_INDEX = "model_index.json"  # What marks a diffusers pipeline directory.


def component_dir(path: str | os.PathLike[str], subfolder: str) -> pathlib.Path:
  """`path`, or its `subfolder` when `path` is a pipeline directory (model_index.json, no config.json of its own)."""
  path = pathlib.Path(path)
  refuse_pickle(path)
  if (path / PIPELINE_INDEX).is_file() and not (path / CONFIG_NAME).exists():
    return path / subfolder
  return path


def load_transformer(path: str | os.PathLike[str], **overrides: Any) -> tuple[mmdit.MMDiT, Params]:
  """Loads a diffusers SD3 transformer directory as (MMDiT, params).

  Args:
    path: directory with config.json and diffusion_pytorch_model.safetensors
      (or its sharded index), e.g. `<pipeline>/transformer`, or the pipeline
      directory itself.
    **overrides: non-architectural MMDiT attributes (dtype, remat, ...).

  Returns:
    The model and its params (host numpy arrays, param_dtype).
  """
  path = component_dir(path, "transformer")
  if not path.is_dir():
    raise ValueError(f"{path} is not a diffusers transformer directory")
  if not (path / CONFIG_NAME).is_file():
    raise FileNotFoundError(f"{path / CONFIG_NAME} does not exist: not a diffusers transformer directory")
  cfg = json.loads((path / CONFIG_NAME).read_text())
  if cfg.get("_class_name", names.CLASS_NAME) != names.CLASS_NAME:
    raise ValueError(f"{path / CONFIG_NAME} describes {cfg['_class_name']}, " f"not {names.CLASS_NAME}")
  model = names.model_from_diffusers_config(cfg, **overrides)
  state_dict = load_safetensors(weight_files(path))
  return model, names.params_from_diffusers(state_dict, model)


def _shards(state_dict: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Greedy split in key order; a tensor larger than the limit stands alone."""
  shards, current, size = [], {}, 0
  for key in sorted(state_dict):
    n = state_dict[key].nbytes
    if current and size + n > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = state_dict[key]
    size += n
  if current:
    shards.append(current)
  return shards


def save_transformer(
    params: Mapping[str, Any],
    model: mmdit.MMDiT,
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    sample_size: int | None = None,
) -> pathlib.Path:
  """Writes a diffusers SD3Transformer2DModel directory.

  config.json plus diffusion_pytorch_model.safetensors, or numbered shards
  and diffusion_pytorch_model.safetensors.index.json when the tensors exceed
  `max_shard_bytes`. Everything is written to a temporary sibling directory
  that is renamed into place, so readers never see a partial checkpoint.

  Args:
    params: our param tree (boxed or unboxed; device or host arrays).
    model: the MMDiT the params belong to.
    out_dir: target directory (loadable by SD3Transformer2DModel.
      from_pretrained).
    max_shard_bytes: largest shard size before splitting.
    overwrite: replace an existing out_dir.
    sample_size: config.json's sample_size (see diffusers.diffusers_config).

  Returns:
    The output directory.
  """
  return write_model_dir(
      names.diffusers_config(model, sample_size),
      names.params_to_diffusers(params, model),
      out_dir,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )


def write_model_dir(
    config: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    weights_name: str = WEIGHTS_NAME,
    index_name: str = INDEX_NAME,
) -> pathlib.Path:
  """Writes a diffusers model directory (config.json + safetensors, sharded past `max_shard_bytes`) atomically.

  Everything is written to a temporary sibling directory that is renamed into place, so readers never see a partial
  checkpoint; an existing `out_dir` is refused unless `overwrite`. Used by the transformer and VAE exporters, and with
  transformers' file names (model.safetensors) by the text encoders'.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace")
  shards = _shards(state_dict, max_shard_bytes)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  paths.make_readable(tmp)  # Not mkdtemp's 0700: the team reads exports.
  try:
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if len(shards) == 1:
      files = [weights_name]
    else:
      stem = weights_name.removesuffix(".safetensors")
      files = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
      index = {
          "metadata": {"total_size": sum(a.nbytes for a in state_dict.values())},
          "weight_map": {k: n for n, s in zip(files, shards) for k in s},
      }
      (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
    for name, shard in zip(files, shards):
      safetensors.numpy.save_file(shard, str(tmp / name), metadata={"format": "pt"})
    paths.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
