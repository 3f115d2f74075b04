"""Tests for rflow_jax.sampling.pipeline.Sampler: an image depends on (params, prompt, seed, index), not on batching."""

import jax
import numpy as np
import pytest

import pipeline_util  # tests/pipeline_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax.sampling import pipeline
from rflow_jax.train import trainer

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square"]


@pytest.fixture(scope="module")
def setup_and_params():
  setup = trainer.Setup(debug.get_config())
  state = setup.init_state()
  # adaLN-zero makes a fresh model's velocity exactly 0; perturb every weight so the samplers have work to do (numpy
  # noise: op-by-op JAX would compile one program per weight shape).
  params = pipeline_util.perturb(state.params, 5, 0.05)
  return setup, params, state.text_params, {}


def _assert_same_images(a, b):
  # Equal up to float rounding: batches of another size compile to other XLA kernels, so a pixel near a rounding
  # boundary may move by 1/255. Noise drawn for the wrong example would change nearly every pixel.
  diff = np.abs(a.astype(int) - b.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def _generate(setup_and_params, *, solver, batch_size, prompts=PROMPTS, seed=3, reuse=True):
  """The images of PROMPTS[...]: a call already made in this module is answered from its first result unless `reuse`
  is False (a test of determinism generates again)."""
  setup, params, text_params, done = setup_and_params
  key = (solver, batch_size, tuple(prompts), seed)
  if reuse and key in done:
    return done[key]
  setup.config.sample.solver = solver
  setup.config.sample.batch_size = batch_size
  task = setup.task  # A fresh sampler each call: task.sampler is built once, for the config it first saw.
  sampler = pipeline.Sampler.from_config(
      setup.config, model=task.model, text_stack=task.text_stack, tokenizer=task.tokenizer
  )
  done[key] = sampler.generate(params, text_params, prompts, seed)
  return done[key]


@pytest.mark.parametrize("solver", ["euler", "euler_stochastic"])
def test_images_do_not_depend_on_batching(setup_and_params, solver):
  whole = _generate(setup_and_params, solver=solver, batch_size=4)  # One padded batch.
  split = _generate(setup_and_params, solver=solver, batch_size=2)  # Two batches, the second padded.
  _assert_same_images(whole, split)
  assert whole.shape == (3, 32, 32, 3) and whole.std() > 0
  # Prompt 0 alone gives the same image: it does not see the other prompts' noise either.
  _assert_same_images(_generate(setup_and_params, solver=solver, batch_size=2, prompts=PROMPTS[:1]), whole[:1])


def test_stochastic_solver_is_seeded_and_differs_from_euler(setup_and_params):
  a = _generate(setup_and_params, solver="euler_stochastic", batch_size=4)
  np.testing.assert_array_equal(a, _generate(setup_and_params, solver="euler_stochastic", batch_size=4, reuse=False))
  assert (a != _generate(setup_and_params, solver="euler_stochastic", batch_size=4, seed=4)).mean() > 0.5
  assert (a != _generate(setup_and_params, solver="euler", batch_size=4)).mean() > 0.5
