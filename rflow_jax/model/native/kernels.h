// Kernels of attention_cpu.cc: a small-GEMM driver over AVX2/FMA register-blocked micro-kernels, a vectorised
// exp, row reductions, a tiled transpose (plain-loop versions where the compiler targets no AVX2), and the q/k
// RMSNorm with its backward pass.
#ifndef RFLOW_JAX_MODEL_NATIVE_KERNELS_H_
#define RFLOW_JAX_MODEL_NATIVE_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace rflow_attention {

constexpr int64_t kMr = 6;  // Micro-kernel rows: 6 x 16 accumulators = 12 of AVX2's 16 vector registers.

// ---------------------------------------------------------------------------------------------------------------
// GEMM: C (m x n, row stride ldc) = or += A (m x k, element (i, p) at a[i * ars + p * acs]) * B (k x n, row stride
// ldb). n is a multiple of 8 (callers pad). A's general strides let the same kernel multiply by a transposed
// block (P^T dO, dS^T Q): A is only ever broadcast one element at a time, so its layout costs nothing.
// ---------------------------------------------------------------------------------------------------------------

#ifdef __AVX2__

// The accumulators must live in registers: gcc keeps a 2-D __m256 array in registers only when every loop over it
// is unrolled before scalar replacement, hence the pragmas (without them it stores all 12 to the stack per step).
template <int M, int NV>
inline void MicroKernel(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                        int64_t ldc, bool accumulate) {
  __m256 acc[M][NV];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm256_loadu_ps(b + p * ldb + 8 * j);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * ars + p * acs);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* ci = c + i * ldc + 8 * j;
      _mm256_storeu_ps(ci, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][j]) : acc[i][j]);
    }
  }
}

template <int NV>
inline void RowTile(int64_t mr, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
    case 6: return MicroKernel<6, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
    case 5: return MicroKernel<5, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
    case 4: return MicroKernel<4, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
    case 3: return MicroKernel<3, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
    case 2: return MicroKernel<2, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
    default: return MicroKernel<1, NV>(k, a, ars, acs, b, ldb, c, ldc, accumulate);
  }
}

inline void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  // Column panels outermost: one k x 16 panel of B (18 KiB at k = 288) stays in L1 while all rows of A pass it.
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const bool two = n - j0 >= 16;
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int64_t mr = std::min(kMr, m - i0);
      const float* ai = a + i0 * ars;
      float* ci = c + i0 * ldc + j0;
      if (two) {
        RowTile<2>(mr, k, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate);
      } else {
        RowTile<1>(mr, k, ai, ars, acs, b + j0, ldb, ci, ldc, accumulate);
      }
    }
  }
}

// exp(x) for x in float32 range, Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r
// (about 1 ulp), times 2^n built in the exponent bits. Inputs are clamped to [-87.3, 88.3] (results stay normal:
// exp of anything below is returned as ~1e-38 rather than 0, far below a softmax row sum >= 1); NaN propagates.
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // The second operand is returned when either is NaN.
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365447504019f), x);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// x[j] <- exp(x[j] * mul - shift) for j < s; returns their sum.
inline float ExpShiftedSum(float* x, int64_t s, float mul, float shift) {
  const __m256 sh = _mm256_set1_ps(shift), mu = _mm256_set1_ps(mul);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= s; j += 8) {
    const __m256 p = Exp(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), mu, sh));
    _mm256_storeu_ps(x + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; j < s; ++j) {
    x[j] = std::exp(x[j] * mul - shift);
    sum += x[j];
  }
  return sum;
}

inline float RowMax(const float* x, int64_t s) {
  __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= s; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float m = lanes[0];
  for (float lane : lanes) m = std::max(m, lane);
  for (; j < s; ++j) m = std::max(m, x[j]);
  return m;
}

// Sum of x[j] * y[j], j < d.
inline float Dot(const float* x, const float* y, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; j < d; ++j) sum += x[j] * y[j];
  return sum;
}

// out (d x ld_out) <- the transpose of x's first s rows (row stride ld_x, d columns): 8 x 8 tiles in registers
// (scalar copies only scatter one float per cache line).
inline void Transpose(const float* x, int64_t s, int64_t ld_x, int64_t d, float* out, int64_t ld_out) {
  int64_t i0 = 0;
  for (; i0 + 8 <= s; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= d; j0 += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + (i0 + i) * ld_x + j0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(out + (j0 + i) * ld_out + i0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(out + (j0 + i + 4) * ld_out + i0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
    for (int64_t i = i0; i < i0 + 8; ++i) {
      for (int64_t j = j0; j < d; ++j) out[j * ld_out + i] = x[i * ld_x + j];
    }
  }
  for (int64_t i = i0; i < s; ++i) {
    for (int64_t j = 0; j < d; ++j) out[j * ld_out + i] = x[i * ld_x + j];
  }
}

#else  // Portable fallback: plain loops (gcc vectorises the inner j loops at -O3).

inline void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (!accumulate) std::fill(ci, ci + n, 0.f);
    for (int64_t p = 0; p < k; ++p) {
      const float aip = a[i * ars + p * acs];
      const float* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

inline float ExpShiftedSum(float* x, int64_t s, float mul, float shift) {
  float sum = 0.f;
  for (int64_t j = 0; j < s; ++j) {
    x[j] = std::exp(x[j] * mul - shift);
    sum += x[j];
  }
  return sum;
}

inline float RowMax(const float* x, int64_t s) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < s; ++j) m = std::max(m, x[j]);
  return m;
}

inline float Dot(const float* x, const float* y, int64_t d) {
  float sum = 0.f;
  for (int64_t j = 0; j < d; ++j) sum += x[j] * y[j];
  return sum;
}

inline void Transpose(const float* x, int64_t s, int64_t ld_x, int64_t d, float* out, int64_t ld_out) {
  for (int64_t i = 0; i < s; ++i) {
    for (int64_t j = 0; j < d; ++j) out[j * ld_out + i] = x[i * ld_x + j];
  }
}

#endif  // __AVX2__

// The q/k RMSNorm of attention_cpu.cc's packed form: rows [0, split) use the first stream's scales, the rest the
// second's; scales is (2 streams, 2 (q, k), D), dscales the item's (2, 2, D) share of their gradient.
struct Norm {
  const float* scales = nullptr;  // nullptr: no norm.
  int64_t split = 0;
  float eps = 0.f;
  int64_t offset(int64_t row, int which, int64_t d) const { return ((row < split ? 0 : 2) + which) * d; }
  const float* scale(int64_t row, int which, int64_t d) const { return scales + offset(row, which, d); }
};

// 1 / sqrt(mean(x^2) + eps) of one row, as rflow_jax/model/norms.py's rms_norm computes it.
inline float Rinv(const float* x, int64_t d, float eps) { return 1.f / std::sqrt(Dot(x, x, d) / d + eps); }

// Rows row0 ... of x (row stride ld; q if which = 0, else k) <- RMSNorm(x) * scale, in place.
inline void NormRows(float* x, int64_t rows, int64_t ld, int64_t row0, int which, const Norm& nm, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    float* xi = x + i * ld;
    const float r = Rinv(xi, d, nm.eps);
    const float* sc = nm.scale(row0 + i, which, d);
    for (int64_t j = 0; j < d; ++j) xi[j] *= r * sc[j];
  }
}

// RMSNorm's backward on rows row0 ...: g (row stride ldg) holds the gradient of the normed rows and becomes that of
// the raw rows x (row stride ldx): with h = x r, gs = g * scale: dx = r (gs - h mean(gs h)); dscale += g h.
inline void NormBackRows(float* g, int64_t ldg, const float* x, int64_t ldx, int64_t rows, int64_t row0, int which,
                  const Norm& nm, int64_t d, float* dscales) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * ldx;
    float* gi = g + i * ldg;
    const float r = Rinv(xi, d, nm.eps);
    const float* sc = nm.scale(row0 + i, which, d);
    float* ds = dscales + nm.offset(row0 + i, which, d);
    float dot = 0.f;
    for (int64_t j = 0; j < d; ++j) {
      ds[j] += gi[j] * xi[j] * r;
      dot += gi[j] * sc[j] * xi[j] * r;
    }
    const float mean = dot / d;
    for (int64_t j = 0; j < d; ++j) gi[j] = r * (gi[j] * sc[j] - xi[j] * r * mean);
  }
}

}  // namespace rflow_attention

#endif  // RFLOW_JAX_MODEL_NATIVE_KERNELS_H_
