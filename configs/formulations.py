"""The formulation study (SD3 §5.1, Table 1) in miniature: one quickstart run per training formulation.

One run:
  python -m rflow_jax.main --config='configs/formulations.py:rf/lognorm(0.00,1.00)' --workdir=runs/form/one
The whole study (trains every `sweep` entry in turn, evaluates, ranks, writes docs/results/formulations.md):
  python launch/formulation_study.py --study_dir=runs/formulations
  (cheaper: --steps=300; a subset: --only='rf,eps/linear'; see launch/formulation_study.py)

The argument is a formulation name in the paper's notation (rflow_jax/flow/formulations.py, docs/formulations.md).
Everything else is configs/quickstart.py, so every variant gets the same training compute: the same model, batch,
number of steps, optimiser and data order. Only `flow.formulation` differs between runs — as in the paper, which
also fixed the compute per formulation and changed nothing but the formulation.

Differences from the paper's protocol (docs/results/formulations.md has the full list): pixel-space shapes data
instead of ImageNet/CC12M latents; the quickstart's 1300 steps of batch 32 instead of batch 1024; the quickstart's
timestep shift α = 3 on every variant's training times and sampling grid (the paper's study had none; see
configs/quickstart.py for why this data needs it); the last checkpoint is evaluated (the paper picks the step of
minimal EMA validation loss).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable from any cwd.
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT = "rf/lognorm(0.00,1.00)"

# The variants trained by `sweep`: the paper's Table 1 entries that bracket its findings (the SD3 default, the
# best logit-normal and mode settings, CosMap, uniform rf, the LDM/cosine diffusion baselines and two EDMs,
# Karras' defaults included), in the order of the paper's average rank where it has one.
STUDY = (
    "rf/lognorm(0.00,1.00)",
    "rf/lognorm(1.00,0.60)",
    "rf/lognorm(0.50,0.60)",
    "rf/mode(1.29)",
    "eps/linear",
    "rf/mode(1.75)",
    "rf/cosmap",
    "edm(0.00,0.60)",
    "rf",
    "v/linear",
    "v/cos",
    "edm(-1.20,1.20)",
)


def get_config(arg: str = DEFAULT):
  """The quickstart run trained with formulation `arg` (paper notation; "" means the SD3 default).

  Args:
    arg: e.g. "rf/lognorm(0.00,1.00)", "eps/linear", "edm(-1.20,1.20)". Validated when the config is validated
      (rflow_jax.config_lib.validate), which names the bad value and lists the valid forms.

  Returns:
    The ConfigDict.
  """
  c = quickstart.get_config()
  c.flow.formulation = arg.strip() or DEFAULT  # The one field the study varies.
  # The study scores every run afterwards at several sampler settings (launch/formulation_study.py); the
  # trainer's own end-of-training ShapesEval would only repeat one of them.
  c.train.eval_at_end = False
  return c


def sweep(add):
  """One run per formulation of `STUDY`; everything else as in get_config()."""
  for name in STUDY:
    add(**{"flow.formulation": name})
