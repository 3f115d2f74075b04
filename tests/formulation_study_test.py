"""The formulation study: its config family, the report generated from numbers, and a debug-sized smoke run."""

import json
import os

import jax
import ml_collections
import pytest

from configs import formulations as formulations_config
from launch import formulation_study as study
from rflow_jax import config_lib
from rflow_jax.eval import formulation_eval
from rflow_jax.eval import formulation_report as report
from rflow_jax.flow import formulations

REQUIRED = (
    "rf",
    "rf/lognorm(0.00,1.00)",
    "rf/lognorm(0.50,0.60)",
    "rf/lognorm(1.00,0.60)",
    "rf/mode(1.29)",
    "rf/mode(1.75)",
    "rf/cosmap",
    "eps/linear",
    "v/linear",
    "v/cos",
    "edm(0.00,0.60)",
    "edm(-1.20,1.20)",
)


def _sweep_configs():
  overrides = []
  formulations_config.sweep(lambda **kw: overrides.append(kw))
  configs = []
  for o in overrides:
    c = formulations_config.get_config()
    for key, value in o.items():
      section, leaf = key.split(".")
      c[section][leaf] = value
    configs.append(c)
  return overrides, configs


def test_sweep_covers_the_required_formulations_with_equal_compute():
  overrides, configs = _sweep_configs()
  assert all(set(o) == {"flow.formulation"} for o in overrides)
  names = [formulations.get(o["flow.formulation"]).name for o in overrides]
  assert set(REQUIRED) <= set(names) and len(set(names)) == len(names)
  reference = formulations_config.get_config().to_dict()
  for c in configs:
    config_lib.validate(c)
    d = c.to_dict()
    d["flow"]["formulation"] = reference["flow"]["formulation"]
    assert d == reference, f"{c.flow.formulation} differs from the others in more than the formulation"
  assert reference["train"]["eval_at_end"] is False


def test_get_config_takes_the_paper_name_and_starts_from_quickstart():
  from configs import quickstart  # pylint: disable=g-import-not-at-top

  assert formulations_config.get_config().flow.formulation == "rf/lognorm(0.00,1.00)"
  c = formulations_config.get_config("edm(-1.20,1.20)")
  assert c.flow.formulation == "edm(-1.20,1.20)"
  q = quickstart.get_config()
  assert (c.model.to_dict(), c.train.num_steps, c.train.global_batch_size) == (
      q.model.to_dict(),
      q.train.num_steps,
      q.train.global_batch_size,
  )
  bad = formulations_config.get_config("rf/mode(3.00)")
  with pytest.raises(config_lib.ConfigError, match=r"flow.formulation.*mode"):
    config_lib.validate(bad)


def test_names_split_and_map_to_distinct_directories():
  assert study.split_names("rf, rf/lognorm(0.00,1.00),edm(-1.20,1.20)") == [
      "rf",
      "rf/lognorm(0.00,1.00)",
      "edm(-1.20,1.20)",
  ]
  with pytest.raises(ValueError, match="unbalanced"):
    study.split_names("rf/lognorm(0.00,1.00")
  safe = [study.safe_name(n) for n in formulations_config.STUDY + formulations.PAPER_TABLE1]
  assert len(set(safe)) == len(set(formulations_config.STUDY + formulations.PAPER_TABLE1))
  assert study.safe_name("edm(-1.20,1.20)") == "edm_-1.20_1.20"
  assert all("/" not in s and "(" not in s for s in safe)


def test_settings_grid_and_its_errors():
  assert [s.key for s in formulation_eval.settings_of((5, 25), ("ema", "raw"))] == [
      "ema/5",
      "raw/5",
      "ema/25",
      "raw/25",
  ]
  with pytest.raises(ValueError, match=r"weights \['best'\]"):
    formulation_eval.settings_of((5,), ("best",))
  with pytest.raises(ValueError, match=r"sample steps \[0\]"):
    formulation_eval.settings_of((0,), ("ema",))


def _fake_results(order_by_steps):
  """A results dict whose every setting ranks variants strictly in the given order (each dominates the next)."""
  names = order_by_steps[5]
  settings = [s.key for s in formulation_eval.settings_of(sorted(order_by_steps), ("ema", "raw"))]
  variants = {
      n: {"workdir": "/x", "train": {"train_s": 1.0, "steps": 7, "final_loss": 0.5}, "evals": {}} for n in names
  }
  for key in settings:
    order = order_by_steps[int(key.split("/")[1])]
    for place, name in enumerate(order):
      variants[name]["evals"][key] = {
          "overall": 0.9 - 0.2 * place,
          "fid": 1.0 + place,
          "sample_s": 0.1,
          "compile_s": 2.0,
      }
  results = {
      "generated": "now",
      "settings": settings,
      "sample_steps": sorted(order_by_steps),
      "per_kind": 40,
      "reference": {"ref_n": 1200},
      "feature_seed": 1,
      "train": {"num_steps": 7, "global_batch_size": 64, "model": {}, "cfg_scale": 3.0},
      "real": {"overall": 1.0, "fid": 0.01},
      "variants": variants,
  }
  results["ranks"] = report.rank_results(results)
  return results


def test_report_ranks_and_judges_the_paper_claims_from_the_numbers():
  lognorm, edm = "rf/lognorm(0.00,1.00)", "edm(-1.20,1.20)"
  results = _fake_results({5: [lognorm, "rf", "eps/linear", edm], 25: [lognorm, "eps/linear", "rf", edm]})
  avg = results["ranks"]["average"]
  assert avg["all"] == {lognorm: 1.0, "rf": 2.5, "eps/linear": 2.5, edm: 4.0}
  assert avg["5 steps"]["rf"] == 2.0 and avg["25 steps"]["rf"] == 3.0
  md = report.render_markdown(results, command="python launch/formulation_study.py --study_dir=x")
  for name in (lognorm, "rf", "eps/linear", edm):
    assert f"| `{name}` |" in md
  assert "| `rf/lognorm(0.00,1.00)` | 0.900 / 1 (1) | 0.900 / 1 (1) | 0.900 / 1 (1) | 0.900 / 1 (1) |" in md
  # ours 5 steps (1,2,3,4) vs the paper's 5-step ranks (lognorm 1.25 < eps 4.25 < rf 6.5 < edm 20.25): ρ = 0.8.
  assert "ours **5 steps** vs paper **5 steps**: Spearman ρ = 0.80 over 4 shared variants" in md
  assert "ours **25 steps** vs paper **50 steps**: Spearman ρ = 1.00 over 4 shared variants" in md
  assert f"**agrees** — `{lognorm}` has the best average rank" in md
  assert "**agrees** — rf with a modified timestep sampler" in md
  assert f"**agrees** — `{edm}` (Karras' defaults) ranks last" in md
  assert "**agrees** — rf formulations lose least rank" in md  # rf: −0.5, others: +0.5.

  reversed_results = _fake_results({5: [edm, "eps/linear", "rf", lognorm], 25: [edm, "eps/linear", "rf", lognorm]})
  md = report.render_markdown(reversed_results)
  assert f"**disagrees** — `{lognorm}` has the best average rank" in md
  assert "**disagrees** — rf with a modified timestep sampler" in md
  assert "not testable" not in md


@pytest.mark.slow
def test_smoke_study_trains_evaluates_ranks_and_resumes(tmp_path, monkeypatch):
  from rflow_jax.train import tasks  # pylint: disable=g-import-not-at-top

  # The study evaluates with its own sampling; each run's end-of-run preview would only add a sampler compile.
  monkeypatch.setattr(tasks.FlowTask, "preview", lambda *args: None)
  names = ["rf/lognorm(0.00,1.00)", "eps/linear"]
  study_dir, out = str(tmp_path / "study"), str(tmp_path / "formulations.md")
  kwargs = dict(
      names=names, model="debug", num_steps=2, per_kind=2, sample_steps=(2,), weights=("ema",), reference_n=20, out=out
  )
  results = study.run_study(study_dir, **kwargs)

  ranks = results["ranks"]["per_setting"]["ema/2"]
  assert set(ranks) == set(names) and set(ranks.values()) <= {1, 2} and 1 in ranks.values()
  for name in names:
    e = results["variants"][name]["evals"]["ema/2"]
    assert 0.0 <= e["overall"] <= 1.0 and e["n"] == 6 and e["fid"] > 0
    assert results["variants"][name]["train"]["steps"] == 2
  with open(os.path.join(study_dir, "results.json")) as f:
    assert json.load(f)["ranks"] == results["ranks"]
  with open(out) as f:
    md = f.read()
  for name in names:
    assert md.count(f"| `{name}` |") == 3  # Settings table, average-rank table, wall-time table.
    assert f"`{name}` ({results['ranks']['average']['all'][name]:.2f})" in md  # Side by side with Table 1.
  assert "Spearman" in md and "## Protocol" in md

  # Re-running resumes: nothing is retrained or re-evaluated.
  workdir = os.path.join(study_dir, study.safe_name("eps/linear"))
  stamps = {f: os.path.getmtime(os.path.join(workdir, f)) for f in (study.TRAIN_RECORD, formulation_eval.EVAL_CACHE)}
  again = study.run_study(study_dir, **kwargs)
  assert again["ranks"] == results["ranks"]
  assert stamps == {f: os.path.getmtime(os.path.join(workdir, f)) for f in stamps}

  # A workdir of another formulation is refused before anything is trained into it.
  with pytest.raises(ValueError, match=r"flow.formulation='eps/linear', but this study asks for 'rf'"):
    study.train_variant(study.variant_config("rf", model="debug", num_steps=2), workdir)


def test_a_diverged_run_is_recorded_ranked_last_and_not_retried(tmp_path, monkeypatch):
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  calls = []

  def diverge(config, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    raise trainer.NonFiniteError("loss or gradient norm became non-finite between steps 1 and 2")

  monkeypatch.setattr(trainer, "train_and_evaluate", diverge)
  workdir = str(tmp_path / "v_cos")
  config = study.variant_config("v/cos", model="debug", num_steps=2)
  record = study.train_variant(config, workdir)
  assert "non-finite between steps 1 and 2" in record["diverged"] and record["num_steps"] == 2
  assert study.train_variant(config, workdir) == record and len(calls) == 1  # Not retried.

  results = _fake_results({5: ["rf", "eps/linear", "v/cos"]})
  results["variants"]["v/cos"]["evals"] = {k: dict(study.DIVERGED_EVAL) for k in results["settings"]}
  results["variants"]["v/cos"]["train"] = record
  results["ranks"] = report.rank_results(results)
  assert list(results["ranks"]["average"]["all"]) == ["rf", "eps/linear", "v/cos"]
  assert "| diverged |" in report.render_markdown(results)


def test_variant_config_rejects_bad_values():
  with pytest.raises(ValueError, match=r"model='huge'"):
    study.variant_config("rf", model="huge")
  with pytest.raises(ValueError, match=r"--steps=0"):
    study.variant_config("rf", num_steps=0)
  with pytest.raises(ValueError, match=r"--shift=0.0"):
    study.variant_config("rf", shift=0.0)
  paper = study.variant_config("rf/lognorm(0.00,1.00)", shift=1.0)
  assert (paper.flow.shift, paper.sample.shift) == (1.0, 1.0)
  assert study.variant_config("rf/lognorm(0.00,1.00)").flow.shift == 3.0  # The quickstart recipe's.
  assert isinstance(study.variant_config("rf", model="debug", num_steps=3), ml_collections.ConfigDict)
