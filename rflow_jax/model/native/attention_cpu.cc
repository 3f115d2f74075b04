// Unmasked softmax attention for XLA:CPU as two typed FFI handlers (forward and backward), float32.
//
// Layouts (row-major): q (B, T, N, D), k and v (B, S, N, D), out (B, T, N, D), lse (B, N, T); scale 1/sqrt(D).
// The algorithm is flash attention's (Dao et al. 2022, arXiv 2205.14135) with one simplification that CPUs allow:
// a block of kBr query rows is processed against all S keys at once (its kBr x S logits stay in L2 for S up to a
// few thousand), so the row softmax is exact and needs no online rescaling. The backward pass recomputes the
// probabilities from the saved log-sum-exp and uses rowsum(dO * O) instead of rowsum(P * dP) (Algorithm 4 there).
//
// Work items are (batch, head) pairs: a pair's dK and dV accumulate over its query blocks inside one item, so the
// items share nothing and run on XLA's intra-op thread pool without locks. Each item first packs its head's rows
// (strided by N * D in the inputs) into contiguous, 8-float-padded scratch so the small GEMMs read unit strides.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Query rows per block: a multiple of the micro-kernel's 6 rows; its kBr x S probabilities and their gradient stay
// in L2 (2 x 48 x 1056 floats = 400 KiB at S = 1056).
constexpr int64_t kBr = 48;
constexpr int64_t kMr = 6;  // Micro-kernel rows: 6 x 16 accumulators = 12 of AVX2's 16 vector registers.

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
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

// p[j] = exp(x[j] - shift) for j < s (in place); returns their sum.
float ExpShiftedSum(float* x, int64_t s, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= s; j += 8) {
    const __m256 p = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    _mm256_storeu_ps(x + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; j < s; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

float RowMax(const float* x, int64_t s) {
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

#else  // Portable fallback: plain loops (gcc vectorises the inner j loops at -O3).

void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
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

float ExpShiftedSum(float* x, int64_t s, float shift) {
  float sum = 0.f;
  for (int64_t j = 0; j < s; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

float RowMax(const float* x, int64_t s) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < s; ++j) m = std::max(m, x[j]);
  return m;
}

#endif  // __AVX2__

// ---------------------------------------------------------------------------------------------------------------
// Parallel loop over work items on XLA's intra-op pool. The calling thread claims items too, and waits only for
// items that some running thread has claimed, so it finishes even if the pool is busy, has one thread, or never
// runs the helpers; helpers that start after the last item was claimed find nothing and exit. The shared state is
// reference-counted so such late helpers never touch the caller's (by then dead) stack.
// ---------------------------------------------------------------------------------------------------------------

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

struct Loop {
  int64_t total = 0;
  size_t scratch_floats = 0;
  std::function<void(int64_t, float*)> work;  // work(item, scratch): scratch is per participating thread.
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

void Participate(Loop& loop) {
  std::unique_ptr<float, FreeDeleter> scratch;
  int64_t finished = 0;
  for (int64_t i; (i = loop.next.fetch_add(1)) < loop.total;) {
    if (!scratch) {
      const size_t bytes = RoundUp(static_cast<int64_t>(loop.scratch_floats * sizeof(float)), 64);
      scratch.reset(static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64))));
    }
    loop.work(i, scratch.get());
    ++finished;
  }
  if (finished == 0) return;
  std::lock_guard<std::mutex> lock(loop.mu);
  loop.done += finished;
  if (loop.done == loop.total) loop.cv.notify_all();
}

void ParallelFor(ffi::ThreadPool& pool, int64_t total, size_t scratch_floats,
                 std::function<void(int64_t, float*)> work) {
  auto loop = std::make_shared<Loop>();
  loop->total = total;
  loop->scratch_floats = scratch_floats;
  loop->work = std::move(work);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([loop] { Participate(*loop); });
  Participate(*loop);
  std::unique_lock<std::mutex> lock(loop->mu);
  loop->cv.wait(lock, [&] { return loop->done == loop->total; });
}

// ---------------------------------------------------------------------------------------------------------------
// Packing between the strided (B, L, N, D) inputs and contiguous per-head scratch.
// ---------------------------------------------------------------------------------------------------------------

struct Dims {
  int64_t b, t, s, n, d, dp, sp;  // dp, sp: D and S rounded up to 8 (row strides of the scratch).
};

// rows x dp <- x[.., row0 .. row0 + rows, h, :] * mul, zero in the padding columns.
void PackRows(const float* x, int64_t rows, int64_t row_stride, int64_t d, int64_t dp, float mul, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = x + i * row_stride;
    float* dst = out + i * dp;
    for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * mul;
    for (int64_t j = d; j < dp; ++j) dst[j] = 0.f;
  }
}

// d x sp <- transpose of x[.., 0 .. s, h, :], zero in the padding columns.
void PackTransposed(const float* x, int64_t s, int64_t row_stride, int64_t d, int64_t sp, float* out) {
  for (int64_t j = 0; j < d; ++j) std::fill(out + j * sp + s, out + (j + 1) * sp, 0.f);
  for (int64_t i = 0; i < s; ++i) {
    const float* src = x + i * row_stride;
    for (int64_t j = 0; j < d; ++j) out[j * sp + i] = src[j];
  }
}

void UnpackRows(const float* in, int64_t rows, int64_t dp, int64_t d, float mul, float* x, int64_t row_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = in + i * dp;
    float* dst = x + i * row_stride;
    for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * mul;
  }
}

bool ReadDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Dims* dims) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return false;
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return false;
  }
  if (qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3]) return false;
  *dims = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], RoundUp(qd[3], 8), RoundUp(kd[1], 8)};
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: per (batch, head), Kt (D x Sp) and V (S x Dp) packed once; per query block, logits = (q scale) K^T,
// P = exp(logits - rowmax), O = P V / rowsum, lse = rowmax + log(rowsum).
// ---------------------------------------------------------------------------------------------------------------

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  Dims m;
  if (!ReadDims(q, k, v, &m)) return ffi::Error::InvalidArgument("attention: expected q (B,T,N,D), k = v (B,S,N,D)");
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int64_t nd = m.n * m.d;
  const size_t kt_size = m.d * m.sp, v_size = m.s * m.dp, qb_size = kBr * m.dp, pb_size = kBr * m.sp;
  const size_t scratch = kt_size + v_size + 2 * qb_size + pb_size;
  ParallelFor(pool, m.b * m.n, scratch, [=](int64_t item, float* buf) {
    const int64_t b = item / m.n, h = item % m.n;
    float* kt = buf;
    float* vv = kt + kt_size;
    float* qb = vv + v_size;
    float* ob = qb + qb_size;
    float* pb = ob + qb_size;
    const int64_t kv_off = b * m.s * nd + h * m.d;
    PackTransposed(kp + kv_off, m.s, nd, m.d, m.sp, kt);
    PackRows(vp + kv_off, m.s, nd, m.d, m.dp, 1.f, vv);
    for (int64_t t0 = 0; t0 < m.t; t0 += kBr) {
      const int64_t rows = std::min(kBr, m.t - t0);
      const int64_t q_off = (b * m.t + t0) * nd + h * m.d;
      PackRows(qp + q_off, rows, nd, m.d, m.dp, scale, qb);
      Gemm(rows, m.sp, m.d, qb, m.dp, 1, kt, m.sp, pb, m.sp, false);
      float inv[kBr];
      for (int64_t i = 0; i < rows; ++i) {
        float* row = pb + i * m.sp;
        const float mx = RowMax(row, m.s);
        const float l = ExpShiftedSum(row, m.s, mx);
        std::fill(row + m.s, row + m.sp, 0.f);
        inv[i] = 1.f / l;
        lp[(b * m.n + h) * m.t + t0 + i] = mx + std::log(l);
      }
      Gemm(rows, m.dp, m.s, pb, m.sp, 1, vv, m.dp, ob, m.dp, false);
      for (int64_t i = 0; i < rows; ++i) UnpackRows(ob + i * m.dp, 1, m.dp, m.d, inv[i], op + q_off + i * nd, nd);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: per (batch, head), Kt, Vt (D x Sp), K (S x Dp) packed and dK, dV (S x Dp) accumulated over query
// blocks. Per block: P = exp((q scale) K^T - lse); dV += P^T dO; dP = dO V^T; dS = P (dP - rowsum(dO O));
// dQ = scale dS K; dK += dS^T (q scale).
// ---------------------------------------------------------------------------------------------------------------

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims m;
  if (!ReadDims(q, k, v, &m)) return ffi::Error::InvalidArgument("attention: expected q (B,T,N,D), k = v (B,S,N,D)");
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* opp = o.typed_data();
  const float* lp = lse.typed_data();
  const float* dop = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  const int64_t nd = m.n * m.d;
  const size_t t_size = m.d * m.sp, r_size = m.s * m.dp, qb_size = kBr * m.dp, pb_size = kBr * m.sp;
  const size_t scratch = 2 * t_size + 3 * r_size + 3 * qb_size + 2 * pb_size;
  ParallelFor(pool, m.b * m.n, scratch, [=](int64_t item, float* buf) {
    const int64_t b = item / m.n, h = item % m.n;
    float* kt = buf;
    float* vt = kt + t_size;
    float* kk = vt + t_size;
    float* dkb = kk + r_size;
    float* dvb = dkb + r_size;
    float* qb = dvb + r_size;
    float* dob = qb + qb_size;
    float* dqb = dob + qb_size;
    float* pb = dqb + qb_size;
    float* dsb = pb + pb_size;
    const int64_t kv_off = b * m.s * nd + h * m.d;
    PackTransposed(kp + kv_off, m.s, nd, m.d, m.sp, kt);
    PackTransposed(vp + kv_off, m.s, nd, m.d, m.sp, vt);
    PackRows(kp + kv_off, m.s, nd, m.d, m.dp, 1.f, kk);
    std::fill(dkb, dkb + 2 * r_size, 0.f);  // dK and dV.
    for (int64_t t0 = 0; t0 < m.t; t0 += kBr) {
      const int64_t rows = std::min(kBr, m.t - t0);
      const int64_t q_off = (b * m.t + t0) * nd + h * m.d;
      const float* lse_row = lp + (b * m.n + h) * m.t + t0;
      PackRows(qp + q_off, rows, nd, m.d, m.dp, scale, qb);
      PackRows(dop + q_off, rows, nd, m.d, m.dp, 1.f, dob);
      float delta[kBr];  // rowsum(dO * O) = rowsum(P * dP).
      for (int64_t i = 0; i < rows; ++i) {
        const float* oi = opp + q_off + i * nd;
        const float* doi = dob + i * m.dp;
        float acc = 0.f;
        for (int64_t j = 0; j < m.d; ++j) acc += doi[j] * oi[j];
        delta[i] = acc;
      }
      Gemm(rows, m.sp, m.d, qb, m.dp, 1, kt, m.sp, pb, m.sp, false);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = pb + i * m.sp;
        ExpShiftedSum(row, m.s, lse_row[i]);
        std::fill(row + m.s, row + m.sp, 0.f);
      }
      Gemm(m.s, m.dp, rows, pb, 1, m.sp, dob, m.dp, dvb, m.dp, true);     // dV += P^T dO
      Gemm(rows, m.sp, m.d, dob, m.dp, 1, vt, m.sp, dsb, m.sp, false);    // dP = dO V^T
      for (int64_t i = 0; i < rows; ++i) {                                // dS = P (dP - delta); 0 in padding.
        const float* p = pb + i * m.sp;
        float* ds = dsb + i * m.sp;
        const float di = delta[i];
        for (int64_t j = 0; j < m.sp; ++j) ds[j] = p[j] * (ds[j] - di);
      }
      Gemm(rows, m.dp, m.s, dsb, m.sp, 1, kk, m.dp, dqb, m.dp, false);    // dQ / scale = dS K
      UnpackRows(dqb, rows, m.dp, m.d, scale, dqp + q_off, nd);
      Gemm(m.s, m.dp, rows, dsb, 1, m.sp, qb, m.dp, dkb, m.dp, true);     // dK += dS^T (q scale)
    }
    UnpackRows(dkb, m.s, m.dp, m.d, 1.f, dkp + kv_off, nd);
    UnpackRows(dvb, m.s, m.dp, m.d, 1.f, dvp + kv_off, nd);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
