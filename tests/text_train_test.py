"""A debug training run with the tiny random "sd3" text stack: the real encoders' code path end to end on CPU."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import debug
from rflow_jax.model import text_encoders
from rflow_jax.train import checkpoint, trainer

pytestmark = pytest.mark.slow


def test_two_step_run_with_tiny_sd3_encoders(tmp_path):
  c = debug.get_config()
  c.text.encoders = "sd3"
  c.text.t5_length = 8
  c.train.num_steps = 2
  workdir = str(tmp_path)
  results = trainer.train_and_evaluate(c, workdir)
  assert np.isfinite(results["loss"]) and results["skipped_steps"] == 0
  assert os.path.isfile(os.path.join(workdir, "samples", "grid_000002.png"))  # Sampled with the "" negative.
  # The frozen encoders are saved into the run and come back unchanged: the random init of text.init_seed (to an
  # ulp: the run initialises under jit, the test eagerly).
  _, text_params, step = checkpoint.restore_params(workdir, use_ema=True)
  assert step == 2 and set(text_params) == {"clip_l", "clip_g", "t5"}
  _, stack = text_encoders.build(c.text)
  fresh = nn.meta.unbox(text_encoders.init_params(stack, c.text))
  leaves = jax.tree.leaves(text_params)
  assert len(leaves) == len(jax.tree.leaves(fresh))
  for a, b in zip(leaves, jax.tree.leaves(fresh)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The backbone was built for SD3's layout: 77 CLIP + 8 T5 context tokens, T5's width, CLIP-L ‖ CLIP-G pooled.
  assert text_encoders.dims(c.text) == (77 + 77 + 8, 77 + 8, 32, 32)
