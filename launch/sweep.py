"""Plan, run and collect a sweep: one training run per entry of a config file's `sweep(add)`.

  python launch/sweep.py --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu --dry_run
  python launch/sweep.py --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu          # runs them here
  python launch/sweep.py --config=configs/scaling.py:d24 --sweep_dir=/shared/scaling --launcher=slurm \
      --emit_dir=jobs [--submit]                                                               # one job per run
  python launch/sweep.py collect --config=configs/scaling.py:cpu --sweep_dir=runs/scaling_cpu --out=scaling.csv

The plan: every `add(**overrides)` call of the config module's `sweep(add[, arg])` (arg = the text after the colon),
crossed with every --also=FIELD=v1,v2,... (learning rate, batch, steps, ...), with --set=FIELD=v applied to all. Run
names come from the overrides ("d4", "d4_learning_rate0.003"); each trains in SWEEP_DIR/<name> with
`python -m rflow_jax.main --config=<file>:<arg> --workdir=... --config.<field>=<value> ...`.

--branches=0.25,0.5 (with optim.decay="wsd") adds, per run of N steps, decay branches "<name>_T<n>" of n = f·N
steps: each starts from the main run's stable-phase checkpoint at wsd_decay_start(n), copied into its own workdir,
and decays to zero at n (the schedule agrees with the main run's until then: rflow_jax/train/optimizer.py). One
run then gives several annealed compute points.

Locally the runs train one after another (main runs before their branches), each in a subprocess with its log in
WORKDIR/sweep.log. A run whose newest checkpoint is at train.num_steps and whose metrics.jsonl has that step's
validation loss is finished and skipped; an interrupted one resumes from its checkpoint (the trainer does that).
With --launcher=slurm|tpu|gke, job files go to --emit_dir (launch/slurm.sbatch, launch/tpu_pod.sh,
launch/gke_jobset.yaml with the run's arguments); --submit runs them where sbatch / gcloud / kubectl exists and
otherwise prints the command. `collect` writes one CSV row per evaluation of every run: run, model size, step,
examples, FLOPs, validation loss per level (raw and EMA), ShapesEval when present.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import inspect
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` and `rflow_jax` importable when run as a script from any cwd.

# pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax import cli, config_lib
from rflow_jax.train import optimizer as optim_lib
from rflow_jax.utils import flops as flops_lib

# pylint: enable=g-import-not-at-top,wrong-import-position

LAUNCHERS = ("local", "slurm", "tpu", "gke")
_DERIVED = ("model.hidden_size", "model.num_heads")  # Follow model.depth on the ladder: not part of run names.
_SUBMIT_TOOLS = {"slurm": "sbatch", "tpu": "gcloud", "gke": "kubectl"}


@dataclasses.dataclass
class Run:
  """One training run of a sweep."""

  name: str
  overrides: dict
  workdir: str
  config: object
  command: list
  branch_of: str | None = None  # Main run a decay branch starts from.
  branch_step: int | None = None  # The main run's checkpoint it starts from.


def load_config_module(spec: str):
  """'configs/scaling.py:cpu' -> (module, arg or None)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec!r}: no file {path!r}")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, (arg or None)


def _parse_value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(text, text)


def parse_assignments(items, *, multi: bool) -> list[tuple[str, list]]:
  """['optim.learning_rate=1e-3,3e-3'] -> [('optim.learning_rate', [0.001, 0.003])] (one value unless multi)."""
  out = []
  for item in items or ():
    field, eq, values = item.partition("=")
    if not eq or not field or not values:
      raise ValueError(f"{item!r} is not FIELD=VALUE{'[,VALUE...]' if multi else ''}")
    parsed = [_parse_value(v.strip()) for v in (values.split(",") if multi else [values])]
    out.append((field.strip(), parsed))
  return out


def _set(config, field: str, value) -> None:
  section, _, leaf = field.rpartition(".")
  node = config
  for part in filter(None, section.split(".")):
    node = node[part]
  if leaf not in node:
    raise ValueError(f"unknown config field {field!r}")
  node[leaf] = (
      type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(node[leaf], bool) else value
  )


def run_name(overrides: dict) -> str:
  """'d4' for a ladder rung; other fields append '<leaf><value>'."""
  parts = []
  for field, value in overrides.items():
    if field in _DERIVED:
      continue
    parts.append(f"d{value}" if field == "model.depth" else f"{field.rpartition('.')[2]}{value}")
  return re.sub(r"[^A-Za-z0-9.\-]+", "_", "_".join(parts) or "base")


def _flag(field, value) -> str:
  return f"--config.{field}={value}"


def plan(config_spec: str, sweep_dir: str, *, also=(), sets=(), branches=()) -> list[Run]:
  """Every run of the sweep, validated (bad fields or values fail here, before anything trains)."""
  module, arg = load_config_module(config_spec)
  sweep_dir = os.path.abspath(sweep_dir)  # Subprocesses run from the repository root.
  if not hasattr(module, "sweep"):
    raise ValueError(f"--config={config_spec!r}: the config file defines no sweep(add)")
  entries = []
  takes_arg = len(inspect.signature(module.sweep).parameters) > 1
  module.sweep(lambda **kw: entries.append(kw), *([arg] if takes_arg and arg is not None else []))
  grid = parse_assignments(also, multi=True)
  fixed = parse_assignments(sets, multi=False)
  runs = []
  for entry in entries:
    for combo in itertools.product(*[[(f, v) for v in vs] for f, vs in grid]):
      overrides = {**entry, **dict(combo), **{f: vs[0] for f, vs in fixed}}
      # --set applies to every run: it does not tell runs apart, so it is not in their names.
      runs.append(_make_run(module, arg, config_spec, sweep_dir, overrides, name=run_name({**entry, **dict(combo)})))
  for fraction in branches:
    runs += [_branch(main, fraction, module, arg, config_spec, sweep_dir) for main in list(runs) if not main.branch_of]
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"two runs of the sweep share a name: {sorted(n for n in names if names.count(n) > 1)}")
  return runs


def _make_run(module, arg, config_spec, sweep_dir, overrides, name=None) -> Run:
  config = module.get_config(*([arg] if arg is not None else []))
  for field, value in overrides.items():
    _set(config, field, value)
  config_lib.validate(config)
  name = name or run_name(overrides)
  if "val_loss" in config.train.evaluators and not config.train.eval_at_end:
    # The in-loop evaluations skip the last step (the trainer's final evaluation covers it): without it a run
    # would never count as done and every re-run of the sweep would train it again.
    raise ValueError(
        f"run {name} evaluates val_loss but has train.eval_at_end=False: its final step would never be "
        "evaluated; set --set=train.eval_at_end=True"
    )
  workdir = os.path.join(sweep_dir, name)
  command = [sys.executable, "-m", "rflow_jax.main", f"--config={config_spec}", f"--workdir={workdir}"]
  command += [_flag(f, v) for f, v in overrides.items()]
  return Run(name, dict(overrides), workdir, config, command)


def _branch(main: Run, fraction: float, module, arg, config_spec, sweep_dir) -> Run:
  """The WSD decay branch of `main` ending at fraction · num_steps."""
  c = main.config
  if c.optim.decay != "wsd":
    raise ValueError(f"--branches needs optim.decay='wsd'; run {main.name} has {c.optim.decay!r}")
  steps = int(round(fraction * c.train.num_steps))
  seed = optim_lib.wsd_decay_start(steps, c.optim.decay_fraction)
  if not 0 < fraction < 1 or seed <= 0 or seed % c.train.checkpoint_every:
    raise ValueError(
        f"--branches={fraction}: the branch of {main.name} ({steps} steps) starts at step {seed}, which "
        f"is not a checkpoint of the main run (train.checkpoint_every={c.train.checkpoint_every})"
    )
  if c.train.keep_checkpoints * c.train.checkpoint_every < c.train.num_steps:
    raise ValueError(
        f"--branches: run {main.name} keeps only {c.train.keep_checkpoints} checkpoints; raise "
        f"train.keep_checkpoints to {math.ceil(c.train.num_steps / c.train.checkpoint_every)}"
    )
  run = _make_run(
      module, arg, config_spec, sweep_dir, {**main.overrides, "train.num_steps": steps}, name=f"{main.name}_T{steps}"
  )
  run.branch_of, run.branch_step = main.name, seed
  return run


def _metrics_by_step(workdir: str) -> dict[int, dict]:
  """WORKDIR/metrics.jsonl merged per step (for each key of a step the last line that has it counts)."""
  merged = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          merged.setdefault(int(row.pop("step")), {}).update(row)
  return merged


def _checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps (Orbax renames a step's directory to its number when it is complete)."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def status(run: Run) -> str:
  """'done', 'partial (step k)' or 'new'."""
  steps = _checkpoint_steps(run.workdir)
  want = run.config.train.num_steps
  evaluated = "val_loss" not in run.config.train.evaluators or "val_loss/mean" in _metrics_by_step(run.workdir).get(
      want, {}
  )
  if steps and steps[-1] >= want and evaluated:
    return "done"
  return f"partial (step {steps[-1]})" if steps else "new"


def seed_branch(main_workdir: str, step: int, workdir: str) -> None:
  """Copies the main run's checkpoint `step` into a branch's empty workdir (atomically: copy, then rename)."""
  if _checkpoint_steps(workdir):
    return  # Already seeded (or trained): the trainer resumes it.
  source = os.path.join(main_workdir, "checkpoints", str(step))
  if not os.path.isdir(source):
    raise FileNotFoundError(
        f"decay branch {workdir!r} starts from {source!r}, which does not exist: " "train the main run first"
    )
  target = os.path.join(workdir, "checkpoints", str(step))
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = target + ".copying"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp)
  os.replace(tmp, target)


def run_local(runs, *, parallel: int = 1, log=print) -> None:
  """Trains every unfinished run here: `parallel` at a time, largest model first; branches after their main runs."""
  pending = sorted(runs, key=lambda r: (r.branch_of is not None, -(flops_lib.train_flops_per_example(r.config) or 0)))
  active, failed = {}, []
  while pending or active:
    for run in [
        r
        for r in pending
        if not r.branch_of or r.branch_of not in active and r.branch_of not in {p.name for p in pending}
    ][: max(parallel - len(active), 0)]:
      pending.remove(run)
      state = status(run)
      if state == "done":
        log(f"{run.name}: done, skipped")
        continue
      if run.branch_of:
        seed_branch(os.path.join(os.path.dirname(run.workdir), run.branch_of), run.branch_step, run.workdir)
      log(f"{run.name}: {state} -> training in {run.workdir}")
      os.makedirs(run.workdir, exist_ok=True)
      with open(os.path.join(run.workdir, "sweep.log"), "a") as out:
        active[run.name] = (
            run,
            subprocess.Popen(
                run.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
            ),
        )
    if not active:
      break
    for name, (run, proc) in list(active.items()):
      if proc.poll() is not None:
        del active[name]
        if proc.returncode != 0 or status(run) != "done":
          failed.append(run.name)
          log(f"{run.name}: stopped (exit {proc.returncode}) before finishing; see {run.workdir}/sweep.log")
        else:
          log(f"{run.name}: done")
    time.sleep(1.0)
  if failed:
    raise RuntimeError(f"runs {failed} did not finish; re-running the sweep resumes them")


def emit(runs, launcher: str, emit_dir: str, *, submit: bool, log=print) -> list[str]:
  """Writes one job file per unfinished run for `launcher`; with submit, runs it (or prints it without the tool)."""
  os.makedirs(emit_dir, exist_ok=True)
  written = []
  for run in runs:
    if status(run) == "done":
      log(f"{run.name}: done, skipped")
      continue
    args = " ".join(shlex.quote(a) for a in run.command[3:])  # What follows `python -m rflow_jax.main`.
    seed = ""
    if run.branch_of:  # The branch's first checkpoint comes from its (finished) main run.
      seed = (
          f"python launch/sweep.py seed --from={os.path.join(os.path.dirname(run.workdir), run.branch_of)} "
          f"--step={run.branch_step} --to={run.workdir}\n"
      )
    if launcher == "gke":
      text = (ROOT / "launch" / "gke_jobset.yaml").read_text()
      text = text.replace("name: rflow-d24", f"name: rflow-{run.name.lower().replace('_', '-').replace('.', '-')}")
      text = re.sub(
          r"( +)- --config=configs/sd3.py:d24\n +- --workdir=/runs/d24\n",
          lambda m: "".join(f"{m.group(1)}- {a}\n" for a in run.command[3:]),
          text,
      )
      path = os.path.join(emit_dir, f"{run.name}.yaml")
      command = f"kubectl apply -f {path}"
      if seed:
        text = f"# Before applying: {seed}" + text
    else:
      job = {
          "slurm": f"sbatch --job-name=rf-{run.name} launch/slurm.sbatch {args}",
          "tpu": f"TPU_NAME=${{TPU_NAME:-rf-{run.name.lower()}}} launch/tpu_pod.sh {args}",
      }[launcher]
      text = (
          f"#!/usr/bin/env bash\n# Sweep run {run.name}.\nset -euo pipefail\ncd {shlex.quote(str(ROOT))}\n"
          f"{seed}{job}\n"
      )
      path = os.path.join(emit_dir, f"{run.name}.sh")
      command = f"bash {path}"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    written.append(path)
    if submit and shutil.which(_SUBMIT_TOOLS[launcher]):
      subprocess.check_call(command, shell=True)
    elif submit:
      log(f"{_SUBMIT_TOOLS[launcher]} not found; submit with: {command}")
    else:
      log(f"wrote {path}")
  return written


def collect(runs, out: str) -> list[dict]:
  """One row per evaluated step of every run (steps with a validation loss or ShapesEval score) -> CSV at `out`."""
  rows = []
  for run in runs:
    c = run.config
    params = flops_lib.param_count(c)
    base = {
        "run": run.name,
        "branch_of": run.branch_of or "",
        "depth": c.model.depth,
        "hidden_size": c.model.hidden_size,
        "params": params["trainable"] if params else "",
        "flops_per_example": flops_lib.train_flops_per_example(c) or "",
        "learning_rate": c.optim.learning_rate,
        "global_batch_size": c.train.global_batch_size,
        "num_steps": c.train.num_steps,
    }
    for step, metrics in sorted(_metrics_by_step(run.workdir).items()):
      scores = {k: v for k, v in metrics.items() if k.startswith(("val_loss/", "shapes/"))}
      if not scores:
        continue
      if run.branch_of and step <= run.branch_step:
        continue  # Evaluations before the branch point belong to the main run (and are not in this workdir).
      row = {**base, "step": step, **flops_lib.compute_axis(c, step), **scores}
      row["val_loss"] = scores.get("val_loss/mean", "")
      rows.append(row)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, out)
  return rows


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("action", nargs="?", default="run", choices=("run", "collect", "seed"))
  p.add_argument("--config", help="Config file with its sweep(add), e.g. configs/scaling.py:cpu.")
  p.add_argument("--sweep_dir", help="One workdir per run goes here.")
  p.add_argument("--dry_run", action="store_true", help="List every run (name, status, workdir, command); train none.")
  p.add_argument("--also", action="append", default=[], help="FIELD=v1,v2,...: cross the sweep with these values.")
  p.add_argument("--set", action="append", default=[], dest="sets", help="FIELD=VALUE for every run.")
  p.add_argument("--branches", default="", help="WSD decay branches as fractions of num_steps, e.g. 0.25,0.5.")
  p.add_argument("--parallel", type=int, default=1, help="Local runs trained at the same time.")
  p.add_argument("--launcher", default="local", choices=LAUNCHERS)
  p.add_argument("--emit_dir", help="Job files go here (--launcher other than local).")
  p.add_argument("--submit", action="store_true", help="Submit the emitted jobs (prints the command without the tool).")
  p.add_argument("--out", help="collect: the CSV path.")
  p.add_argument("--from", dest="from_dir", help="seed: the main run's workdir.")
  p.add_argument("--step", type=int, help="seed: its checkpoint step.")
  p.add_argument("--to", help="seed: the branch's workdir.")
  return p


def main(argv=None) -> int:
  a = _parser().parse_args(argv)
  with cli.clean_errors():
    if a.action == "seed":
      seed_branch(a.from_dir, a.step, a.to)
      return 0
    if not a.config or not a.sweep_dir:
      raise ValueError("--config and --sweep_dir are required")
    branches = [float(f) for f in a.branches.split(",") if f.strip()]
    runs = plan(a.config, a.sweep_dir, also=a.also, sets=a.sets, branches=branches)
    if a.action == "collect":
      if not a.out:
        raise ValueError("collect needs --out=FILE.csv")
      rows = collect(runs, a.out)
      print(f"wrote {len(rows)} rows from {len(runs)} runs to {a.out}")
    elif a.dry_run:
      for run in runs:
        print(f"{run.name}\t{status(run)}\t{run.workdir}\t{shlex.join(run.command)}")
    elif a.launcher == "local":
      run_local(runs, parallel=a.parallel)
    else:
      if not a.emit_dir:
        raise ValueError(f"--launcher={a.launcher} needs --emit_dir")
      emit(runs, a.launcher, a.emit_dir, submit=a.submit)
  return 0


if __name__ == "__main__":
  sys.exit(main())
