"""Fits the saturating power law L(C) = E + A·C^(−alpha) of validation loss against training compute.

  python -m rflow_jax.scaling.fit --csv=scaling.csv [--plots=docs/results] [--fit_on=frontier|all]

The CSV (launch/sweep.py collect writes one) needs the columns `flops` and `val_loss` (or --loss_column), and
`run` for the frontier and the plots. The fit:

  * in log space: residuals r = log(E + A·C^(−alpha)) − log L, so a 1% miss weighs the same at every loss;
  * Huber loss on r (δ = 1e-3 by default: quadratic below a 0.1% miss, linear above), so a stray point (a
    loss spike, a diverged run) pulls the fit linearly, not quadratically;
  * L-BFGS-B from a grid of starting points (E, alpha), the best optimum kept; E in [0, min observed L) (the
    irreducible loss cannot exceed a loss that was reached), alpha in [0, 3]; C is divided by its geometric mean
    inside the fit so that A stays of order one;
  * a bootstrap over the points (resampled with replacement, refitted) gives the 95% interval of alpha.

`--fit_on=frontier` (default) fits the compute-optimal frontier: the points no other point beats at equal or lower
compute (the lower envelope over model sizes and steps, as the paper's Fig. 8 reads it); `all` fits every point.
Reported r2 is the R² of log L on the fitted points. The last line printed is one JSON object (E, A, alpha, r2,
alpha_ci, the frontier and the plots written).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3


def huber(r: np.ndarray, delta: float) -> np.ndarray:
  """Huber loss of residuals r: r²/2 within ±delta, delta·(|r| − delta/2) beyond."""
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta, log_c, log_l, delta):
  """Σ huber(log(E + e^a·c^(−alpha)) − log L) and its gradient in (E, a, alpha)."""
  e, log_a, alpha = theta
  power = np.exp(log_a - alpha * log_c)  # |log_a|, alpha·|log_c| stay far from overflow (bounds).
  total = e + power
  r = np.log(total) - log_l
  dr = np.clip(r, -delta, delta) / total  # huber'(r) · ∂r/∂total
  grad = np.array([np.sum(dr), np.sum(dr * power), -np.sum(dr * power * log_c)])
  return float(np.sum(huber(r, delta))), grad


def fit_power_law(flops, loss, *, delta: float = HUBER_DELTA, starts=None) -> dict[str, float]:
  """Fits L = E + A·C^(−alpha) to (flops, loss) points; see the module docstring.

  Args:
    flops: (n,) training FLOPs C of each point (> 0).
    loss: (n,) validation losses L (> 0).
    delta: Huber δ on log-space residuals.
    starts: [(E, alpha)] starting points; default the grid E ∈ {0, 0.5, 0.9}·min L × alpha ∈ {0.1, 0.5, 1.5}.

  Returns:
    {"E", "A", "alpha", "r2", "n"} with A in the units of `flops` (L = E + A·C^(−alpha) for C in FLOPs).
  """
  c, l = np.asarray(flops, np.float64), np.asarray(loss, np.float64)
  if c.shape != l.shape or c.ndim != 1 or len(c) < 3:
    raise ValueError(f"need at least 3 (flops, loss) points of equal count; got {c.shape} and {l.shape}")
  if np.any(c <= 0) or np.any(l <= 0) or not np.all(np.isfinite(c) & np.isfinite(l)):
    raise ValueError("flops and losses must be finite and positive")
  scale = math.exp(float(np.mean(np.log(c))))
  log_c, log_l = np.log(c / scale), np.log(l)
  e_max = float(l.min()) * (1 - 1e-9)
  if starts is None:
    starts = [(f * e_max, a) for f in (0.0, 0.5, 0.9) for a in (0.1, 0.5, 1.5)]
  best = None
  for e0, alpha0 in starts:
    e0 = min(max(e0, 0.0), e_max)
    log_a0 = float(np.mean(np.log(np.maximum(l - e0, 1e-12)) + alpha0 * log_c))
    res = optimize.minimize(
        _objective,
        x0=[e0, log_a0, alpha0],
        args=(log_c, log_l, delta),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, e_max), (-50.0, 50.0), (0.0, 3.0)],
    )
    if best is None or res.fun < best.fun:
      best = res
  e, log_a, alpha = (float(v) for v in best.x)
  pred = np.log(e + np.exp(log_a - alpha * log_c))
  r2 = 1.0 - float(np.sum((log_l - pred) ** 2) / max(np.sum((log_l - log_l.mean()) ** 2), 1e-300))
  return {"E": e, "A": math.exp(log_a) * scale**alpha, "alpha": alpha, "r2": r2, "n": int(len(c))}


def predict(fit: dict, flops) -> np.ndarray:
  """L(C) of a fit_power_law result."""
  return fit["E"] + fit["A"] * np.asarray(flops, np.float64) ** (-fit["alpha"])


def bootstrap_alpha(flops, loss, *, samples: int = 200, seed: int = 0, delta: float = HUBER_DELTA) -> list[float]:
  """95% bootstrap interval [2.5%, 97.5%] of alpha: points resampled with replacement and refitted (each refit
  starts from the full fit's optimum and from E = 0, a tenth of the full grid)."""
  c, l = np.asarray(flops, np.float64), np.asarray(loss, np.float64)
  full = fit_power_law(c, l, delta=delta)
  starts = [(full["E"], full["alpha"]), (0.0, full["alpha"])]
  rng = np.random.default_rng(seed)
  alphas = []
  for _ in range(samples):
    idx = rng.integers(0, len(c), len(c))
    if len(np.unique(c[idx])) < 3:
      continue  # Too few distinct compute values to fit three parameters.
    alphas.append(fit_power_law(c[idx], l[idx], delta=delta, starts=starts)["alpha"])
  return [float(np.percentile(alphas, 2.5)), float(np.percentile(alphas, 97.5))]


def frontier(rows: list[dict], loss_column: str = "val_loss") -> list[dict]:
  """The compute-optimal frontier: rows (sorted by flops) whose loss is below every row at lower or equal compute."""
  ordered = sorted(rows, key=lambda r: (r["flops"], r[loss_column]))
  out, best = [], math.inf
  for row in ordered:
    if row[loss_column] < best:
      out.append(row)
      best = row[loss_column]
  return out


def read_rows(path: str, loss_column: str) -> list[dict]:
  """CSV rows with numeric flops and loss (rows lacking either are dropped); numbers parsed where they parse."""
  try:
    with open(path, newline="") as f:
      raw = list(csv.DictReader(f))
  except FileNotFoundError:
    raise FileNotFoundError(f"--csv={path!r} does not exist") from None
  if not raw or "flops" not in raw[0] or loss_column not in raw[0]:
    have = list(raw[0]) if raw else []
    raise ValueError(f"--csv={path!r} needs the columns 'flops' and {loss_column!r}; it has {have}")
  rows = []
  for r in raw:
    parsed = {}
    for k, v in r.items():
      try:
        parsed[k] = float(v)
      except (TypeError, ValueError):
        parsed[k] = v
    if isinstance(parsed["flops"], float) and isinstance(parsed[loss_column], float):
      rows.append(parsed)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Fit L = E + A·C^(−alpha) to a sweep's validation losses.")
  p.add_argument("--csv", required=True, help="launch/sweep.py collect output (columns flops, val_loss, run).")
  p.add_argument("--loss_column", default="val_loss", help="Loss column (e.g. val_loss/ema/mean).")
  p.add_argument("--fit_on", default="frontier", choices=("frontier", "all"), help="Which points to fit.")
  p.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples for alpha_ci.")
  p.add_argument("--delta", type=float, default=HUBER_DELTA, help="Huber δ on log-space residuals.")
  p.add_argument("--plots", default="", help="Directory for the PNGs (none when empty).")
  p.add_argument("--prefix", default="scaling", help="File-name prefix of the PNGs.")
  a = p.parse_args(argv)
  from rflow_jax import cli  # pylint: disable=g-import-not-at-top

  with cli.clean_errors():
    rows = read_rows(a.csv, a.loss_column)
    front = frontier(rows, a.loss_column)
    points = front if a.fit_on == "frontier" else rows
    flops = [r["flops"] for r in points]
    loss = [r[a.loss_column] for r in points]
    fit = fit_power_law(flops, loss, delta=a.delta)
    fit["alpha_ci"] = bootstrap_alpha(flops, loss, samples=a.bootstrap, delta=a.delta)
    written = []
    if a.plots:
      from rflow_jax.scaling import plots  # pylint: disable=g-import-not-at-top  (matplotlib only for plots)

      written = plots.write_all(rows, front, fit, predict, a.plots, loss_column=a.loss_column, prefix=a.prefix)
    print(
        f"L(C) = {fit['E']:.4g} + {fit['A']:.4g}·C^(-{fit['alpha']:.4f}) on {fit['n']} {a.fit_on} points; "
        f"alpha 95% CI [{fit['alpha_ci'][0]:.4f}, {fit['alpha_ci'][1]:.4f}], R² {fit['r2']:.4f}"
    )
    for r in front:
      print(
          f"  frontier: C={r['flops']:.3e}  L={r[a.loss_column]:.5f}  run={r.get('run', '')}  "
          f"step={r.get('step', '')}"
      )
    summary = {
        **fit,
        "fit_on": a.fit_on,
        "loss_column": a.loss_column,
        "plots": written,
        "frontier": [
            {
                "flops": r["flops"],
                "loss": r[a.loss_column],
                "run": r.get("run", ""),
                "params": r.get("params", ""),
                "step": r.get("step", ""),
            }
            for r in front
        ],
    }
    print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
