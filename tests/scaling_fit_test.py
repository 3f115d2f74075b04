"""The scaling-law fit recovers known parameters from noisy synthetic data; frontier; the CLI's JSON line and plots."""

import csv
import json

import numpy as np
import pytest

from rflow_jax.scaling import fit

TRUE = {"E": 0.30, "A": 40.0, "alpha": 0.12}


def _synthetic(n=24, noise=0.004, seed=0):
  rng = np.random.default_rng(seed)
  c = np.geomspace(1e12, 1e17, n)
  return c, (TRUE["E"] + TRUE["A"] * c ** -TRUE["alpha"]) * np.exp(rng.normal(0.0, noise, n))


def test_fit_recovers_known_parameters_from_noisy_data_with_an_interval_covering_them():
  c, l = _synthetic()
  got = fit.fit_power_law(c, l)
  assert got["alpha"] == pytest.approx(TRUE["alpha"], rel=0.1)
  assert got["E"] == pytest.approx(TRUE["E"], abs=0.05)
  assert got["r2"] > 0.99 and got["E"] < l.min()
  np.testing.assert_allclose(fit.predict(got, c), TRUE["E"] + TRUE["A"] * c ** -TRUE["alpha"], rtol=0.01)
  lo, hi = fit.bootstrap_alpha(c, l, samples=20)
  # The interval brackets the estimate, is narrow at 0.4% noise, and lies within 0.01 of the truth.
  assert lo <= got["alpha"] <= hi and hi - lo < 0.05
  assert lo - 0.01 < TRUE["alpha"] < hi + 0.01


def test_huber_fit_is_robust_to_an_outlier():
  c, l = _synthetic(noise=0.002)
  spoiled = l.copy()
  spoiled[5] *= 1.5  # One diverged evaluation.
  assert fit.fit_power_law(c, spoiled)["alpha"] == pytest.approx(TRUE["alpha"], rel=0.1)


def test_frontier_keeps_points_no_cheaper_point_beats():
  rows = [
      {"flops": 1.0, "val_loss": 3.0, "run": "a"},
      {"flops": 2.0, "val_loss": 2.0, "run": "a"},
      {"flops": 2.5, "val_loss": 2.5, "run": "b"},
      {"flops": 4.0, "val_loss": 1.5, "run": "b"},
  ]
  assert [r["flops"] for r in fit.frontier(rows)] == [1.0, 2.0, 4.0]


def test_cli_prints_json_last_and_writes_plots(tmp_path, capsys):
  c, l = _synthetic(n=12)
  path = tmp_path / "sweep.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "params", "flops", "val_loss", "shapes/overall"])
    for i, (ci, li) in enumerate(zip(c, l)):
      w.writerow([f"d{2 + i % 3}", 1e5 * (1 + i % 3), ci, li, 0.1 * (i % 3)])
  assert fit.main([f"--csv={path}", f"--plots={tmp_path}", "--bootstrap=10", "--fit_on=all"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"E", "A", "alpha", "r2", "alpha_ci", "frontier"} <= set(out)
  assert out["alpha"] == pytest.approx(TRUE["alpha"], rel=0.15)
  assert sorted(p.rsplit("/", 1)[1] for p in out["plots"]) == [
      "scaling_frontier_fit.png",
      "scaling_loss_vs_flops.png",
      "scaling_val_loss_vs_shapes_eval.png",
  ]
  assert all((tmp_path / p.rsplit("/", 1)[1]).read_bytes()[:4] == b"\x89PNG" for p in out["plots"])


def test_cli_names_missing_columns(tmp_path, capsys):
  path = tmp_path / "bad.csv"
  path.write_text("step,loss\n1,2\n")
  with pytest.raises(SystemExit) as e:
    fit.main([f"--csv={path}"])
  assert e.value.code == 2
  assert "needs the columns 'flops' and 'val_loss'" in capsys.readouterr().err
