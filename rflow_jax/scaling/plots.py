"""The scaling study's PNGs: loss curves per model size against FLOPs, the frontier with its fit, loss vs ShapesEval."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # Files only, no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPES_COLUMN = "shapes/overall"  # The "shapes" evaluator's score as the trainer logs it: "<evaluator>/<score>".


def _save(fig, path: str) -> str:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)
  return path


def _by_run(rows, loss_column):
  runs = {}
  for r in rows:
    if isinstance(r.get(loss_column), float):
      runs.setdefault(str(r.get("run", "")), []).append(r)
  key = lambda item: (item[1][0].get("params", 0) if isinstance(item[1][0].get("params"), float) else 0, item[0])
  return sorted(((name, sorted(rs, key=lambda r: r["flops"])) for name, rs in runs.items()), key=key)


def _label(name, rs):
  params = rs[0].get("params")
  return f"{name} ({params / 1e6:.2f}M)" if isinstance(params, float) else name


def loss_curves(rows, path: str, loss_column: str = "val_loss") -> str:
  """Validation loss against training FLOPs, one line per run (model size)."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name, rs in _by_run(rows, loss_column):
    ax.plot([r["flops"] for r in rs], [r[loss_column] for r in rs], "o-", ms=3, label=_label(name, rs))
  ax.set(
      xscale="log", yscale="log", xlabel="training FLOPs", ylabel=loss_column, title="Validation loss per model size"
  )
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def frontier_fit(rows, front, fit: dict, predict, path: str, loss_column: str = "val_loss") -> str:
  """All points (grey), the compute-optimal frontier (black) and the fitted curve predict(fit, flops)."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ax.plot([r["flops"] for r in rows], [r[loss_column] for r in rows], ".", color="0.7", label="all evaluations")
  ax.plot([r["flops"] for r in front], [r[loss_column] for r in front], "ko", ms=4, label="frontier")
  c = np.geomspace(min(r["flops"] for r in rows), max(r["flops"] for r in rows), 200)
  lo, hi = fit.get("alpha_ci", [fit["alpha"]] * 2)
  ax.plot(
      c,
      predict(fit, c),
      "r-",
      label=f"{fit['E']:.3g} + {fit['A']:.3g}·C^-{fit['alpha']:.3f} (α 95% CI {lo:.3f}–{hi:.3f})",
  )
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=loss_column, title="Compute-optimal frontier")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def loss_vs_shapes(rows, path: str, loss_column: str = "val_loss") -> str | None:
  """Validation loss against ShapesEval at the same step, one colour per run; None without ShapesEval scores."""
  pairs = [r for r in rows if isinstance(r.get(SHAPES_COLUMN), float) and isinstance(r.get(loss_column), float)]
  if not pairs:
    return None
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name, rs in _by_run(pairs, loss_column):
    ax.plot([r[loss_column] for r in rs], [r[SHAPES_COLUMN] for r in rs], "o", label=_label(name, rs))
  ax.set(xlabel=loss_column, ylabel=SHAPES_COLUMN, title="Validation loss vs ShapesEval")
  ax.invert_xaxis()  # Lower loss to the right: "better" points up and right.
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def write_all(
    rows, front, fit, predict, out_dir: str, *, loss_column: str = "val_loss", prefix: str = "scaling"
) -> list[str]:
  """Writes the three PNGs into out_dir (the third only with ShapesEval scores); returns their paths. `predict`:
  fit.predict, passed in (the fit module imports this one for its CLI)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [
      loss_curves(rows, os.path.join(out_dir, f"{prefix}_loss_vs_flops.png"), loss_column),
      frontier_fit(rows, front, fit, predict, os.path.join(out_dir, f"{prefix}_frontier_fit.png"), loss_column),
      loss_vs_shapes(rows, os.path.join(out_dir, f"{prefix}_val_loss_vs_shapes_eval.png"), loss_column),
  ]
  return [p for p in paths if p]
