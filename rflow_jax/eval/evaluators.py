"""Evaluators the trainer runs every `train.eval_every` steps and at the end: plug-ins chosen by the config.

`config.train.evaluators` names entries of EVALUATORS. Each is a callable
`evaluate(task, state, step, out_dir) -> {name: float}`; the trainer prefixes the scores with the evaluator's name
("shapes/overall") and writes them to TensorBoard and metrics.jsonl.
"""

import json
import os
from typing import Callable

from absl import logging

from rflow_jax.data import shapes as shapes_data
from rflow_jax.eval import shapes_eval
from rflow_jax.eval import vae_recon
from rflow_jax.eval import val_loss
from rflow_jax.sampling import pipeline as sampling


def shapes_scores(sampler: sampling.Sampler, params, text_params, *, per_kind: int, seed: int, out_dir: str) -> dict:
  """ShapesEval of fresh prompts: samples `per_kind` prompts of each scene kind and scores them.

  Writes grid.png, prompts.txt, scores.json and failures.json (why the failed images failed) to out_dir.

  Returns:
    The scores: per kind, "overall" and "n" (the number of prompts).
  """
  prompts = shapes_data.eval_prompts(per_kind, seed)
  images = sampler.generate(params, text_params, prompts, seed)
  scores = shapes_eval.evaluate(images, prompts)
  os.makedirs(out_dir, exist_ok=True)
  sampling.save_png(sampling.make_grid(images, ncols=12), os.path.join(out_dir, "grid.png"))
  with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")
  with open(os.path.join(out_dir, "scores.json"), "w") as f:
    json.dump(scores, f, indent=2)
  with open(os.path.join(out_dir, "failures.json"), "w") as f:
    json.dump(shapes_eval.failure_breakdown(images, prompts), f, indent=2)
  return scores


def shapes(task, state, step: int, out_dir: str) -> dict[str, float]:
  """The "shapes" evaluator: ShapesEval of the task's sampler on config.sample's eval prompts (the count is not a
  score, so "n" is left out)."""
  del step
  if task.config.data.name != "shapes":  # Its prompts and grader describe the built-in shapes scenes only.
    logging.warning(
        "The 'shapes' evaluator scores the built-in shapes task only; data.name=%r: skipped", task.config.data.name
    )
    return {}
  sample = task.config.sample
  scores = shapes_scores(
      task.sampler,
      task.sampler.params_of(state),
      state.text_params,
      per_kind=sample.eval_per_kind,
      seed=sample.eval_seed,
      out_dir=out_dir,
  )
  return {k: v for k, v in scores.items() if k != "n"}


EVALUATORS: dict[str, Callable[..., dict[str, float]]] = {
    "shapes": shapes,
    val_loss.NAME: val_loss.evaluate,  # Held-out loss at 8 fixed t levels, raw and EMA weights.
    "vae_recon": vae_recon.evaluate,  # PSNR, SSIM and ShapesEval of reconstructions (the VAE task).
}


def get(names) -> dict[str, Callable[..., dict[str, float]]]:
  """{name: evaluator} for the names of config.train.evaluators; ValueError naming an unknown one."""
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f"train.evaluators has {name!r}; valid: {sorted(EVALUATORS)}")
  return {name: EVALUATORS[name] for name in names}
