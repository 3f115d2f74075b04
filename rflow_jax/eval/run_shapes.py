"""ShapesEval of a trained run on fresh prompts (the CLI; the library function is eval/evaluators.py).

  python -m rflow_jax.eval.run_shapes --workdir=runs/quickstart [--per_kind=40] [--steps=25] [--cfg=3.0] \
      [--solver=euler_stochastic] [--seed=7] [--raw]

prints one JSON line with the per-kind and overall scores and writes to WORKDIR/eval_step{STEP}/: grid.png, prompts.txt,
scores.json and failures.json (why the failed images failed: shapes_eval.failure_breakdown). That is the directory
the trainer's periodic evals use, so with the run's own settings the two agree; each flag set to another value adds
a suffix (e.g. eval_step20000_cfg5_steps50/, _euler_stochastic), so a probe never overwrites the run's own evaluation.
"""

import json
import os

from absl import app, flags

from rflow_jax import cli
from rflow_jax import paths
from rflow_jax import rundir
from rflow_jax.eval import evaluators

flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints.", required=True)
flags.DEFINE_integer("per_kind", None, "Fresh prompts per scene kind (default: the run's sample.eval_per_kind).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's sample.num_steps).")
flags.DEFINE_float("cfg", None, "Guidance scale (default: the run's sample.cfg_scale).")
flags.DEFINE_string("solver", None, "Sampler (default: the run's sample.solver).")
flags.DEFINE_integer("seed", None, "Prompt/noise seed (default: the run's sample.eval_seed).")
flags.DEFINE_bool("raw", False, "Use the raw (non-EMA) parameters.")
FLAGS = flags.FLAGS


def out_dir_name(step: int, config, *, per_kind: int, steps: int, cfg: float, seed: int, raw: bool, solver: str) -> str:
  """eval_step{step}, plus one suffix per setting that differs from the run's config (what its evals used)."""
  s = config.sample
  suffixes = [
      f"_{name}{value:g}"
      for name, value, default in (
          ("cfg", cfg, s.cfg_scale),
          ("steps", steps, s.num_steps),
          ("seed", seed, s.eval_seed),
          ("per_kind", per_kind, s.eval_per_kind),
      )
      if value != default
  ]
  if solver != s.solver:
    suffixes.append(f"_{solver}")
  if raw == s.use_ema:  # Evaluated with the other parameter set than the run's.
    suffixes.append("_raw" if raw else "_ema")
  return f"eval_step{step}" + "".join(suffixes)


def main(argv):
  del argv
  f = FLAGS
  cli.quiet_orbax()
  with cli.clean_errors():
    if f.per_kind is not None and f.per_kind < 1:  # Before any restore or compile.
      raise ValueError(f"--per_kind={f.per_kind} must be >= 1")
    paths.check_writable_dir(f.workdir, "--workdir")  # The scores go to WORKDIR/eval_step*/: fail before sampling.
    run_config = rundir.load_config(f.workdir)  # As trained: load_sampler's config carries the overrides.
    sampler, params, text_params, config, step = rundir.load_sampler(
        f.workdir, steps=f.steps, cfg=f.cfg, solver=f.solver, use_ema=not f.raw
    )
    seed = config.sample.eval_seed if f.seed is None else f.seed
    per_kind = config.sample.eval_per_kind if f.per_kind is None else f.per_kind
    name = out_dir_name(
        step,
        run_config,
        per_kind=per_kind,
        steps=config.sample.num_steps,
        cfg=config.sample.cfg_scale,
        seed=seed,
        raw=f.raw,
        solver=config.sample.solver,
    )
    scores = evaluators.shapes_scores(
        sampler, params, text_params, per_kind=per_kind, seed=seed, out_dir=os.path.join(f.workdir, name)
    )
    print(json.dumps({"step": step, **scores}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
