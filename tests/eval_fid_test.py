"""Fréchet distance on random-conv features: zero on itself, symmetric, closed-form Gaussians, grows with corruption."""

import numpy as np
import pytest
from scipy import ndimage

from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes
from rflow_jax.eval import fid


@pytest.fixture(scope="module")
def real():
  """240 real 32×32 scenes and the reference statistics of 600 others (another seed)."""
  return fid.real_images(240, seed=3), fid.reference_stats(600, seed=11, size=32)


def test_features_are_deterministic_with_the_documented_shape(real):
  images, _ = real
  a, b = fid.features(images[:20]), fid.features(images[:20])
  assert a.shape == (20, fid.WIDTHS[-1]) and a.dtype == np.float64
  np.testing.assert_array_equal(a, b)
  # An image's features do not depend on its batch, up to float32 BLAS rounding.
  np.testing.assert_allclose(fid.features(images[5:6])[0], a[5], rtol=1e-5, atol=1e-9)
  dead = np.flatnonzero(fid.features(images).std(axis=0) == 0)
  assert dead.size == 0, f"features {dead} are constant over 240 real images (dead channels)"


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((2, 32, 32), np.uint8), r"shape \(2, 32, 32\)"),
        (np.zeros((2, 30, 30, 3), np.uint8), r"divisible by 4.*\(30, 30\)"),
    ],
)
def test_features_reject_bad_images_naming_them(bad, message):
  with pytest.raises(ValueError, match=message):
    fid.features(bad)


def test_distance_to_itself_is_zero_and_symmetric(real):
  images, _ = real
  f1, f2 = fid.features(images[:120]), fid.features(images[120:])
  assert fid.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)
  d12, d21 = fid.frechet_distance(f1, f2), fid.frechet_distance(f2, f1)
  assert d12 > 0
  assert d12 == pytest.approx(d21, rel=1e-6)


def test_diagonal_gaussians_match_closed_form():
  # Commuting (diagonal) covariances: FD = |μ1 − μ2|² + Σ_i (sqrt(a_i) − sqrt(b_i))².
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  want = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
  assert fid.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)


def test_rotated_gaussian_matches_closed_form():
  # Σ1 = I, Σ2 = R diag(4, 1) Rᵀ (not commuting with a general Σ, but with I): tr(I + Σ2 − 2 Σ2^½) = 2 + 5 − 6 = 1.
  theta = 0.7
  r = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  sigma2 = r @ np.diag([4.0, 1.0]) @ r.T
  assert fid.frechet_distance_from_stats([0, 0], np.eye(2), [3, 4], sigma2) == pytest.approx(25.0 + 1.0, rel=1e-9)


def test_non_commuting_case_matches_the_symmetric_formula():
  # tr sqrt(Σ1 Σ2) = Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)); random SPD pair, so sqrtm's path is checked independently.
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
  s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  w, v = np.linalg.eigh(s1)
  half = (v * np.sqrt(w)) @ v.T
  tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(half @ s2 @ half)))
  want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert fid.frechet_distance_from_stats(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(want, rel=1e-8)


def test_samples_converge_to_the_closed_form():
  rng = np.random.default_rng(1)
  n = 200_000
  x = rng.standard_normal((n, 2))  # N(0, I)
  y = rng.standard_normal((n, 2)) * np.array([2.0, 1.0]) + np.array([1.0, 0.0])  # N((1, 0), diag(4, 1))
  assert fid.frechet_distance(x, y) == pytest.approx(1.0 + (2 - 1) ** 2, abs=0.03)


def test_singular_covariances_stay_finite_via_the_eigen_guard():
  # Fewer samples than features: rank-deficient covariances, where sqrtm alone is unreliable.
  rng = np.random.default_rng(2)
  f1, f2 = rng.standard_normal((6, 64)), rng.standard_normal((6, 64)) + 0.5
  d = fid.frechet_distance(f1, f2)
  assert np.isfinite(d) and d > 0
  assert fid.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "broken_root",
    [
        lambda a: np.full_like(a, np.nan),  # sqrtm failed outright
        lambda a: a + 0j,  # a "root" whose square is far from the product
        lambda a: np.eye(len(a)) * 1j,  # purely imaginary
    ],
)
def test_eigen_guard_replaces_an_untrustworthy_sqrtm(monkeypatch, broken_root):
  theta = 0.3
  r = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  sigma2 = r @ np.diag([9.0, 1.0]) @ r.T
  monkeypatch.setattr(fid.scipy.linalg, "sqrtm", broken_root)
  # tr(I + Σ2 − 2 Σ2^½) = 2 + 10 − 2·(3 + 1) = 4.
  assert fid.frechet_distance_from_stats([0, 0], np.eye(2), [0, 0], sigma2) == pytest.approx(4.0, rel=1e-9)


def _noise(images, sigma, rng):
  return np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255).astype(np.uint8)


def _blur(images, sigma):
  return np.clip(ndimage.gaussian_filter(images.astype(np.float64), (0, sigma, sigma, 0)).round(), 0, 255).astype(
      np.uint8
  )


def _colour_shift(images, amount):
  return np.clip(images.astype(np.int64) + np.array([amount, -amount, 0]), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "corrupt, levels",
    [
        ("noise", (0, 10, 30, 60)),
        ("blur", (0, 0.7, 1.5, 3.0)),
        ("colour", (0, 15, 40, 80)),
    ],
)
def test_distance_grows_monotonically_with_corruption(real, corrupt, levels):
  images, ref = real
  rng = np.random.default_rng(0)
  fns = {"noise": lambda x, s: _noise(x, s, rng), "blur": _blur, "colour": _colour_shift}
  distances = [fid.fid(fns[corrupt](images, level) if level else images, ref) for level in levels]
  assert all(a < b for a, b in zip(distances, distances[1:])), f"{corrupt}: {distances}"
  assert distances[-1] > 5 * distances[0]


def test_reference_stats_are_deterministic_and_come_from_real_scenes():
  a, b = fid.reference_stats(30, seed=5, size=32), fid.reference_stats(30, seed=5, size=32)
  np.testing.assert_array_equal(a.mu, b.mu)
  np.testing.assert_array_equal(a.sigma, b.sigma)
  assert a.n == 30 and a.mu.shape == (fid.WIDTHS[-1],) and a.sigma.shape == (fid.WIDTHS[-1],) * 2
  # Kinds interleaved: the first three images are one scene of each kind, rendered as the dataset renders them.
  scenes = shapes_scenes.eval_scenes(10, seed=5, size=32)
  images = fid.real_images(30, seed=5, size=32)
  for k in range(3):
    np.testing.assert_array_equal(images[k], shapes.render(scenes[k * 10], 32))


def test_stats_round_trip_through_npz(tmp_path):
  s = fid.stats(np.random.default_rng(0).standard_normal((10, 4)))
  path = str(tmp_path / "ref.npz")
  s.save(path)
  loaded = fid.Stats.load(path)
  np.testing.assert_array_equal(loaded.mu, s.mu)
  np.testing.assert_array_equal(loaded.sigma, s.sigma)
  assert loaded.n == 10


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fid.stats(np.zeros((1, 4))), r"N >= 2; got shape \(1, 4\)"),
        (lambda: fid.frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mismatched"),
        (lambda: fid.reference_stats(1, seed=0), "n >= 2; got 1"),
    ],
)
def test_bad_arguments_name_the_value(call, message):
  with pytest.raises(ValueError, match=message):
    call()
