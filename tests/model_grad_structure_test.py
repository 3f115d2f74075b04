"""The residual-gradient barrier on CPU changes how XLA compiles the backward pass, never what it computes.

Gradients equal those without it, and with it the largest fusion stays the same size as the model gets deeper
(without it, it grows: each block's backward recomputes all later blocks' gradient terms).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model import mmdit


def _model(depth, barrier):
  return mmdit.MMDiT(
      patch_size=2,
      in_channels=4,
      hidden_size=32,
      depth=depth,
      num_heads=2,
      context_dim=16,
      pooled_dim=8,
      pos_embed_max_size=8,
      qk_norm="rms_norm",
      residual_grad_barrier=barrier,
  )


def _inputs():
  k = jax.random.split(jax.random.key(0), 4)
  return (
      jax.random.normal(k[0], (2, 8, 8, 4)),
      jax.random.uniform(k[1], (2,)),
      jax.random.normal(k[2], (2, 6, 16)),
      jax.random.normal(k[3], (2, 8)),
  )


def _grad_fn(model):
  def loss(params, inputs):
    return jnp.mean(jnp.square(model.apply({"params": params}, *inputs)))

  return jax.jit(jax.grad(loss))


def _largest_fusion_operands(hlo_text: str) -> int:
  """Operands of the compiled program's largest fusion."""
  counts = [m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind=", hlo_text)]
  return max(counts)


def _params(model, inputs):
  params = model.init(jax.random.key(1), *inputs)["params"]
  # adaLN-zero: every block is the identity at init; random params make every gradient term non-zero.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_residual_grad_barrier_keeps_gradients_and_bounds_the_fusions():
  inputs = _inputs()
  sizes = {}
  for depth in (2, 3):
    params = _params(_model(depth, True), inputs)
    grads = {}
    for barrier in (True, False):
      fn = _grad_fn(_model(depth, barrier))
      grads[barrier] = fn(params, inputs)
      sizes[depth, barrier] = _largest_fusion_operands(fn.lower(params, inputs).compile().as_text())
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert sizes[3, True] == sizes[2, True], sizes  # Bounded: each block's backward reads its own gradient.
  assert sizes[3, False] > sizes[2, False], sizes  # What the barrier prevents: the chain grows with depth.
