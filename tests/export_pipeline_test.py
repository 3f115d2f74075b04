"""`python -m rflow_jax.export --format=pipeline`: a run exported as a StableDiffusion3Pipeline directory that diffusers
loads with from_pretrained and samples to the same images as rflow_jax; runs that cannot be a pipeline are refused.

The run is a tiny latent-space run with SD3's text stack at tiny size; its checkpoint is random weights (every weight
moved off its init, so zero-initialised layers take part), handed to the exporter in place of a trained checkpoint.
"""

import json
import os

import numpy as np
import pytest
import torch

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
import pipeline_util as pu
from configs import debug
from rflow_jax import rundir
from rflow_jax.export import workdir as export_workdir
from rflow_jax.train import checkpoint

STEPS, CFG = 3, 5.0


def _export(tmp_path_factory, use_t5: bool):
  """(workdir, OUT) of a random run exported with --format=pipeline (through export_workdir, as the CLI)."""
  root = tmp_path_factory.mktemp(f"t5_{use_t5}")
  config = pu.run_config(pu.save_tiny_vae(root / "vae"), use_t5)
  (root / "run").mkdir()
  pu.write_run(root / "run", config)
  weights = pu.random_weights(config)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoint, "restore_params", lambda workdir, use_ema: weights)
    info = export_workdir.export_workdir(root / "run", root / "out", fmt="pipeline")
  assert info["format"] == "pipeline" and info["step"] == 7 and info["text"]["t5_length"] == pu.T5_LENGTH
  return root / "run", root / "out"


@pytest.fixture(scope="module", params=[True, False], ids=["t5_on", "t5_off"])
def exported(request, tmp_path_factory):
  return request.param, *_export(tmp_path_factory, request.param)


@pytest.mark.slow
def test_diffusers_loads_and_samples_the_same_images(exported):
  from diffusers import StableDiffusion3Pipeline  # pylint: disable=g-import-not-at-top

  use_t5, _, out = exported
  expected = ["model_index.json", "rflow_jax_export.json", "scheduler", "text_encoder", "text_encoder_2"]
  expected += ["text_encoder_3"] if use_t5 else []
  expected += ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if use_t5 else []) + ["transformer", "vae"]
  assert sorted(os.listdir(out)) == expected
  # A T5-off run has no text_encoder_3: diffusers loads such a pipeline when told so (its documented T5-off call).
  no_t5 = {} if use_t5 else dict(text_encoder_3=None, tokenizer_3=None)
  pipe = StableDiffusion3Pipeline.from_pretrained(out, **no_t5)
  assert (pipe.text_encoder_3 is not None) == use_t5
  assert pipe.scheduler.config.shift == 3.0
  assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)  # The run's.
  sampler, params, text_params, _ = rundir.load_pipeline_sampler(out, steps=STEPS, cfg=CFG, t5_length=pu.T5_LENGTH)
  noise = pu.latents(3)
  for negative in ("", pu.NEGATIVE):
    theirs = pu.diffusers_images(pipe, noise, steps=STEPS, cfg=CFG, negative=negative or None)
    diff = float(np.abs(pu.ours(sampler, params, text_params, noise, negative) - theirs).max())
    print(
        f"rflow_jax -> diffusers, T5 {'on' if use_t5 else 'off'}, negative {negative!r}: max |diff| {diff:.2e}, "
        f"{pu.spread(theirs)}"
    )
    assert theirs.std() > 0.05 and diff <= pu.PARITY


def test_export_refuses_what_cannot_be_a_pipeline(tmp_path):
  """Pixel space or the tiny stand-in encoders: one line naming the missing part and --format=diffusers, nothing
  written (the checkpoint is never read: the workdir has only its config)."""
  cases = {
      "tiny_text": (debug.get_config(), r"text.encoders='tiny'.*text_encoder/.*use --format=diffusers$"),
      "pixels": (
          pu.run_config("unused"),
          r"data.name=.* pixel space: the run has no VAE \(vae/\).*--format=diffusers$",
      ),
  }
  cases["pixels"][0].data.name = "shapes"
  for name, (config, pattern) in cases.items():
    (tmp_path / name).mkdir()
    pu.write_run(tmp_path / name, config)
    with pytest.raises(ValueError, match=pattern):
      export_workdir.export_workdir(tmp_path / name, tmp_path / f"{name}_out", fmt="pipeline")
    assert not (tmp_path / f"{name}_out").exists()
  rc, _, stderr = cli_util.run_module(
      "rflow_jax.export", f"--workdir={tmp_path / 'tiny_text'}", f"--out={tmp_path / 'cli_out'}", "--format=pipeline"
  )
  cli_util.assert_one_line_error(rc, stderr, "text.encoders='tiny'", "use --format=diffusers")
  assert not (tmp_path / "cli_out").exists()


def test_export_info_and_atomic_layout(exported):
  use_t5, _, out = exported
  info = json.loads((out / "rflow_jax_export.json").read_text())
  assert info["text"] == {"encoders": "sd3", "t5_length": pu.T5_LENGTH, "use_t5": use_t5}
  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusion3Pipeline"
  assert index["text_encoder_3"] == (["transformers", "T5EncoderModel"] if use_t5 else [None, None])
  assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # No temporary left behind.
