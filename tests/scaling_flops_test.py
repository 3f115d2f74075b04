"""Compute accounting of the scaling study: analytic parameter counts and training FLOPs against JAX/XLA."""

import jax
import pytest

from configs import debug, scaling, sd3
from rflow_jax.flow import formulations
from rflow_jax.flow import losses
from rflow_jax.model import registry, variants
from rflow_jax.train import trainer
from rflow_jax.utils import flops


def _eval_shape_count(config):
  x, _, context, pooled = registry.dummy_inputs(config)
  return variants.count_params(registry.build_model(config), x.shape, context.shape, pooled.shape)


@pytest.mark.parametrize(
    "config_fn",
    [
        lambda: scaling.get_config("cpu"),
        lambda: sd3.get_config("d24"),  # The paper's 2B rung (abstract shapes only: nothing is allocated).
        lambda: sd3.get_config("sd3-medium"),  # No qk-norm.
        lambda: sd3.get_config("sd3.5-medium"),  # Dual attention in blocks 0-12.
    ],
    ids=["cpu_d4", "d24", "sd3-medium", "sd3.5-medium"],
)
def test_param_formula_equals_eval_shape_count(config_fn):
  config = config_fn()
  counted = flops.param_count(config)
  assert counted["total"] == _eval_shape_count(config)
  m = config.model
  assert counted["total"] - counted["trainable"] == m.pos_embed_max_size**2 * m.hidden_size


def test_train_flops_match_xla_cost_analysis_of_the_gradient_step():
  """3 × forward (attention and text tokens included) against XLA's count of a forward + backward of the loss."""
  config = scaling.get_config("cpu")
  # Width 256: at width 32 elementwise work (which XLA counts and the formula does not) is 13% of the total.
  config.model.update(scan_blocks=False, depth=2, hidden_size=256, num_heads=16)  # XLA counts a scan body once.
  model = registry.build_model(config)
  formulation = formulations.get(config.flow.formulation)
  batch = 2
  x, t, context, pooled = registry.dummy_inputs(config, batch)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, context, pooled)["params"]

  def loss(p, x0, key):
    model_fn = lambda z, mt: model.apply({"params": p}, z, mt, context, pooled)
    return losses.per_example_loss(formulation, model_fn, x0, key)[0].mean()

  grad = jax.jit(jax.grad(loss)).lower(params, x, jax.random.key(0)).compile().cost_analysis()
  grad = grad[0] if isinstance(grad, (list, tuple)) else grad
  ours = flops.train_flops_per_example(config) * batch
  # XLA adds elementwise work (norms, GELU, softmax, Adam-free here) but skips the input gradient of the first layers.
  assert 0.97 < grad["flops"] / ours < 1.06, (grad["flops"], ours)
  # Per-example FLOPs include the text tokens' joint attention: more than image tokens alone.
  per = flops.forward_flops(config)
  assert per["attention"] == 4 * 2 * (64 + 32) ** 2 * 256 and 3 * per["total"] == flops.train_flops_per_example(config)


def test_compiled_step_flops_count_the_native_kernel_as_the_einsum_kernel():
  """XLA cannot see inside the native kernel's custom calls; compiled_step_flops adds attention's FLOPs back."""
  counts = {}
  for impl in ("einsum", "native"):
    config = debug.get_config()
    config.model.attention_impl = impl
    setup = trainer.Setup(config)
    with setup.step_context():
      compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    counts[impl] = (float(raw["flops"]), flops.compiled_step_flops(compiled, config))
  assert counts["einsum"][1] == counts["einsum"][0]  # No custom call: XLA's count as it is.
  missing = 3 * flops.forward_flops(config)["attention"] * config.train.global_batch_size
  assert counts["native"][1] == counts["native"][0] + missing
  # The einsum count also has the softmax's and the q/k RMSNorm's elementwise work (the kernel fuses the norm), which
  # the added matmul FLOPs do not: 3% of this tiny model's step (0.2% at the vs_diffusers size).
  assert 0.96 < counts["native"][1] / counts["einsum"][1] <= 1.0, counts


def test_compute_axis_is_examples_and_flops_of_the_step():
  config = scaling.get_config("cpu")
  axis = flops.compute_axis(config, 40)
  assert axis["examples"] == 40 * 32
  assert axis["flops"] == pytest.approx(40 * 32 * flops.train_flops_per_example(config), rel=1e-12)
  config.model.arch = "dit"
  assert flops.compute_axis(config, 3) == {"examples": 96.0}


def test_ladder_configs_follow_the_width_rule():
  added = []
  scaling.sweep(lambda **kw: added.append(kw), "cpu")
  assert [a["model.depth"] for a in added] == list(scaling.CPU_DEPTHS)
  assert all(a["model.hidden_size"] == 16 * a["model.depth"] == 16 * a["model.num_heads"] for a in added)
  pod = []
  scaling.sweep(lambda **kw: pod.append(kw))
  assert [a["model.hidden_size"] for a in pod] == [64 * d for d in sd3.PAPER_DEPTHS]
  c = scaling.get_config("d24")
  assert (
      c.optim.learning_rate,
      c.optim.warmup_steps,
      c.train.global_batch_size,
      c.flow.formulation,
      c.model.qk_norm,
      c.model.patch_size,
  ) == (1e-4, 1000, 4096, "rf/lognorm(0.00,1.00)", "rms_norm", 2)
  with pytest.raises(ValueError, match="configs/scaling.py:tpu: valid variants are 'cpu', 'pod' and 'd2'"):
    scaling.get_config("tpu")
