"""Tests for rflow_jax.flow.formulations and paths: parsing, endpoints, conversions, the L_w identity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rflow_jax.flow import formulations
from rflow_jax.flow import losses
from rflow_jax.flow import paths
from rflow_jax.flow import timesteps

ALL = (
    "rf",
    "rf/lognorm(0.50,0.60)",
    "rf/mode(1.29)",
    "rf/cosmap",
    "eps/linear",
    "v/linear",
    "eps/cos",
    "v/cos",
    "edm(-1.20,1.20)",
    "edm/rf",
    "edm/cos",
)


def _data(batch=6, key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  x0 = jax.random.normal(k1, (batch, 4, 4, 3)) * 0.8 + 0.2
  eps = jax.random.normal(k2, (batch, 4, 4, 3))
  return x0, eps, k3


def _mse(x):
  return np.mean(np.square(np.asarray(x, np.float64)), axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spelling,canonical",
    [
        ("rf", "rf"),
        ("rf/uniform", "rf"),
        ("RF/LogNorm(0, 1)", "rf/lognorm(0.00,1.00)"),
        ("rf/lognorm(0.00, 1.00)", "rf/lognorm(0.00,1.00)"),
        ("rf/lognorm(-5e-1,1.0)", "rf/lognorm(-0.50,1.00)"),
        ("rf/mode(1.29)", "rf/mode(1.29)"),
        ("rf/cosmap", "rf/cosmap"),
        ("eps/linear", "eps/linear"),
        ("v / cos", "v/cos"),
        ("edm(0.00,0.60)", "edm(0.00,0.60)"),
        ("edm(-1.2, 1.2)", "edm(-1.20,1.20)"),
        ("edm/rf", "edm/rf"),
        ("edm/cos", "edm/cos"),
    ],
)
def test_get_parses_paper_names(spelling, canonical):
  f = formulations.get(spelling, shift=3)
  assert f.name == canonical and f.shift == 3.0
  assert formulations.get(f.name) == formulations.get(canonical)


def test_table1_names_parse_to_themselves():
  for name in formulations.PAPER_TABLE1:
    assert formulations.get(name).name == name


@pytest.mark.parametrize("bad", ["ddpm", "rf/beta(1,2)", "v/rf", "edm(1)", "rf/lognorm(0)", "eps"])
def test_get_rejects_unknown_listing_valid_forms(bad):
  with pytest.raises(ValueError) as info:
    formulations.get(bad)
  assert repr(bad) in str(info.value)
  assert all(form in str(info.value) for form in formulations.VALID_FORMS)


def test_get_rejects_bad_parameters():
  with pytest.raises(ValueError, match="P_s must be > 0"):
    formulations.get("edm(0,0)")
  with pytest.raises(ValueError, match="scale must be > 0"):
    formulations.get("rf/lognorm(0,-1)")


def test_get_rejects_mode_out_of_range_and_bad_shift():
  with pytest.raises(ValueError, match=r"2/\(π-2\)"):
    formulations.get("rf/mode(1.80)")
  with pytest.raises(ValueError, match="shift"):
    formulations.get("rf", shift=0.0)


def test_hashable_static_argument():
  f = formulations.get("rf/lognorm(0,1)", shift=3.0)
  assert hash(f) == hash(formulations.get("rf/lognorm(0.00, 1.00)", shift=3.0))
  x0, eps, key = _data()

  @functools.partial(jax.jit, static_argnums=0)
  def step(f, x0, eps, key):
    t = f.sample_t(key, x0.shape[:1])
    return f.loss(f.target(x0, eps, t), x0, eps, t, f.noise(x0, eps, t))

  assert float(jnp.max(step(f, x0, eps, key))) < 1e-10


# --------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["rf", "eps/cos"])
def test_endpoints_rf_and_cos(name):
  a, b = formulations.get(name).coefficients(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(a, [1.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(b, [0.0, 1.0], atol=1e-7)


def test_endpoints_linear_are_the_ldm_table():
  alphas = paths.ldm_alphas(0.00085, 0.012, 1000)
  a, b = formulations.get("eps/linear").coefficients(jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(
      a, [np.sqrt(1 - 0.00085), np.interp(499.5, np.arange(1000), alphas), alphas[-1]], rtol=1e-5
  )
  np.testing.assert_allclose(a**2 + b**2, 1.0, rtol=1e-6)
  assert 0.06 < float(a[-1]) < 0.075  # LDM: sqrt(ᾱ_T) ≈ 0.068, the "SNR not zero at T" of LDM


@pytest.mark.parametrize("name", ["edm(0.00,0.60)", "edm/rf", "edm/cos"])
def test_endpoints_edm_preconditioned(name):
  a, b = formulations.get(name).coefficients(jnp.array([0.0, 1.0]))
  rho = paths.EDM_SIGMA_DATA
  np.testing.assert_allclose(a, [1 / rho, 0.0], atol=1e-6)
  np.testing.assert_allclose(b, [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_rf_sigma_inverse_definition_and_log_snr(name):
  f = formulations.get(name)
  t = jnp.linspace(0.02, 0.98, 49)
  a, b = f.coefficients(t)
  sigma = f.path.rf_sigma(t)
  np.testing.assert_allclose(sigma, b / (a + b), atol=1e-6)
  assert bool(jnp.all(jnp.diff(sigma) > 0))
  np.testing.assert_allclose(f.path.t_from_rf_sigma(sigma), t, atol=2e-4)
  # x = z/(a+b) lies on the rf path at σ = b/(a+b) with the same log-SNR.
  np.testing.assert_allclose(paths.rf_log_snr(sigma), paths.log_snr(f.path, t), rtol=1e-3, atol=1e-3)


def test_edm_log_snr_distribution():
  # edm(P_m, P_s) with t ~ U(0,1): λ_t ~ N(-2 P_m, (2 P_s)²).
  f = formulations.get("edm(0.30,0.80)")
  t = f.sample_t(jax.random.key(4), (100_000,))
  lam = np.asarray(paths.log_snr(f.path, t), np.float64)
  assert stats.kstest(lam, stats.norm(-0.6, 1.6).cdf).pvalue > 1e-3


@pytest.mark.parametrize("edm,ref", [("edm/rf", "rf"), ("edm/cos", "v/cos")])
def test_edm_schedule_variants_follow_reference_log_snr(edm, ref):
  t = jnp.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(
      paths.log_snr(formulations.get(edm).path, t), paths.log_snr(formulations.get(ref).path, t), rtol=1e-4, atol=1e-4
  )


# ------------------------------------------------------------------------------------ sampling times


@pytest.mark.parametrize("name", ALL)
def test_sample_t_open_interval_and_model_time(name):
  for shift in (1.0, 3.0):
    f = formulations.get(name, shift=shift)
    t = f.sample_t(jax.random.key(5), (10_000,))
    assert t.shape == (10_000,)
    assert float(t.min()) > 0.0 and float(t.max()) <= 1.0
    mt = f.model_time(t)
    assert float(mt.min()) >= 0.0 and float(mt.max()) <= 1.0


def test_rf_shift_applies_to_training_times():
  f1, f3 = formulations.get("rf/lognorm(0,1)"), formulations.get("rf/lognorm(0,1)", shift=3.0)
  key = jax.random.key(6)
  np.testing.assert_allclose(f3.sample_t(key, (1000,)), timesteps.shift(f1.sample_t(key, (1000,)), 3.0), atol=1e-6)


@pytest.mark.parametrize("name", ["v/cos", "eps/linear", "edm(0.00,0.60)"])
def test_shift_acts_on_rf_sigma_for_other_paths(name):
  f1, f3 = formulations.get(name), formulations.get(name, shift=3.0)
  key = jax.random.key(7)
  s1, s3 = f1.path.rf_sigma(f1.sample_t(key, (1000,))), f3.path.rf_sigma(f3.sample_t(key, (1000,)))
  expect = timesteps.shift(s1, 3.0)
  if name == "eps/linear":  # the LDM table only reaches σ_rf ≈ 0.936; beyond it t clamps to 1
    expect = jnp.minimum(expect, f1.path.rf_sigma(1.0))
  np.testing.assert_allclose(s3, expect, atol=2e-4)


# ------------------------------------------------------------------------------------- conversions


def test_rf_noise_and_velocity_convention():
  x0, eps, _ = _data()
  t = jnp.linspace(0.1, 0.9, 6)
  f = formulations.get("rf")
  z = f.noise(x0, eps, t)
  np.testing.assert_allclose(z, (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps, atol=1e-6)
  np.testing.assert_allclose(f.target(x0, eps, t), eps - x0, atol=1e-6)
  v = eps - x0
  np.testing.assert_allclose(paths.rf_x0_from_velocity(z, v, t), x0, atol=1e-5)
  np.testing.assert_allclose(paths.rf_eps_from_velocity(z, v, t), eps, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_oracle_round_trips(name):
  # The exact output (the target) implies exactly (x0, ε), velocity ε - x0, and zero loss.
  f = formulations.get(name)
  x0, eps, key = _data()
  t = jnp.linspace(0.03, 0.97, 6)
  z = f.noise(x0, eps, t)
  oracle = f.target(x0, eps, t)
  x0_hat, eps_hat = f.predict(oracle, z, t)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
  np.testing.assert_allclose(f.to_velocity(oracle, z, t), eps - x0, atol=5e-4)
  assert float(jnp.max(f.loss(oracle, x0, eps, t, z))) < 1e-8
  # Any output -> (x̂0, ε̂) -> output again (the predictions are consistent with z by construction).
  out = jax.random.normal(key, z.shape)
  np.testing.assert_allclose(f.target(*f.predict(out, z, t), t), out, atol=5e-4)


def test_eps_x0_v_conversions_between_vp_formulations():
  # An ε-prediction of eps/cos converts to the v-prediction of v/cos and to the rf velocity consistently.
  eps_f, v_f = formulations.get("eps/cos"), formulations.get("v/cos")
  x0, eps, key = _data()
  t = jnp.linspace(0.05, 0.95, 6)
  z = eps_f.noise(x0, eps, t)
  eps_out = jax.random.normal(key, z.shape)
  v_out = v_f.target(*eps_f.predict(eps_out, z, t), t)
  np.testing.assert_allclose(v_f.predict(v_out, z, t)[1], eps_out, atol=1e-4)
  np.testing.assert_allclose(v_f.to_velocity(v_out, z, t), eps_f.to_velocity(eps_out, z, t), atol=2e-4)


@pytest.mark.parametrize("name", ALL)
def test_as_velocity_fn_with_oracle_gives_rf_velocity(name):
  f = formulations.get(name)
  x0, eps, _ = _data()
  # Inside every path's σ range (the LDM table spans σ_rf ∈ [0.03, 0.936]).
  sigma = jnp.linspace(0.05, 0.9, 6)
  x = paths.rf_interpolate(x0, eps, sigma)

  def oracle(z, model_time):
    t = f.path.t_from_rf_sigma(sigma)
    np.testing.assert_allclose(model_time, f.model_time(t), atol=1e-6)
    np.testing.assert_allclose(z, f.noise(x0, eps, t), atol=2e-4)  # the rescaled rf point is the state
    return f.target(x0, eps, t)

  np.testing.assert_allclose(f.as_velocity_fn(oracle)(x, sigma), eps - x0, atol=5e-4)


def test_edm_preconditioning_matches_karras():
  f = formulations.get("edm(0.00,0.60)")
  rho = paths.EDM_SIGMA_DATA
  x0, eps, key = _data()
  t = jnp.linspace(0.1, 0.9, 6)
  sigma = np.exp(np.asarray(f.path.log_sigma(t), np.float64))[:, None, None, None]
  c_skip = rho**2 / (sigma**2 + rho**2)
  c_out = sigma * rho / np.sqrt(sigma**2 + rho**2)
  c_in = 1 / np.sqrt(sigma**2 + rho**2)
  z = f.noise(x0, eps, t)
  z_ve = np.asarray(x0, np.float64) + sigma * np.asarray(eps, np.float64)
  np.testing.assert_allclose(z, c_in * z_ve, rtol=1e-4, atol=1e-5)  # the network input is c_in z_ve
  out = np.asarray(jax.random.normal(key, z.shape), np.float64)
  denoised = c_skip * z_ve + c_out * out
  np.testing.assert_allclose(f.predict(jnp.asarray(out, jnp.float32), z, t)[0], denoised, rtol=1e-4, atol=1e-4)
  # Loss = ½ρ² · λ_EDM(σ) ||D - x0||², λ_EDM = (σ² + ρ²)/(σρ)² (Karras et al. 2022, Table 1).
  lam_edm = ((sigma**2 + rho**2) / (sigma * rho) ** 2)[:, 0, 0, 0]
  expect = 0.5 * rho**2 * lam_edm * _mse(denoised - np.asarray(x0, np.float64))
  np.testing.assert_allclose(f.loss(jnp.asarray(out, jnp.float32), x0, eps, t, z), expect, rtol=2e-4)
  # c_noise: the rf-equivalent σ/(1+σ).
  np.testing.assert_allclose(f.model_time(t), (sigma / (1 + sigma))[:, 0, 0, 0], rtol=1e-5)


# ----------------------------------------------------------------------------------- loss identity


@pytest.mark.parametrize("name", ALL)
def test_loss_is_monte_carlo_estimate_of_l_w(name):
  # loss(t) = -½ w_t λ'_t ||ε̂ - ε||² / π(t) for the paper's L_w weight (arXiv 2403.03206 §2) of every formulation.
  f = formulations.get(name)
  x0, eps, key = _data()
  t = jnp.array([0.07, 0.2, 0.35, 0.5, 0.7, 0.9])
  z = f.noise(x0, eps, t)
  out = f.target(x0, eps, t) + 0.3 * jax.random.normal(key, z.shape)
  eps_hat = f.predict(out, z, t)[1]
  dlam = np.asarray(paths.d_log_snr(f.path, t), np.float64)
  expect = (
      -0.5
      * np.asarray(f.weight(t), np.float64)
      * dlam
      * _mse(eps_hat - eps)
      / np.asarray(f.sample_density(t), np.float64)
  )
  np.testing.assert_allclose(f.loss(out, x0, eps, t, z), expect, rtol=2e-3)


def test_rf_velocity_mse_is_l_cfm_with_paper_weight():
  # SD3 §2: with ε_Θ = -2/(λ' b)(v_Θ - (a'/a) z) and w = -½ λ' b², -½ w λ' ||ε_Θ - ε||² = ||v_Θ - u||².
  f = formulations.get("rf")
  x0, eps, key = _data()
  t = jnp.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
  z = f.noise(x0, eps, t)
  v = eps - x0 + 0.5 * jax.random.normal(key, z.shape)
  a, b = (np.asarray(c, np.float64)[:, None, None, None] for c in f.coefficients(t))
  da = np.asarray(paths.d_coefficients(f.path, t)[0], np.float64)[:, None, None, None]
  dlam = np.asarray(paths.d_log_snr(f.path, t), np.float64)
  np.testing.assert_allclose(dlam, -2 / (np.asarray(t) * (1 - np.asarray(t))), rtol=1e-5)  # closed form
  eps_theta = -2 / (dlam[:, None, None, None] * b) * (np.asarray(v, np.float64) - da / a * np.asarray(z))
  w = -0.5 * dlam * b[:, 0, 0, 0] ** 2
  np.testing.assert_allclose(w, np.asarray(t) / (1 - np.asarray(t)), rtol=1e-5)  # w^RF = t/(1-t)
  l_w = -0.5 * w * dlam * _mse(eps_theta - np.asarray(eps, np.float64))
  np.testing.assert_allclose(f.loss(v, x0, eps, t, z), l_w, rtol=1e-4)
  np.testing.assert_allclose(f.loss(v, x0, eps, t, z), _mse(v - (eps - x0)), rtol=1e-5)


# --------------------------------------------------------------------------------------------- losses


def test_per_example_loss_and_bins():
  f = formulations.get("rf/lognorm(0,1)", shift=2.0)
  x0, _, key = _data(batch=16)
  loss, t = jax.jit(lambda x, k: losses.per_example_loss(f, lambda z, mt: jnp.zeros_like(z), x, k))(x0, key)
  assert loss.shape == (16,) and t.shape == (16,)
  # Zero velocity prediction: loss = ||ε - x0||² per example.
  key_t, key_eps = jax.random.split(key)
  eps = jax.random.normal(key_eps, x0.shape)
  np.testing.assert_allclose(loss, _mse(eps - x0), rtol=1e-5)
  np.testing.assert_allclose(t, f.sample_t(key_t, (16,)), atol=1e-7)
  sums, counts = losses.binned_sums(loss, t, 4)
  assert float(counts.sum()) == 16
  np.testing.assert_allclose(float(sums.sum()), float(loss.sum()), rtol=1e-5)
  np.testing.assert_allclose(losses.binned_sums(jnp.ones(3), jnp.array([0.0, 0.5, 1.0]), 2)[1], [1, 2])
