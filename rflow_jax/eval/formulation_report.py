"""The formulation study's ranking and markdown report (launch/formulation_study.py trains and evaluates).

`rank_results` turns a results dict (what STUDY_DIR/results.json holds) into per-setting Pareto fronts and average
ranks; `render_markdown` writes the report: tables, the side-by-side with the paper's Table 1, the claims checked
against our numbers, wall times and the protocol. Both are pure functions of the results dict, so a report can be
re-rendered from results.json without re-running anything.
"""

from __future__ import annotations

import math
import re

import numpy as np

from rflow_jax.eval import ranking


def rank_results(results: dict) -> dict:
  """Per-setting fronts and average ranks (all settings and per step count) of a results dict."""
  table = {
      key: {n: (v["evals"][key]["overall"], v["evals"][key]["fid"]) for n, v in results["variants"].items()}
      for key in results["settings"]
  }
  subsets = {"all": list(table)}
  for steps in results["sample_steps"]:
    subsets[f"{steps} steps"] = [k for k in table if int(k.split("/")[1]) == steps]
  return {
      "per_setting": {k: ranking.rank_setting(points) for k, points in table.items()},
      "average": {label: ranking.average_ranks(table, keys) for label, keys in subsets.items()},
  }


_RF_TUNED = re.compile(r"rf/(lognorm|mode|cosmap)")  # rf with a non-uniform timestep sampler.


def _fmt(x: float, digits: int = 2) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _position(avg: dict[str, float], name: str) -> tuple[int, int]:
  """(1-based place of `name` in an average-rank map, ties sharing the better place; number of variants)."""
  return 1 + sum(v < avg[name] for v in avg.values()), len(avg)


def _paper_columns(results: dict) -> tuple[str | None, str | None]:
  """Our subset labels compared with the paper's '5 steps' and '50 steps' columns."""
  steps = results["sample_steps"]
  few = f"{min(steps)} steps" if min(steps) <= 10 else None
  many = f"{max(steps)} steps" if max(steps) >= 20 else None
  return few, many


def _claims(results: dict) -> list[str]:
  """The paper's Table 1 conclusions, each marked agrees / disagrees / not testable from our average ranks."""
  avg = results["ranks"]["average"]["all"]
  lines = []

  def claim(text, needed, verdict_fn):
    missing = [n for n in needed if n not in avg]
    if missing:
      lines.append(f"- **not testable** — {text} (not in this study: {', '.join(missing)})")
    else:
      ok, detail = verdict_fn()
      lines.append(f"- **{'agrees' if ok else 'disagrees'}** — {text}: {detail}")

  best = "rf/lognorm(0.00,1.00)"
  claim(
      f"`{best}` has the best average rank (paper 1.54, first of 16)",
      [best],
      lambda: (
          _position(avg, best)[0] == 1,
          "ours: place {} of {} (avg rank {})".format(*_position(avg, best), _fmt(avg[best])),
      ),
  )
  claim(
      f"`{best}` beats uniform `rf` (paper 1.54 vs 5.67)",
      [best, "rf"],
      lambda: (avg[best] < avg["rf"], f"ours: {_fmt(avg[best])} vs {_fmt(avg['rf'])}"),
  )

  def only_tuned_rf_beats_eps():
    better = [n for n in avg if avg[n] < avg["eps/linear"]]
    ok = bool(better) and all(_RF_TUNED.fullmatch(n.split("(")[0]) for n in better)
    return ok, f"ours: ahead of eps/linear ({_fmt(avg['eps/linear'])}): " + (
        ", ".join(f"`{n}`" for n in better) or "none"
    )

  claim(
      "rf with a modified timestep sampler (lognorm/mode/cosmap), and nothing else, beats `eps/linear`",
      ["eps/linear"],
      only_tuned_rf_beats_eps,
  )
  worst = "edm(-1.20,1.20)"
  claim(
      f"`{worst}` (Karras' defaults) ranks last (paper 15.58, last of 16)",
      [worst],
      lambda: (avg[worst] == max(avg.values()), "ours: place {} of {}".format(*_position(avg, worst))),
  )
  few, many = _paper_columns(results)
  if few and many:
    lines.append(_degradation_claim(results, few, many))
  return lines


def _degradation_claim(results: dict, few: str, many: str) -> str:
  """'rf variants degrade least with fewer steps': mean rank change (few − many steps), rf family vs the rest."""
  avg = results["ranks"]["average"]
  rf = [n for n in avg["all"] if n == "rf" or n.startswith("rf/")]
  rest = [n for n in avg["all"] if n not in rf]
  text = f"rf formulations lose least rank when going from {many} to {few} (paper: RF degrades least at 5 steps)"
  if not rf or not rest:
    return f"- **not testable** — {text} (needs rf and non-rf variants)"
  delta = lambda group: float(np.mean([avg[few][n] - avg[many][n] for n in group]))
  ok = delta(rf) < delta(rest)
  return (
      f"- **{'agrees' if ok else 'disagrees'}** — {text}: mean rank change rf {delta(rf):+.2f}, "
      f"others {delta(rest):+.2f}"
  )


def _settings_table(results: dict) -> list[str]:
  keys = results["settings"]
  per_setting = results["ranks"]["per_setting"]
  lines = ["| variant | " + " | ".join(f"{k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
  for name, v in results["variants"].items():
    cells = [f"{v['evals'][k]['overall']:.3f} / {v['evals'][k]['fid']:.4g} ({per_setting[k][name]})" for k in keys]
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  real = results["real"]
  lines.append("| *real images* | " + " | ".join(f"{real['overall']:.3f} / {real['fid']:.4g}" for _ in keys) + " |")
  return lines


def _average_table(results: dict) -> list[str]:
  avg = results["ranks"]["average"]
  labels = list(avg)
  lines = [
      "| variant | " + " | ".join(f"ours: {l}" for l in labels) + " | paper: all | paper: 5 steps | "
      "paper: 50 steps |",
      "|---|" + "---|" * (len(labels) + 3),
  ]
  for name in avg["all"]:
    paper = ranking.PAPER_AVERAGE_RANKS.get(name, {})
    lines.append(
        f"| `{name}` | "
        + " | ".join(_fmt(avg[l][name]) for l in labels)
        + " | "
        + " | ".join(_fmt(paper.get(c)) for c in ("all", "5 steps", "50 steps"))
        + " |"
    )
  return lines


def _order_table(results: dict) -> list[str]:
  """Our order next to the paper's Table 1 order (restricted to the variants of this study)."""
  ours = list(results["ranks"]["average"]["all"])
  paper = [n for n in ranking.PAPER_AVERAGE_RANKS if n in ours]
  lines = ["| place | ours (avg rank, all) | paper Table 1 (avg rank, all) |", "|---|---|---|"]
  for i in range(len(ours)):
    ours_cell = f"`{ours[i]}` ({_fmt(results['ranks']['average']['all'][ours[i]])})"
    paper_cell = f"`{paper[i]}` ({_fmt(ranking.PAPER_AVERAGE_RANKS[paper[i]]['all'])})" if i < len(paper) else ""
    lines.append(f"| {i + 1} | {ours_cell} | {paper_cell} |")
  return lines


def _correlations(results: dict) -> list[str]:
  avg = results["ranks"]["average"]
  paper = ranking.PAPER_AVERAGE_RANKS
  few, many = _paper_columns(results)
  pairs = [("all", "all")] + ([(few, "5 steps")] if few else []) + ([(many, "50 steps")] if many else [])
  lines = []
  for ours, theirs in pairs:
    rho, n = ranking.spearman(avg[ours], {k: v[theirs] for k, v in paper.items()})
    lines.append(f"- ours **{ours}** vs paper **{theirs}**: Spearman ρ = {_fmt(rho)} over {n} shared variants")
  return lines


def _train_table(results: dict) -> list[str]:
  lines = [
      "| variant | train steps | train wall s | final loss | sample wall s per setting (compile s) |",
      "|---|---|---|---|---|",
  ]
  for name, v in results["variants"].items():
    t = v["train"]
    samples = ", ".join(f"{k}: {e['sample_s']:.1f} ({e['compile_s']:.1f})" for k, e in v["evals"].items())
    loss = "diverged" if t.get("diverged") else _fmt(t.get("final_loss"), 4)
    lines.append(f"| `{name}` | {t.get('steps')} | {_fmt(t.get('train_s'), 0)} | {loss} | {samples} |")
  return lines


def render_markdown(results: dict, command: str | None = None) -> str:
  """The report: settings table, average ranks, side-by-side with Table 1, agreement, wall times."""
  # results.json files written before the shifts were recorded lack them; they still render ("n/a").
  tr, n_prompts = results["train"], 3 * results["per_kind"]
  out = [
      "# Formulation study (SD3 §5.1, Table 1) in miniature — results",
      "",
      f"Generated {results['generated']} by `launch/formulation_study.py`"
      + (f" (`{command}`)" if command else "")
      + "; the protocol is at the end of this page.",
      "",
      f"Training (equal for all): {tr['num_steps']} steps × batch {tr['global_batch_size']}, MM-DiT "
      f"{tr['model']}, timestep shift α = {tr.get('train_shift', 'n/a')}. Sampling: Euler, CFG {tr['cfg_scale']}, "
      f"shift α = {tr.get('sample_shift', 'n/a')}, {n_prompts} fresh ShapesEval prompts per setting; "
      f"FD on random-conv features (seed {results['feature_seed']}) against {results['reference']['ref_n']} real "
      "images.",
      "",
      "## Per setting: ShapesEval overall ↑ / FD ↓ (Pareto front)",
      "",
      *_settings_table(results),
      "",
      "The *real images* row scores the real scenes of the same prompts: ShapesEval's ceiling and the FD floor at "
      "this sample size.",
      "",
      "## Average rank (non-dominated sorting per setting, lower = better)",
      "",
      *_average_table(results),
      "",
      "## Side by side with the paper's Table 1 order",
      "",
      *_order_table(results),
      "",
      "## Agrees / disagrees (generated from the numbers above)",
      "",
      *_correlations(results),
      "",
      *_claims(results),
      "",
      "## Wall times",
      "",
      *_train_table(results),
      "",
      PROTOCOL,
  ]
  return "\n".join(out) + "\n"


PROTOCOL = """## Protocol

- **Variants**: `configs/formulations.py` (`STUDY`), each trained from the same seed with the same model, batch,
  steps, optimiser and data order; only `flow.formulation` differs (equal training compute, as in the paper).
- **Settings**: Euler sampling at each step count × {EMA, raw} weights, guidance scale from the config. The paper
  used 6 sampler settings (guidance scales × 5/25/50 steps) × EMA/non-EMA × 2 datasets = 24 settings.
- **Metrics**: ShapesEval overall accuracy (rflow_jax/eval/shapes_eval.py) replaces the CLIP score; FD on the
  features of a fixed random-weight conv net (rflow_jax/eval/fid.py) replaces FID on CLIP features. Both on the
  same fresh prompts (`shapes.eval_prompts`, seed `sample.eval_seed`); the FD reference is real images of another
  seed.
- **Ranking**: per setting, non-dominated sorting of (ShapesEval ↑, FD ↓); rank = Pareto front index (1 = best,
  ties share a front); a variant's score is its mean rank over all settings and over each step count.
- **Comparison**: Spearman correlation of our average ranks with the paper's Table 1 over the shared variants; our
  longest step count stands in for the paper's 50 steps. The paper's ranks are among 16 variants (ours: fewer), so
  compare orders, not values.
- **Not like the paper**: pixel-space 32×32 shapes instead of ImageNet/CC12M latents; tiny model and batch; the
  config's timestep shift acts on every variant's training times (in rf-equivalent σ) and sampling grid, so e.g.
  `rf/lognorm(0.00,1.00)` at α = 3 trains on the times of lognorm(log 3 ≈ 1.10, 1.00); the last
  checkpoint is evaluated (the paper picks the step of minimal EMA validation loss); one guidance scale; FD from 120
  samples is strongly biased (only differences between variants mean something).
"""
