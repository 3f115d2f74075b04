"""optim.update_impl="native": the fused C++ update equals optax's AdamW + the EMA, in the step too; it falls back."""

from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import numpy as np
import optax
import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.model import native_attention
from rflow_jax.train import native_update
from rflow_jax.train import optimizer as optim_lib
from rflow_jax.train import trainer
from rflow_jax.utils import flops as flops_lib

from native_util import library  # pylint: disable=unused-import (a fixture; tests/ is on sys.path)

STEPS = 4


def _optim(grad_clip_norm):
  return ConfigDict(
      dict(
          learning_rate=1e-2,
          warmup_steps=2,
          decay="cosine",
          decay_fraction=0.2,
          b1=0.9,
          b2=0.99,
          eps=1e-8,
          weight_decay=0.1,
          grad_clip_norm=grad_clip_norm,
      )
  )


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "blocks_0": {"kernel": jax.random.normal(k[0], (33, 70)), "bias": jax.random.normal(k[1], (70,))},
      "pos_embed": jax.random.normal(k[2], (5, 4)),  # Frozen (optimizer.param_labels).
      "final": {"kernel": jax.random.normal(k[3], (40000, 3))},  # Several of the kernel's work chunks.
  }


def _optax_update(tx, grads, opt_state, params, ema, step):
  decay = optim_lib.ema_decay(step, 0.999)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
  return params, opt_state, ema, optax.tree.norm(updates)


def _native_update(optim, grads, opt_state, params, ema, step):
  schedule = optim_lib.learning_rate_schedule(optim, 10)
  decay = optim_lib.ema_decay(step, 0.999)
  return native_update.update(
      grads, optax.tree.norm(grads), opt_state, params, ema, decay, optim_config=optim, learning_rate=schedule
  )


def _max_rel_diff(a, b):
  return max(
      float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30)) for x, y in zip(*map(jax.tree.leaves, (a, b)))
  )


@pytest.mark.parametrize("grad_clip_norm", [1.0, 0.0])
def test_matches_optax_adamw_and_ema_over_steps(library, grad_clip_norm):
  optim = _optim(grad_clip_norm)
  tx = optim_lib.make_optimizer(optim, 10)
  params = _params()
  ref = new = (params, tx.init(params), params)
  ref_fn = jax.jit(lambda *a: _optax_update(tx, *a))
  new_fn = jax.jit(lambda *a: _native_update(optim, *a))
  for step in range(STEPS):
    # Large gradients on even steps (clipping fires), small ones on odd steps (it does not).
    scale = 10.0 if step % 2 == 0 else 1e-3
    grads = jax.tree.map(
        lambda p: scale * jax.random.normal(jax.random.fold_in(jax.random.key(1), step), p.shape), params
    )
    *ref, ref_norm = ref_fn(grads, ref[1], ref[0], ref[2], step)
    *new, new_norm = new_fn(grads, new[1], new[0], new[2], step)
    # The same optimiser state structure (checkpoints interchange), counts included; float32 rounding apart.
    assert jax.tree.structure(new[1]) == jax.tree.structure(ref[1])
    assert _max_rel_diff(ref, new) < 1e-6, step
    np.testing.assert_allclose(new_norm, ref_norm, rtol=1e-5)
  assert float(jnp.abs(new[0]["blocks_0"]["kernel"] - params["blocks_0"]["kernel"]).max()) > 1e-3  # It trained.
  np.testing.assert_array_equal(new[0]["pos_embed"], params["pos_embed"])  # Frozen: never updated.


def test_train_step_calls_the_kernel_and_matches_optax(library):
  """The debug config's step with update_impl native and optax: the same params after one step, the same losses.

  Only the first step compares params tightly: from the second on, the gradients differ by the first step's
  rounding and Adam's normalisation enlarges that on near-zero gradients (the zero-initialised adaLN kernels).
  """
  results = {}
  for impl in ("native", "optax"):
    config = debug.get_config()
    config.optim.update_impl = impl
    config.optim.warmup_steps = 0
    setup = trainer.Setup(config)
    state = setup.init_state()
    batch = setup.global_batch(next(setup.data_iterator()))
    with setup.step_context():
      hlo = setup.train_step.lower(state, batch).compile().as_text()
    assert (native_update.TARGET in hlo) == (impl == "native")
    # The FLOP count sees every updated (not frozen) parameter in the native program, none in optax's.
    labels = jax.tree.leaves(optim_lib.param_labels(state.params))
    trained = sum(p.size for p, label in zip(jax.tree.leaves(state.params), labels) if label != "frozen")
    assert flops_lib.native_update_params(hlo) == (trained if impl == "native" else 0)
    state, metrics = setup.step(state, batch)
    first = jax.tree.map(np.asarray, (state.params, state.ema_params))  # The next step donates the state.
    state, second = setup.step(state, batch)
    results[impl] = ([float(metrics["loss"]), float(second["loss"])], first)
  (native_losses, native_first), (optax_losses, optax_first) = results["native"], results["optax"]
  np.testing.assert_allclose(native_losses, optax_losses, rtol=1e-5)
  assert _max_rel_diff(optax_first, native_first) < 1e-6


def test_missing_library_falls_back_to_optax_and_warns(monkeypatch, tmp_path):
  missing = str(tmp_path / "absent.so")
  monkeypatch.setattr(native_attention, "LIBRARY_PATH", missing)
  monkeypatch.setattr(native_update, "_warned", set())
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  optim = _optim(1.0)
  tx = optim_lib.make_optimizer(optim, 10)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  assert _native_update(optim, grads, tx.init(params), params, params, 0) is None
  assert warnings == [
      f"optim.update_impl=native falls back to optax: {missing} does not exist (build it with `make install` or"
      " `python -m rflow_jax.model.native_attention`)"
  ]


def test_more_than_one_device_is_a_fallback_reason(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert native_update.fallback_reason(_params()) == "8 devices: the native update has no sharding rule"


def test_unknown_update_impl_is_refused():
  config = debug.get_config()
  config.optim.update_impl = "fused"
  with pytest.raises(ValueError, match=r"^optim.update_impl='fused'; valid: 'optax', 'native'$"):
    config_lib.validate(config)
