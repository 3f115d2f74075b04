// Unmasked softmax attention for XLA:CPU as two typed FFI handlers (forward and backward), float32.
//
// Layouts (row-major): q (B, T, N, D), k and v (B, S, N, D), out (B, T, N, D), lse (B, N, T); scale 1/sqrt(D).
// The algorithm is flash attention's (Dao et al. 2022, arXiv 2205.14135) with one simplification that CPUs allow:
// a block of kBr query rows is processed against all S keys at once (its kBr x S logits stay in L2 for S up to a
// few thousand), so the row softmax is exact and needs no online rescaling. The backward pass recomputes the
// probabilities from the saved log-sum-exp and uses rowsum(dO * O) instead of rowsum(P * dP) (Algorithm 4 there).
//
// The packed forms read q, k, v from one (B, S, 3, N, D) buffer (row stride 3 N D) and write dQ, dK, dV into one
// such buffer; the packed-norm form also applies the q/k RMSNorm of two token ranges (streams) as it packs q and K,
// and the norm's backward to dQ and dK before writing them (see Norm).
//
// Work items are (batch, head) pairs: a pair's dK and dV accumulate over its query blocks inside one item, so the
// items share nothing and run on XLA's intra-op thread pool without locks. Each item packs what its GEMMs stream
// (K^T, V^T, K, V, dO and q blocks; see "Operands") into contiguous, 8-float-padded per-thread scratch.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace rflow_attention {
namespace {

using rflow_native::ParallelFor;
using rflow_native::RoundUp;

// Query rows per block: a multiple of the micro-kernel's 6 rows; its kBr x S probabilities and their gradient stay
// in L2 (2 x 48 x 1056 floats = 400 KiB at S = 1056).
constexpr int64_t kBr = 48;

// ---------------------------------------------------------------------------------------------------------------
// Operands. Every operand a GEMM streams is a contiguous copy with row stride Dp = RoundUp(D, 8), zero-padded:
// K^T and V^T (D x Sp) and K, V once per (batch, head), the q and dO blocks once per query block, and the dK, dV
// accumulators. In place, rows N * D * 4 bytes apart (2 KiB at N * D = 512) map to a handful of L1 and L2 sets and
// evict each other (packing made P V and P^T dO ~1.5x faster at T = S = 288). The per-block outputs O and dQ are
// written in place when D is a multiple of 8 (a C tile touches only 6 rows), else via scratch. The scale 1/sqrt(D)
// is applied to the logits inside the exp and folded into dS, so q is never scaled.
// ---------------------------------------------------------------------------------------------------------------

struct Dims {
  // dp, sp: D and S rounded up to 8; nd = N * D, the row stride of out, dout and lse's rows; li: the row stride of
  // q, k, v and their gradients (nd, or 3 * nd where they are slices of one packed (B, S, 3, N, D) buffer).
  int64_t b, t, s, n, d, dp, sp, nd, li;
  bool direct() const { return dp == d; }
};

// The q/k RMSNorm of the packed-norm form (see ReadPacked): rows [0, split) use the first stream's scales, the rest
// the second's; scales is (2 streams, 2 (q, k), D), dscales the item's (2, 2, D) share of their gradient.
struct Norm {
  const float* scales = nullptr;  // nullptr: no norm.
  int64_t split = 0;
  float eps = 0.f;
  const float* scale(int64_t row, int which, int64_t d) const { return scales + ((row < split ? 0 : 2) + which) * d; }
  int64_t offset(int64_t row, int which, int64_t d) const { return ((row < split ? 0 : 2) + which) * d; }
};

// 1 / sqrt(mean(x^2) + eps) of one row, as layers.rms_norm computes it.
float Rinv(const float* x, int64_t d, float eps) { return 1.f / std::sqrt(Dot(x, x, d) / d + eps); }

// Rows row0 ... of x (row stride ld; q if which = 0, else k) <- RMSNorm(x) * scale, in place.
void NormRows(float* x, int64_t rows, int64_t ld, int64_t row0, int which, const Norm& nm, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    float* xi = x + i * ld;
    const float r = Rinv(xi, d, nm.eps);
    const float* sc = nm.scale(row0 + i, which, d);
    for (int64_t j = 0; j < d; ++j) xi[j] *= r * sc[j];
  }
}

// RMSNorm's backward on rows row0 ...: g (row stride ldg) holds the gradient of the normed rows and becomes that of
// the raw rows x (row stride ldx): with h = x r, gs = g * scale: dx = r (gs - h mean(gs h)); dscale += g h.
void NormBackRows(float* g, int64_t ldg, const float* x, int64_t ldx, int64_t rows, int64_t row0, int which,
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

struct View {
  float* p;
  int64_t ld;
};

// rows x dp scratch <- rows of x (stride ld), zero in the padding columns.
void CopyIn(const float* x, int64_t rows, int64_t ld, const Dims& m, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(x + i * ld, x + i * ld + m.d, out + i * m.dp);
    std::fill(out + i * m.dp + m.d, out + (i + 1) * m.dp, 0.f);
  }
}

// A padded contiguous copy of `rows` rows of x (row stride ld), as a GEMM operand (see "Operands").
View In(const float* x, int64_t rows, int64_t ld, const Dims& m, float* scratch) {
  CopyIn(x, rows, ld, m, scratch);
  return {scratch, m.dp};
}

// The D x Sp transpose of a (batch, head)'s S rows of x (K or V; row stride ld), zero in the padding columns.
void InTransposed(const float* x, int64_t ld, const Dims& m, float* out) {
  Transpose(x, m.s, ld, m.d, out, m.sp);
  for (int64_t j = 0; j < m.d; ++j) std::fill(out + j * m.sp + m.s, out + (j + 1) * m.sp, 0.f);
}

// A C operand for rows of x (row stride ld): x itself when D is a multiple of 8, else `scratch` (see CopyOut).
View Out(float* x, int64_t ld, const Dims& m, float* scratch) {
  return m.direct() ? View{x, ld} : View{scratch, m.dp};
}

// x rows (row stride ld) <- c rows * mul[i] (or 1): in place when c is x itself.
void CopyOut(View c, int64_t rows, const float* mul, int64_t ld, const Dims& m, float* x) {
  for (int64_t i = 0; i < rows; ++i) {
    const float f = mul ? mul[i] : 1.f;
    for (int64_t j = 0; j < m.d; ++j) x[i * ld + j] = c.p[i * c.ld + j] * f;
  }
}

bool ReadDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Dims* dims) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return false;
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return false;
  }
  if (qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3]) return false;
  *dims = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], RoundUp(qd[3], 8), RoundUp(kd[1], 8), qd[2] * qd[3], qd[2] * qd[3]};
  return true;
}

// The packed form: self-attention over one (B, S, 3, N, D) buffer of q, k and v, the layout the joint block's fused
// q/k-norm + concatenation writes, so that no slice of it is copied out for the kernel.
bool ReadPacked(ffi::Buffer<ffi::F32>& qkv, Dims* dims) {
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3) return false;
  const int64_t nd = d[3] * d[4];
  *dims = Dims{d[0], d[1], d[1], d[3], d[4], RoundUp(d[4], 8), RoundUp(d[1], 8), nd, 3 * nd};
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, per (batch, head): K^T (D x Sp) packed once; per block of query rows, L = q K^T, P = exp(scale L - m)
// with m the row max of scale L, O = P V / rowsum(P), lse = m + log(rowsum(P)).
// ---------------------------------------------------------------------------------------------------------------

struct FwdArgs {
  Dims m;
  Norm nm;
  const float *q, *k, *v;
  float *out, *lse;
};

size_t FwdScratch(const Dims& m) { return m.d * m.sp + 2 * m.s * m.dp + kBr * (2 * m.dp + m.sp); }

void FwdItem(const FwdArgs& a, int64_t item, float* buf) {
  const Dims& m = a.m;
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const int64_t b = item / m.n, h = item % m.n;
  float *kt = buf, *vs = kt + m.d * m.sp, *ob = vs + m.s * m.dp, *qs = ob + kBr * m.dp, *pb = qs + kBr * m.dp;
  float* ks = pb + kBr * m.sp;
  const int64_t kv_off = b * m.s * m.li + h * m.d;
  if (a.nm.scales) {  // K^T of the normed rows.
    const View kk = In(a.k + kv_off, m.s, m.li, m, ks);
    NormRows(kk.p, m.s, kk.ld, 0, 1, a.nm, m.d);
    InTransposed(kk.p, kk.ld, m, kt);
  } else {
    InTransposed(a.k + kv_off, m.li, m, kt);
  }
  const View vv = In(a.v + kv_off, m.s, m.li, m, vs);
  for (int64_t t0 = 0; t0 < m.t; t0 += kBr) {
    const int64_t rows = std::min(kBr, m.t - t0);
    const int64_t q_off = (b * m.t + t0) * m.li + h * m.d, o_off = (b * m.t + t0) * m.nd + h * m.d;
    const View qb = In(a.q + q_off, rows, m.li, m, qs);
    if (a.nm.scales) NormRows(qb.p, rows, qb.ld, t0, 0, a.nm, m.d);
    Gemm(rows, m.sp, m.d, qb.p, qb.ld, 1, kt, m.sp, pb, m.sp, false);
    float inv[kBr];
    for (int64_t i = 0; i < rows; ++i) {
      float* row = pb + i * m.sp;
      const float mx = scale * RowMax(row, m.s);
      const float l = ExpShiftedSum(row, m.s, scale, mx);
      std::fill(row + m.s, row + m.sp, 0.f);
      inv[i] = 1.f / l;
      a.lse[(b * m.n + h) * m.t + t0 + i] = mx + std::log(l);
    }
    const View o = Out(a.out + o_off, m.nd, m, ob);
    Gemm(rows, m.dp, m.s, pb, m.sp, 1, vv.p, vv.ld, o.p, o.ld, false);
    CopyOut(o, rows, inv, m.nd, m, a.out + o_off);
  }
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  FwdArgs a;
  if (!ReadDims(q, k, v, &a.m)) return ffi::Error::InvalidArgument("attention: expected q (B,T,N,D), k = v (B,S,N,D)");
  a.q = q.typed_data(), a.k = k.typed_data(), a.v = v.typed_data(), a.out = out->typed_data();
  a.lse = lse->typed_data();
  ParallelFor(pool, a.m.b * a.m.n, FwdScratch(a.m), [a](int64_t item, float* buf) { FwdItem(a, item, buf); });
  return ffi::Error::Success();
}

ffi::Error PackedFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> lse) {
  FwdArgs a;
  if (!ReadPacked(qkv, &a.m)) return ffi::Error::InvalidArgument("attention: expected qkv (B,S,3,N,D)");
  a.q = qkv.typed_data(), a.k = a.q + a.m.nd, a.v = a.k + a.m.nd, a.out = out->typed_data();
  a.lse = lse->typed_data();
  ParallelFor(pool, a.m.b * a.m.n, FwdScratch(a.m), [a](int64_t item, float* buf) { FwdItem(a, item, buf); });
  return ffi::Error::Success();
}

// The packed form with the q/k RMSNorm fused in: qkv holds the raw projections, scales the (2, 2, D) norm scales.
ffi::Error PackedNormFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scales,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t split,
                             float eps) {
  FwdArgs a;
  if (!ReadPacked(qkv, &a.m)) return ffi::Error::InvalidArgument("attention: expected qkv (B,S,3,N,D)");
  if (scales.element_count() != 4 * a.m.d) return ffi::Error::InvalidArgument("attention: expected scales (2,2,D)");
  a.nm = Norm{scales.typed_data(), split, eps};
  a.q = qkv.typed_data(), a.k = a.q + a.m.nd, a.v = a.k + a.m.nd, a.out = out->typed_data();
  a.lse = lse->typed_data();
  ParallelFor(pool, a.m.b * a.m.n, FwdScratch(a.m), [a](int64_t item, float* buf) { FwdItem(a, item, buf); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, per (batch, head): K^T, V^T (D x Sp) and K packed once, dK and dV accumulated in scratch over the query
// blocks. Per block: P = exp(scale q K^T - lse); dV += P^T dO; dP = dO V^T;
// dS = scale P (dP - rowsum(dO O)); dQ = dS K; dK += dS^T q.
// ---------------------------------------------------------------------------------------------------------------

struct BwdArgs {
  Dims m;
  Norm nm;
  const float *q, *k, *v, *out, *lse, *dout;
  float *dq, *dk, *dv, *dscales;  // dscales: (B * N, 2, 2, D), each item's share (packed-norm form only).
};

size_t BwdScratch(const Dims& m) {
  return 2 * m.d * m.sp + 3 * (m.s + kBr) * m.dp + 2 * kBr * m.sp;
}

void BwdItem(const BwdArgs& a, int64_t item, float* buf) {
  const Dims& m = a.m;
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const int64_t b = item / m.n, h = item % m.n;
  const size_t t_size = m.d * m.sp, r_size = m.s * m.dp, b_size = kBr * m.dp;
  float *kt = buf, *vt = kt + t_size, *ks = vt + t_size, *dks = ks + r_size, *dvs = dks + r_size;
  float *qs = dvs + r_size, *dos = qs + b_size, *dqs = dos + b_size, *pb = dqs + b_size, *dsb = pb + kBr * m.sp;
  const int64_t kv_off = b * m.s * m.li + h * m.d;
  const View kk = In(a.k + kv_off, m.s, m.li, m, ks);
  float* dscales = a.nm.scales ? a.dscales + item * 4 * m.d : nullptr;
  if (dscales) {
    std::fill(dscales, dscales + 4 * m.d, 0.f);
    NormRows(kk.p, m.s, kk.ld, 0, 1, a.nm, m.d);
  }
  InTransposed(kk.p, kk.ld, m, kt);
  InTransposed(a.v + kv_off, m.li, m, vt);
  const View dkv{dks, m.dp}, dvv{dvs, m.dp};  // In scratch: in place they would thrash as B operands would (In).
  for (int64_t i = 0; i < m.s; ++i) {
    std::fill(dkv.p + i * dkv.ld, dkv.p + i * dkv.ld + m.dp, 0.f);
    std::fill(dvv.p + i * dvv.ld, dvv.p + i * dvv.ld + m.dp, 0.f);
  }
  for (int64_t t0 = 0; t0 < m.t; t0 += kBr) {
    const int64_t rows = std::min(kBr, m.t - t0);
    const int64_t q_off = (b * m.t + t0) * m.li + h * m.d, o_off = (b * m.t + t0) * m.nd + h * m.d;
    const float* lse_row = a.lse + (b * m.n + h) * m.t + t0;
    const View qb = In(a.q + q_off, rows, m.li, m, qs), dob = In(a.dout + o_off, rows, m.nd, m, dos);
    if (dscales) NormRows(qb.p, rows, qb.ld, t0, 0, a.nm, m.d);
    float delta[kBr];  // rowsum(dO * O) = rowsum(P * dP).
    for (int64_t i = 0; i < rows; ++i) delta[i] = Dot(dob.p + i * dob.ld, a.out + o_off + i * m.nd, m.d);
    Gemm(rows, m.sp, m.d, qb.p, qb.ld, 1, kt, m.sp, pb, m.sp, false);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = pb + i * m.sp;
      ExpShiftedSum(row, m.s, scale, lse_row[i]);
      std::fill(row + m.s, row + m.sp, 0.f);
    }
    Gemm(m.s, m.dp, rows, pb, 1, m.sp, dob.p, dob.ld, dvv.p, dvv.ld, true);    // dV += P^T dO
    Gemm(rows, m.sp, m.d, dob.p, dob.ld, 1, vt, m.sp, dsb, m.sp, false);  // dP = dO V^T
    for (int64_t i = 0; i < rows; ++i) {  // dS = scale P (dP - delta): 0 in the padding columns, as P.
      const float* p = pb + i * m.sp;
      float* ds = dsb + i * m.sp;
      const float di = delta[i];
      for (int64_t j = 0; j < m.sp; ++j) ds[j] = scale * p[j] * (ds[j] - di);
    }
    const View dqv = Out(a.dq + q_off, m.li, m, dqs);
    Gemm(rows, m.dp, m.s, dsb, m.sp, 1, kk.p, kk.ld, dqv.p, dqv.ld, false);  // dQ = dS K
    if (dscales) NormBackRows(dqv.p, dqv.ld, a.q + q_off, m.li, rows, t0, 0, a.nm, m.d, dscales);
    if (!m.direct()) CopyOut(dqv, rows, nullptr, m.li, m, a.dq + q_off);
    Gemm(m.s, m.dp, rows, dsb, 1, m.sp, qb.p, qb.ld, dkv.p, dkv.ld, true);  // dK += dS^T q
  }
  if (dscales) NormBackRows(dkv.p, dkv.ld, a.k + kv_off, m.li, m.s, 0, 1, a.nm, m.d, dscales);
  CopyOut(dkv, m.s, nullptr, m.li, m, a.dk + kv_off);
  CopyOut(dvv, m.s, nullptr, m.li, m, a.dv + kv_off);
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  BwdArgs a;
  if (!ReadDims(q, k, v, &a.m)) return ffi::Error::InvalidArgument("attention: expected q (B,T,N,D), k = v (B,S,N,D)");
  a.q = q.typed_data(), a.k = k.typed_data(), a.v = v.typed_data(), a.out = o.typed_data();
  a.lse = lse.typed_data(), a.dout = dout.typed_data();
  a.dq = dq->typed_data(), a.dk = dk->typed_data(), a.dv = dv->typed_data();
  ParallelFor(pool, a.m.b * a.m.n, BwdScratch(a.m), [a](int64_t item, float* buf) { BwdItem(a, item, buf); });
  return ffi::Error::Success();
}

ffi::Error PackedBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> o,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv) {
  BwdArgs a;
  if (!ReadPacked(qkv, &a.m)) return ffi::Error::InvalidArgument("attention: expected qkv (B,S,3,N,D)");
  a.q = qkv.typed_data(), a.k = a.q + a.m.nd, a.v = a.k + a.m.nd, a.out = o.typed_data();
  a.lse = lse.typed_data(), a.dout = dout.typed_data();
  a.dq = dqkv->typed_data(), a.dk = a.dq + a.m.nd, a.dv = a.dk + a.m.nd;
  ParallelFor(pool, a.m.b * a.m.n, BwdScratch(a.m), [a](int64_t item, float* buf) { BwdItem(a, item, buf); });
  return ffi::Error::Success();
}

ffi::Error PackedNormBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scales,
                             ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dqkv, ffi::ResultBuffer<ffi::F32> dscales, int64_t split,
                             float eps) {
  BwdArgs a;
  if (!ReadPacked(qkv, &a.m)) return ffi::Error::InvalidArgument("attention: expected qkv (B,S,3,N,D)");
  if (scales.element_count() != 4 * a.m.d) return ffi::Error::InvalidArgument("attention: expected scales (2,2,D)");
  a.nm = Norm{scales.typed_data(), split, eps};
  a.q = qkv.typed_data(), a.k = a.q + a.m.nd, a.v = a.k + a.m.nd, a.out = o.typed_data();
  a.lse = lse.typed_data(), a.dout = dout.typed_data();
  a.dq = dqkv->typed_data(), a.dk = a.dq + a.m.nd, a.dv = a.dk + a.m.nd, a.dscales = dscales->typed_data();
  ParallelFor(pool, a.m.b * a.m.n, BwdScratch(a.m), [a](int64_t item, float* buf) { BwdItem(a, item, buf); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace rflow_attention

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionFwd, rflow_attention::AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionBwd, rflow_attention::AttentionBwdImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionPackedFwd, rflow_attention::PackedFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionPackedBwd, rflow_attention::PackedBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionPackedNormFwd, rflow_attention::PackedNormFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("split")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionPackedNormBwd, rflow_attention::PackedNormBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("split")
                                  .Attr<float>("eps"));
