"""The formulation study (SD3 §5.1, Table 1) in miniature: train every variant, evaluate, rank, write the report.

  python launch/formulation_study.py --study_dir=runs/formulations
  python launch/formulation_study.py --study_dir=runs/form_cheap --steps=300 --only='rf,eps/linear,rf/cosmap'
  python launch/formulation_study.py --study_dir=runs/formulations_shift1 --shift=1  # the paper's protocol: no shift
  python launch/formulation_study.py --study_dir=/tmp/form_smoke --model=debug --steps=10 --sample_steps=2 \
      --weights=ema --per_kind=4 --only='rf,eps/linear' --out=/tmp/form_smoke/formulations.md

For each `configs/formulations.py` sweep entry (or the --only subset) in turn:
  1. train into STUDY_DIR/<safe name>/ with `trainer.train_and_evaluate` (train.eval_at_end=False); a run whose
     newest checkpoint already has the requested step count is skipped, an unfinished one resumes, so re-running
     the command after an interruption continues where it stopped;
  2. evaluate its EMA and raw weights at 5, 10 and 25 Euler steps (guidance scale from the config) on
     3 × --per_kind fresh ShapesEval prompts (120 by default): ShapesEval accuracy and the random-network FD
     (rflow_jax/eval/fid.py) against real images; evaluations are cached in STUDY_DIR/<safe name>/study_eval.json;
  3. rank per setting by non-dominated sorting of (ShapesEval ↑, FD ↓), average the ranks (all settings, and per
     step count) and compare with the paper's Table 1 (rflow_jax/eval/ranking.py);
  4. write STUDY_DIR/results.json and the markdown report (--out, default docs/results/formulations.md;
     rflow_jax/eval/formulation_report.py).

Every variant gets the same training compute (configs/formulations.py). Runs are sequential, in this process.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` and `rflow_jax` importable when run as a script from any cwd.

# pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging

from configs import debug as debug_config
from configs import formulations as formulations_config
from rflow_jax import cli
from rflow_jax import config_lib
from rflow_jax import paths
from rflow_jax import rundir
from rflow_jax.eval import fid as fid_lib
from rflow_jax.eval import formulation_eval
from rflow_jax.eval import formulation_report as report
from rflow_jax.flow import formulations
from rflow_jax.train import checkpoint
from rflow_jax.train import trainer

# pylint: enable=g-import-not-at-top,wrong-import-position

SAMPLE_STEPS = (5, 10, 25)  # Euler steps of the evaluation settings (the paper used 5, 25 and 50).
REFERENCE_N = 1200  # Real images behind the FD reference statistics.
MODELS = ("quickstart", "debug")  # --model: the study's model, or the tiny debug one for smoke runs.
DEFAULT_OUT = ROOT / "docs" / "results" / "formulations.md"
TRAIN_RECORD = "study_train.json"


def split_names(text: str) -> list[str]:
  """'rf,rf/lognorm(0.00,1.00), eps/linear' -> the three names (commas inside parentheses do not split)."""
  names, depth, current = [], 0, ""
  for ch in text:
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      names.append(current)
      current = ""
    else:
      current += ch
  names.append(current)
  names = [n.strip() for n in names if n.strip()]
  if depth != 0:
    raise ValueError(f"unbalanced parentheses in --only={text!r}")
  return names


def safe_name(name: str) -> str:
  """A directory name for a formulation: 'rf/lognorm(0.00,1.00)' -> 'rf_lognorm_0.00_1.00' (keeps '-' and '.')."""
  return re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("_")


def variant_config(name: str, *, model: str = "quickstart", num_steps: int | None = None, shift: float | None = None):
  """The training config of one variant: configs/formulations.py (or the debug model), `name` as formulation.

  Args:
    name: formulation in the paper's notation.
    model: "quickstart" (the study) or "debug" (smoke runs; configs/debug.py sizes).
    num_steps: overrides train.num_steps (the same for every variant, so compute stays equal).
    shift: overrides the timestep shift α of training (flow.shift) and sampling (sample.shift) together; 1.0 is
      the paper's protocol (its study had no shift), the quickstart recipe uses 3.0.
  """
  if model == "quickstart":
    c = formulations_config.get_config(name)
  elif model == "debug":
    c = debug_config.get_config()
    c.flow.formulation = name
    c.train.eval_at_end = False
  else:
    raise ValueError(f"model={model!r}; valid: {MODELS}")
  if num_steps is not None:
    if num_steps < 1:
      raise ValueError(f"--steps={num_steps} must be positive")
    c.train.num_steps = num_steps
  if shift is not None:
    if not shift > 0:
      raise ValueError(f"--shift={shift} must be > 0")
    c.flow.shift = c.sample.shift = float(shift)
  return c


class StudyInterrupted(RuntimeError):
  """A training run was preempted (SIGTERM); its checkpoint is committed and re-running the study resumes it."""


def train_variant(config, workdir: str) -> dict:
  """Trains one variant unless its workdir already holds the final checkpoint; returns its training record.

  A run whose loss goes non-finite is not retried on re-runs: its record says "diverged" and the study ranks it
  last in every setting (a formulation that cannot be trained with the shared recipe loses, as it would in the
  paper), instead of stopping the whole study.

  Raises:
    ValueError: the workdir holds a run of another formulation or model, or one trained past the requested steps.
    StudyInterrupted: the run was preempted.
  """
  want_steps, name = config.train.num_steps, config.flow.formulation
  if os.path.isfile(os.path.join(workdir, "config.json")):
    _check_same_run(rundir.load_config(workdir), config, workdir)
  done = checkpoint.latest_step(workdir)
  record_path = os.path.join(workdir, TRAIN_RECORD)
  previous = formulation_eval.read_json(record_path) or {}
  if done is not None and done > want_steps:
    raise ValueError(f"{workdir!r} was trained to step {done} > the requested {want_steps}; use another --study_dir")
  if previous.get("diverged") and previous.get("num_steps") == want_steps:
    logging.warning("%s: diverged before (%s); not retrying", name, previous["diverged"])
    return previous
  if done == want_steps:
    logging.info("%s: finished (step %d), not retraining", name, done)
    return previous or {"train_s": math.nan, "steps": done, "num_steps": want_steps, "resumed_from": None}
  t0 = time.time()
  record = {"num_steps": want_steps, "resumed_from": done}
  try:
    results = trainer.train_and_evaluate(config, workdir)
  except trainer.NonFiniteError as e:
    logging.error("%s diverged: %s", name, e)
    record.update(diverged=str(e), steps=checkpoint.latest_step(workdir))
  else:
    if results.get("preempted"):
      raise StudyInterrupted(f"{name}: preempted at step {results['step']}; re-run the study to resume")
    record.update(steps=int(results["step"]), final_loss=float(results.get("loss", math.nan)))
  record["train_s"] = (previous.get("train_s", 0.0) if done else 0.0) + time.time() - t0
  formulation_eval.write_json(record_path, record)
  return record


_SAME_RUN_FIELDS = (
    "flow.formulation",
    "flow.shift",
    "model.hidden_size",
    "model.depth",
    "model.num_heads",
    "model.patch_size",
    "train.global_batch_size",
    "data.image_size",
    "seed",
)


def _check_same_run(saved, config, workdir: str) -> None:
  """Refuses a workdir trained with another formulation, model or batch (a skipped run would be evaluated as is)."""
  for field in _SAME_RUN_FIELDS:
    section, _, leaf = field.rpartition(".")
    a = saved[section][leaf] if section else saved[leaf]
    b = config[section][leaf] if section else config[leaf]
    if field == "flow.formulation":
      a, b = formulations.get(a).name, formulations.get(b).name
    if a != b:
      raise ValueError(
          f"{workdir!r} holds a run with {field}={a!r}, but this study asks for {b!r}; " "use another --study_dir"
      )


def run_study(
    study_dir: str,
    *,
    names: Sequence[str] | None = None,
    num_steps: int | None = None,
    shift: float | None = None,
    model: str = "quickstart",
    per_kind: int = 40,
    sample_steps: Sequence[int] = SAMPLE_STEPS,
    weights: Sequence[str] = formulation_eval.WEIGHTS,
    reference_n: int = REFERENCE_N,
    out: str | None = None,
    make_config: Callable[[str], object] | None = None,
    command: str | None = None,
) -> dict:
  """Trains, evaluates and ranks every variant; writes STUDY_DIR/results.json and the markdown report.

  Args:
    study_dir: one subdirectory per variant goes here.
    names: formulations (paper notation); None = configs/formulations.py STUDY.
    num_steps: train.num_steps override for every variant.
    shift: timestep shift α override (training and sampling) for every variant.
    model: "quickstart" or "debug" (see variant_config).
    per_kind: ShapesEval prompts per scene kind (3 kinds).
    sample_steps: Euler step counts of the evaluation settings.
    weights: "ema" and/or "raw".
    reference_n: real images behind the FD reference.
    out: markdown path; None = docs/results/formulations.md.
    make_config: name -> config, replacing variant_config (custom studies, notebooks).
    command: the command line, quoted in the report.

  Returns:
    The results dict written to results.json.
  """
  names = [formulations.get(n).name for n in (names or formulations_config.STUDY)]  # Canonical; fails early.
  if len(set(names)) != len(names) or len({safe_name(n) for n in names}) != len(names):
    raise ValueError(f"duplicate formulations in {names}")
  if per_kind < 1:
    raise ValueError(f"per_kind={per_kind} must be >= 1")
  settings = formulation_eval.settings_of(sample_steps, weights)
  make_config = make_config or (lambda n: variant_config(n, model=model, num_steps=num_steps, shift=shift))
  configs = {n: make_config(n) for n in names}
  for config in configs.values():  # Every variant's config is checked before hours of training start.
    config_lib.validate(config)
  os.makedirs(study_dir, exist_ok=True)
  first = configs[names[0]]
  size = first.data.image_size
  ref, ref_meta = formulation_eval.reference(study_dir, n=reference_n, size=size)
  variants = {}
  for name in names:
    workdir = os.path.join(study_dir, safe_name(name))
    logging.info("=== %s -> %s", name, workdir)
    train = train_variant(configs[name], workdir)
    if train.get("diverged"):
      evals = {s.key: dict(DIVERGED_EVAL) for s in settings}
    else:
      evals = formulation_eval.evaluate_variant(workdir, settings, per_kind=per_kind, reference=ref, ref_meta=ref_meta)
    variants[name] = {"workdir": workdir, "train": train, "evals": evals}
  real = formulation_eval.real_baseline(per_kind, first.sample.eval_seed, size, ref)
  results = _results_dict(first, settings, per_kind, ref_meta, real, variants)
  formulation_eval.write_json(os.path.join(study_dir, "results.json"), results)
  out = str(out or DEFAULT_OUT)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(report.render_markdown(results, command=command))
  logging.info("Wrote %s", out)
  return results


# A diverged variant's scores: NaN counts as the worst value in non-dominated sorting (rflow_jax/eval/ranking.py).
DIVERGED_EVAL = {"overall": math.nan, "fid": math.nan, "sample_s": math.nan, "compile_s": math.nan}


def _results_dict(config, settings, per_kind, ref_meta, real, variants) -> dict:
  """The study's results (what results.json holds), ranks included."""
  results = {
      "generated": datetime.datetime.now().isoformat(timespec="seconds"),
      "settings": [s.key for s in settings],
      "sample_steps": sorted({s.steps for s in settings}),
      "per_kind": per_kind,
      "reference": ref_meta,
      "feature_seed": fid_lib.FEATURE_SEED,
      "train": {
          "num_steps": config.train.num_steps,
          "global_batch_size": config.train.global_batch_size,
          "model": {k: config.model[k] for k in ("hidden_size", "depth", "num_heads", "patch_size")},
          "cfg_scale": config.sample.cfg_scale,
          "train_shift": config.flow.shift,
          "sample_shift": config.sample.shift,
      },
      "real": real,
      "variants": variants,
  }
  results["ranks"] = report.rank_results(results)
  return results


# --------------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  flags.DEFINE_string("study_dir", None, "One subdirectory per variant, results.json, reference stats.", required=True)
  flags.DEFINE_integer("steps", None, "Override train.num_steps for every variant (a cheaper study).")
  flags.DEFINE_float(
      "shift",
      None,
      "Override the timestep shift α of training and sampling for every variant "
      "(1.0 = the paper's protocol; default: the config's, 3.0).",
  )
  flags.DEFINE_string(
      "only",
      None,
      "Subset of formulations (paper notation), comma-separated, e.g. "
      "'rf,rf/lognorm(0.00,1.00),eps/linear'. Default: configs/formulations.py STUDY.",
  )
  flags.DEFINE_integer("per_kind", 40, "ShapesEval prompts per scene kind (3 kinds: 120 prompts by default).")
  flags.DEFINE_list("sample_steps", [str(s) for s in SAMPLE_STEPS], "Euler step counts of the settings.")
  flags.DEFINE_list("weights", list(formulation_eval.WEIGHTS), "Weights evaluated: ema and/or raw.")
  flags.DEFINE_enum("model", "quickstart", MODELS, "quickstart = the study; debug = tiny model for smoke runs.")
  flags.DEFINE_integer("reference_n", REFERENCE_N, "Real images behind the FD reference statistics.")
  flags.DEFINE_string("out", str(DEFAULT_OUT), "Markdown report path.")
  return flags.FLAGS


def main(argv) -> int:
  del argv
  cli.quiet_orbax()
  f = flags.FLAGS
  with cli.clean_errors():
    sample_steps = []
    for s in f.sample_steps:
      if not s.strip().isdigit():
        raise ValueError(f"--sample_steps: {s!r} is not a positive integer")
      sample_steps.append(int(s))
    paths.check_writable_dir(f.study_dir, "--study_dir")  # Before the first of many trainings.
    run_study(
        f.study_dir,
        names=split_names(f.only) if f.only else None,
        num_steps=f.steps,
        shift=f.shift,
        model=f.model,
        per_kind=f.per_kind,
        sample_steps=sample_steps,
        weights=f.weights,
        reference_n=f.reference_n,
        out=f.out,
        command="python " + " ".join(sys.argv),
    )
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
