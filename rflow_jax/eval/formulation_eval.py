"""The formulation study's evaluation (launch/formulation_study.py trains the variants): every trained variant's EMA
and raw weights at several Euler step counts, scored by ShapesEval and the random-network FD (rflow_jax/eval/fid.py)
against real images, with results cached in each workdir.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import time

import numpy as np

from rflow_jax import rundir
from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes
from rflow_jax.eval import fid as fid_lib
from rflow_jax.eval import shapes_eval
from rflow_jax.sampling import pipeline as sampling
from rflow_jax.train import checkpoint

WEIGHTS = ("ema", "raw")  # EMA and non-EMA parameters, both evaluated as in the paper.
REFERENCE_SEED = 1000  # Seed of the real reference images; differs from sample.eval_seed (the prompts' scenes).
EVAL_CACHE = "study_eval.json"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluation setting: which weights, how many Euler steps."""

  weights: str
  steps: int

  @property
  def key(self) -> str:
    return f"{self.weights}/{self.steps}"


def settings_of(sample_steps: Sequence[int], weights: Sequence[str]) -> list[Setting]:
  """The evaluation grid, steps-major (ema/5, raw/5, ema/10, ...)."""
  bad = [w for w in weights if w not in WEIGHTS]
  if bad or not weights:
    raise ValueError(f"weights {list(weights)} must be a non-empty subset of {WEIGHTS}")
  if not sample_steps or any(s < 1 for s in sample_steps):
    raise ValueError(f"sample steps {list(sample_steps)} must be a non-empty list of positive integers")
  return [Setting(w, int(s)) for s in sample_steps for w in weights]


def read_json(path: str):
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # Atomic, so an interrupted study never leaves a half-written cache.


def _eval_meta(config, step: int, per_kind: int, ref_meta: dict) -> dict:
  """Everything an evaluation depends on besides the setting; a cached result is reused only if it matches."""
  return {
      "step": step,
      "per_kind": per_kind,
      "cfg_scale": float(config.sample.cfg_scale),
      "eval_seed": int(config.sample.eval_seed),
      "solver": config.sample.solver,
      "shift": config.sample.shift,
      "feature_seed": fid_lib.FEATURE_SEED,
      **ref_meta,
  }


def evaluate_variant(
    workdir: str, settings: Sequence[Setting], *, per_kind: int, reference: fid_lib.Stats, ref_meta: dict
) -> dict[str, dict]:
  """ShapesEval + FD of one trained variant at every setting (cached per setting in WORKDIR/study_eval.json).

  Returns:
    setting key -> {"overall", "single", "position", "counting", "fid", "compile_s", "sample_s", "score_s", ...}.
  """
  config = rundir.load_config(workdir)
  step = checkpoint.latest_step(workdir)
  meta = _eval_meta(config, step, per_kind, ref_meta)
  cache_path = os.path.join(workdir, EVAL_CACHE)
  cache = read_json(cache_path) or {}
  if cache.get("meta") != meta:
    cache = {"meta": meta, "results": {}}
  prompts = shapes.eval_prompts(per_kind, config.sample.eval_seed)
  raw_params = None
  for steps in sorted({s.steps for s in settings}):
    todo = [s for s in settings if s.steps == steps and s.key not in cache["results"]]
    if not todo:
      continue
    sampler, ema_params, text_params, _, _ = rundir.load_sampler(workdir, steps=steps, use_ema=True)
    t0 = time.time()
    sampler.generate(ema_params, text_params, prompts[:1], config.sample.eval_seed)  # Compiles (batch padded).
    compile_s = time.time() - t0
    for setting in todo:
      if setting.weights == "raw" and raw_params is None:
        raw_params, _, _ = checkpoint.restore_params(workdir, use_ema=False)
      params = ema_params if setting.weights == "ema" else raw_params
      cache["results"][setting.key] = _score_setting(
          sampler,
          params,
          text_params,
          prompts,
          config,
          reference,
          os.path.join(workdir, "study_eval", setting.key.replace("/", "_")),
      )
      cache["results"][setting.key]["compile_s"] = compile_s
      write_json(cache_path, cache)
  return {s.key: cache["results"][s.key] for s in settings}


def _score_setting(sampler, params, text_params, prompts, config, reference, out_prefix) -> dict:
  """Samples the prompts once, scores them; writes a grid PNG next to the cache."""
  t0 = time.time()
  images = sampler.generate(params, text_params, prompts, config.sample.eval_seed)
  sample_s = time.time() - t0
  t0 = time.time()
  scores = shapes_eval.evaluate(images, prompts)
  fd = fid_lib.fid(images, reference)
  score_s = time.time() - t0
  os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
  sampling.save_png(sampling.make_grid(images, ncols=12), out_prefix + ".png")
  return {**{k: float(v) for k, v in scores.items()}, "fid": fd, "sample_s": sample_s, "score_s": score_s}


def reference(study_dir: str, *, n: int, size: int) -> tuple[fid_lib.Stats, dict]:
  """FD reference statistics of n real images (cached in STUDY_DIR) and their description."""
  meta = {"ref_n": n, "ref_seed": REFERENCE_SEED, "image_size": size}
  path = os.path.join(study_dir, f"reference_n{n}_seed{REFERENCE_SEED}_s{size}_f{fid_lib.FEATURE_SEED}.npz")
  if os.path.isfile(path):
    return fid_lib.Stats.load(path), meta
  stats = fid_lib.reference_stats(n, REFERENCE_SEED, size)
  stats.save(path)
  return stats, meta


def real_baseline(per_kind: int, eval_seed: int, size: int, ref: fid_lib.Stats) -> dict:
  """Scores of the real scenes behind the evaluation prompts: ShapesEval's ceiling and the FD floor at this N."""
  images = np.stack([shapes.render(s, size) for s in shapes_scenes.eval_scenes(per_kind, eval_seed, size)])
  scores = shapes_eval.evaluate(images, shapes.eval_prompts(per_kind, eval_seed))  # Same (kind-major) order.
  return {**{k: float(v) for k, v in scores.items()}, "fid": fid_lib.fid(images, ref)}
