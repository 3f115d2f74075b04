"""Fréchet distance between generated and real `shapes` images, on features of a fixed random-weight conv net.

The paper reports FID on CLIP features of COCO images (SD3 §5.1). No pretrained network can be downloaded here, and
an ImageNet Inception would not know 32×32 coloured shapes anyway, so the features come from a small convolutional
network whose weights are drawn once from a fixed seed and never trained ("FID with a random network"). Random
convolutional features are a common stand-in for a pretrained embedding when none fits the domain: they respond to
colour, edges and blob sizes, and the Fréchet distance between feature Gaussians is the usual FID formula.

The network (`features`); its weights are identical on every machine (NumPy `default_rng(FEATURE_SEED)`), its
float32 convolutions agree across machines and batchings up to BLAS rounding (~1e-6 relative):
  x = image / 127.5 - 1                                    # (N, S, S, 3) in [-1, 1]
  conv3×3(3 → 16),  ReLU, 2×2 average pool                 # (N, S/2, S/2, 16)
  conv3×3(16 → 32), ReLU, 2×2 average pool                 # (N, S/4, S/4, 32)
  conv3×3(32 → 64), ReLU, global average pool              # (N, 64) = the features
Weights are He-normal (std sqrt(2 / fan_in)), biases zero, 'SAME' zero padding. 64 features keep the covariance
estimable from the study's ~120 generated images per setting.

Numbers are comparable only within one feature net and one sample size: FD is biased upwards at small N, so the
study compares every variant with the same N and reports the FD of N real images (the floor a perfect model gets).
They are not comparable to Inception/CLIP FIDs from the literature.

API: `features(images) -> (N, F)`, `Stats` / `stats(features)`, `frechet_distance(f1, f2)`,
`frechet_distance_from_stats(...)`, `reference_stats(n, seed, size)` (real shapes images), `fid(images, ref)`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view

from rflow_jax.data import pixels
from rflow_jax.data import shapes
from rflow_jax.data import shapes_scenes

FEATURE_SEED = 20240305  # Seed of the fixed feature-net weights; changing it changes every FD number.
WIDTHS = (16, 32, 64)  # Output channels of the three conv layers; the last one is the feature dimension F.
_CHUNK = 256  # Images per convolution chunk; bounds the im2col buffers to a few tens of MB.
# sqrtm(S1 S2) is trusted when ||X X - A||_F / ||A||_F stays below this and its imaginary part is negligible;
# otherwise the trace is computed from eigenvalues instead (see _trace_sqrt_product).
_SQRTM_REL_ERROR_MAX = 1e-6
_IMAG_REL_MAX = 1e-3


def _weights() -> list[np.ndarray]:
  """The conv kernels (3, 3, C_in, C_out), He-normal from FEATURE_SEED; recomputed on demand (cheap)."""
  rng = np.random.default_rng(FEATURE_SEED)
  kernels, c_in = [], 3
  for c_out in WIDTHS:
    std = math.sqrt(2.0 / (9 * c_in))
    kernels.append((rng.standard_normal((3, 3, c_in, c_out)) * std).astype(np.float32))
    c_in = c_out
  return kernels


def _conv3x3_relu(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """'SAME' 3×3 convolution + ReLU via im2col: (N, H, W, C) -> (N, H, W, K)."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, H, W, C, 3, 3)
  out = np.tensordot(patches, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))  # (N, H, W, K)
  return np.maximum(out, 0.0)


def _avg_pool2(x: np.ndarray) -> np.ndarray:
  """2×2 average pooling, stride 2: (N, H, W, C) -> (N, H/2, W/2, C)."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def features(images: np.ndarray) -> np.ndarray:
  """Features of the fixed random conv net (module docstring) for uint8 images.

  Args:
    images: (N, S, S, 3) uint8, S a multiple of 4.

  Returns:
    (N, F) float64 features, F = WIDTHS[-1].

  Raises:
    ValueError: naming the shape or dtype when the images are not (N, S, S, 3) uint8 with S % 4 == 0.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"features needs (N, S, S, 3) uint8 images; got shape {images.shape}, dtype {images.dtype}")
  if images.shape[1] % 4 or images.shape[2] % 4:
    raise ValueError(f"features needs image sides divisible by 4 (two 2×2 poolings); got {images.shape[1:3]}")
  k1, k2, k3 = _weights()
  out = []
  for start in range(0, len(images), _CHUNK):
    x = pixels.to_float(images[start : start + _CHUNK])
    x = _avg_pool2(_conv3x3_relu(x, k1))
    x = _avg_pool2(_conv3x3_relu(x, k2))
    out.append(_conv3x3_relu(x, k3).mean(axis=(1, 2)))
  if not out:
    return np.zeros((0, WIDTHS[-1]), np.float64)
  return np.concatenate(out).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Stats:
  """Gaussian statistics of a feature set.

  Attributes:
    mu: (F,) mean.
    sigma: (F, F) covariance (unbiased, N - 1).
    n: number of images they were computed from.
  """

  mu: np.ndarray
  sigma: np.ndarray
  n: int

  def save(self, path: str) -> None:
    np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

  @classmethod
  def load(cls, path: str) -> "Stats":
    with np.load(path) as f:
      return cls(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]))


def stats(feats: np.ndarray) -> Stats:
  """Mean and covariance of (N, F) features; N >= 2."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or len(feats) < 2:
    raise ValueError(f"stats needs (N, F) features with N >= 2; got shape {feats.shape}")
  return Stats(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=len(feats))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr sqrt(Σ1 Σ2) for covariance matrices (symmetric PSD).

  First `scipy.linalg.sqrtm(Σ1 Σ2)` (what pytorch-fid and clean-fid do), real part. Σ1 Σ2 is similar to the PSD
  matrix Σ1^½ Σ2 Σ1^½, so its square root's trace is real: Σ_i sqrt(λ_i) over that matrix's eigenvalues.
  Near-singular covariances (few samples, N ≤ F) can make sqrtm inaccurate or give it imaginary parts; then the
  eigen-guard takes over: the trace from the eigenvalues of the symmetric form, negative rounding clipped to 0.
  """
  product = sigma1 @ sigma2
  with np.errstate(all="ignore"), warnings.catch_warnings():
    # Ill-conditioned covariances make sqrtm warn; the residual check below decides whether to trust it.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(product)
  scale = max(np.linalg.norm(product), 1e-300)
  trusted = np.all(np.isfinite(root))
  if trusted:
    rel_error = np.linalg.norm(root @ root - product) / scale
    imag = np.abs(np.imag(np.diagonal(root))).max(initial=0.0)
    real_trace = abs(np.real(np.trace(root)))
    trusted = rel_error <= _SQRTM_REL_ERROR_MAX and imag <= _IMAG_REL_MAX * max(real_trace, 1.0)
  if trusted:
    return float(np.real(np.trace(root)))
  w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # Σ1^½
  sym = half @ sigma2 @ half
  eig = np.linalg.eigvalsh((sym + sym.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
  """||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½): the Fréchet (2-Wasserstein²) distance of two Gaussians.

  Args:
    mu1, mu2: (F,) means.
    sigma1, sigma2: (F, F) covariances.

  Returns:
    The distance, >= 0 (rounding below 0 is clipped).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
  return max(float(fd), 0.0)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
  """Fréchet distance between the Gaussians fitted to two feature sets (N1, F) and (N2, F)."""
  s1, s2 = stats(f1), stats(f2)
  return frechet_distance_from_stats(s1.mu, s1.sigma, s2.mu, s2.sigma)


def real_images(n: int, seed: int, size: int = 32) -> np.ndarray:
  """n rendered real `shapes` scenes, kinds interleaved (single, position, counting, single, ...).

  They come from the evaluation stream (`shapes_scenes.eval_scenes`), disjoint from training records; pick a `seed`
  different from the one of the prompts being evaluated so that the reference is not the prompts' own scenes.
  """
  if n < 1:
    raise ValueError(f"real_images needs n >= 1; got {n}")
  per_kind = -(-n // len(shapes_scenes.KINDS))
  scenes = shapes_scenes.eval_scenes(per_kind, seed, size)
  by_kind = [scenes[k * per_kind : (k + 1) * per_kind] for k in range(len(shapes_scenes.KINDS))]
  interleaved = [s for group in zip(*by_kind) for s in group][:n]
  return np.stack([shapes.render(s, size) for s in interleaved])


def reference_stats(n: int, seed: int, size: int = 32) -> Stats:
  """Feature statistics of n real images (`real_images(n, seed, size)`); n of a few thousand is plenty."""
  if n < 2:
    raise ValueError(f"reference_stats needs n >= 2; got {n}")
  return stats(features(real_images(n, seed, size)))


def fid(images: np.ndarray, reference: Stats) -> float:
  """FD of generated uint8 images (N, S, S, 3) against reference statistics (N >= 2)."""
  s = stats(features(images))
  return frechet_distance_from_stats(s.mu, s.sigma, reference.mu, reference.sigma)
