// Unmasked softmax attention for XLA:CPU as two typed FFI handlers (forward and backward), float32.
//
// Layouts (row-major): q (B, T, N, D), k and v (B, S, N, D), out (B, T, N, D), lse (B, N, T); scale 1/sqrt(D).
// The algorithm is flash attention's (Dao et al. 2022, arXiv 2205.14135) with one simplification that CPUs allow:
// a block of kBr query rows is processed against all S keys at once (its kBr x S logits stay in L2 for S up to a
// few thousand), so the row softmax is exact and needs no online rescaling. The backward pass recomputes the
// probabilities from the saved log-sum-exp and uses rowsum(dO * O) instead of rowsum(P * dP) (Algorithm 4 there).
//
// The packed form reads q, k, v in place from the joint block's two streams' (B, T_i, 3, N, D) qkv projections (row
// stride 3 N D), attends over their concatenated rows, and writes each stream's output and dq/dk/dv into its own
// buffers; so the block never materialises the concatenation or its slices. It can also apply the q/k RMSNorm of
// each stream as it packs q and K, and the norm's backward to dQ and dK before writing them (Norm, kernels.h).
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
  // t, s: query and key rows in all; dp, sp: D and S rounded up to 8; nd = N * D, the row stride of out and dout.
  int64_t b, t, s, n, d, dp, sp, nd;
  bool direct() const { return dp == d; }
};

// Segments: the query rows, and the key rows, come in up to two token ranges (the joint block's two streams), each
// in its own buffers. Row i (of `rows` per batch) of batch b, head h of a segment's q, k, v, dq, dk or dv is at
// (b * rows + i) * ld + h * D in its buffer (ld: N * D, or 3 * N * D in a packed (B, T, 3, N, D) q/k/v buffer), and
// of its out or dout at (b * rows + i) * N * D + h * D. row0 is the segment's first row among all query (key) rows.
struct QSeg {
  int64_t rows = 0, row0 = 0, ld = 0;
  const float *q = nullptr, *o = nullptr, *dout = nullptr;  // o, dout: the backward pass's inputs.
  float *out = nullptr, *dq = nullptr;
  int64_t In(int64_t b, int64_t i, int64_t h, int64_t d) const { return (b * rows + i) * ld + h * d; }
  int64_t Out(int64_t b, int64_t i, int64_t h, int64_t d, int64_t nd) const { return (b * rows + i) * nd + h * d; }
};

struct KSeg {
  int64_t rows = 0, row0 = 0, ld = 0;
  const float *k = nullptr, *v = nullptr;
  float *dk = nullptr, *dv = nullptr;
  int64_t In(int64_t b, int64_t h, int64_t d) const { return b * rows * ld + h * d; }
};

struct Segs {
  QSeg q[2];
  KSeg k[2];
  int nq = 0, nk = 0;
};

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
  *dims = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], RoundUp(qd[3], 8), RoundUp(kd[1], 8), qd[2] * qd[3]};
  return true;
}

// The separate q, k, v form: one query segment (T rows) and one key segment (S rows), row stride N * D.
Segs Separate(const Dims& m, const float* q, const float* k, const float* v) {
  Segs g;
  g.nq = g.nk = 1;
  g.q[0].rows = m.t, g.q[0].ld = m.nd, g.q[0].q = q;
  g.k[0].rows = m.s, g.k[0].ld = m.nd, g.k[0].k = k, g.k[0].v = v;
  return g;
}

// The packed form: self-attention over the concatenated rows of two (B, T_i, 3, N, D) q/k/v buffers (the joint
// block's streams, as their qkv projections come out; T_0 > 0, T_1 may be 0), read in place. Segment j of the
// query and of the key rows is stream j's (an empty stream 1 has none).
bool ReadPacked(ffi::Buffer<ffi::F32>& x0, ffi::Buffer<ffi::F32>& x1, Dims* dims, Segs* g) {
  auto d0 = x0.dimensions(), d1 = x1.dimensions();
  if (d0.size() != 5 || d1.size() != 5 || d0[2] != 3 || d0[1] == 0) return false;
  for (int i : {0, 2, 3, 4}) {
    if (d0[i] != d1[i]) return false;
  }
  const int64_t nd = d0[3] * d0[4], s = d0[1] + d1[1];
  *dims = Dims{d0[0], s, s, d0[3], d0[4], RoundUp(d0[4], 8), RoundUp(s, 8), nd};
  const float* base[2] = {x0.typed_data(), x1.typed_data()};
  const int64_t rows[2] = {d0[1], d1[1]};
  *g = Segs{};
  for (int i = 0, row0 = 0; i < 2; row0 += rows[i], ++i) {
    if (rows[i] == 0) continue;
    QSeg& q = g->q[g->nq++];
    q.rows = rows[i], q.row0 = row0, q.ld = 3 * nd, q.q = base[i];
    KSeg& k = g->k[g->nk++];
    k.rows = rows[i], k.row0 = row0, k.ld = 3 * nd, k.k = base[i] + nd, k.v = base[i] + 2 * nd;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, per (batch, head): K (normed) and V packed once, K^T from K; per block of query rows of each segment,
// L = q K^T, P = exp(scale L - m) with m the row max of scale L, O = P V / rowsum(P), lse = m + log(rowsum(P)).
// ---------------------------------------------------------------------------------------------------------------

struct FwdArgs {
  Dims m;
  Norm nm;
  Segs g;
  float* lse;
};

size_t FwdScratch(const Dims& m) { return m.d * m.sp + 2 * m.s * m.dp + kBr * (2 * m.dp + m.sp); }

void FwdItem(const FwdArgs& a, int64_t item, float* buf) {
  const Dims& m = a.m;
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const int64_t b = item / m.n, h = item % m.n;
  float *kt = buf, *vs = kt + m.d * m.sp, *ob = vs + m.s * m.dp, *qs = ob + kBr * m.dp, *pb = qs + kBr * m.dp;
  float* ks = pb + kBr * m.sp;
  for (int j = 0; j < a.g.nk; ++j) {
    const KSeg& kg = a.g.k[j];
    CopyIn(kg.k + kg.In(b, h, m.d), kg.rows, kg.ld, m, ks + kg.row0 * m.dp);
    CopyIn(kg.v + kg.In(b, h, m.d), kg.rows, kg.ld, m, vs + kg.row0 * m.dp);
  }
  if (a.nm.scales) NormRows(ks, m.s, m.dp, 0, 1, a.nm, m.d);
  InTransposed(ks, m.dp, m, kt);
  const View vv{vs, m.dp};
  for (int j = 0; j < a.g.nq; ++j) {
    const QSeg& qg = a.g.q[j];
    for (int64_t t0 = 0; t0 < qg.rows; t0 += kBr) {
      const int64_t rows = std::min(kBr, qg.rows - t0), row = qg.row0 + t0;
      float* out = qg.out + qg.Out(b, t0, h, m.d, m.nd);
      const View qb = In(qg.q + qg.In(b, t0, h, m.d), rows, qg.ld, m, qs);
      if (a.nm.scales) NormRows(qb.p, rows, qb.ld, row, 0, a.nm, m.d);
      Gemm(rows, m.sp, m.d, qb.p, qb.ld, 1, kt, m.sp, pb, m.sp, false);
      float inv[kBr];
      for (int64_t i = 0; i < rows; ++i) {
        float* p = pb + i * m.sp;
        const float mx = scale * RowMax(p, m.s);
        const float l = ExpShiftedSum(p, m.s, scale, mx);
        std::fill(p + m.s, p + m.sp, 0.f);
        inv[i] = 1.f / l;
        a.lse[(b * m.n + h) * m.t + row + i] = mx + std::log(l);
      }
      const View o = Out(out, m.nd, m, ob);
      Gemm(rows, m.dp, m.s, pb, m.sp, 1, vv.p, vv.ld, o.p, o.ld, false);
      CopyOut(o, rows, inv, m.nd, m, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, per (batch, head): K (normed), K^T and V^T packed once, dK and dV accumulated in scratch over the query
// blocks. Per block: P = exp(scale q K^T - lse); dV += P^T dO; dP = dO V^T; dS = scale P (dP - rowsum(dO O));
// dQ = dS K; dK += dS^T q. With the norm, dQ and (at the end) dK go through its backward before they are written.
// ---------------------------------------------------------------------------------------------------------------

struct BwdArgs {
  Dims m;
  Norm nm;
  Segs g;
  const float* lse;
  float* dscales;  // (B * N, 2, 2, D): each item's share (packed form with the norm only).
};

size_t BwdScratch(const Dims& m) { return 2 * m.d * m.sp + 3 * (m.s + kBr) * m.dp + 2 * kBr * m.sp; }

void BwdItem(const BwdArgs& a, int64_t item, float* buf) {
  const Dims& m = a.m;
  const float scale = 1.f / std::sqrt(static_cast<float>(m.d));
  const int64_t b = item / m.n, h = item % m.n;
  const size_t t_size = m.d * m.sp, r_size = m.s * m.dp, b_size = kBr * m.dp;
  float *kt = buf, *vt = kt + t_size, *ks = vt + t_size, *dks = ks + r_size, *dvs = dks + r_size;
  float *qs = dvs + r_size, *dos = qs + b_size, *dqs = dos + b_size, *pb = dqs + b_size, *dsb = pb + kBr * m.sp;
  for (int j = 0; j < a.g.nk; ++j) {
    const KSeg& kg = a.g.k[j];
    CopyIn(kg.k + kg.In(b, h, m.d), kg.rows, kg.ld, m, ks + kg.row0 * m.dp);
    Transpose(kg.v + kg.In(b, h, m.d), kg.rows, kg.ld, m.d, vt + kg.row0, m.sp);
  }
  for (int64_t j = 0; j < m.d; ++j) std::fill(vt + j * m.sp + m.s, vt + (j + 1) * m.sp, 0.f);
  float* dscales = a.nm.scales ? a.dscales + item * 4 * m.d : nullptr;
  if (dscales) {
    std::fill(dscales, dscales + 4 * m.d, 0.f);
    NormRows(ks, m.s, m.dp, 0, 1, a.nm, m.d);
  }
  InTransposed(ks, m.dp, m, kt);
  const View kk{ks, m.dp}, dkv{dks, m.dp}, dvv{dvs, m.dp};  // dK, dV in scratch: in place they would thrash (In).
  std::fill(dks, dks + 2 * r_size, 0.f);
  for (int j = 0; j < a.g.nq; ++j) {
    const QSeg& qg = a.g.q[j];
    for (int64_t t0 = 0; t0 < qg.rows; t0 += kBr) {
      const int64_t rows = std::min(kBr, qg.rows - t0), row = qg.row0 + t0;
      const int64_t q_off = qg.In(b, t0, h, m.d), o_off = qg.Out(b, t0, h, m.d, m.nd);
      const float* lse_row = a.lse + (b * m.n + h) * m.t + row;
      const View qb = In(qg.q + q_off, rows, qg.ld, m, qs), dob = In(qg.dout + o_off, rows, m.nd, m, dos);
      if (dscales) NormRows(qb.p, rows, qb.ld, row, 0, a.nm, m.d);
      float delta[kBr];  // rowsum(dO * O) = rowsum(P * dP).
      for (int64_t i = 0; i < rows; ++i) delta[i] = Dot(dob.p + i * dob.ld, qg.o + o_off + i * m.nd, m.d);
      Gemm(rows, m.sp, m.d, qb.p, qb.ld, 1, kt, m.sp, pb, m.sp, false);
      for (int64_t i = 0; i < rows; ++i) {
        float* p = pb + i * m.sp;
        ExpShiftedSum(p, m.s, scale, lse_row[i]);
        std::fill(p + m.s, p + m.sp, 0.f);
      }
      Gemm(m.s, m.dp, rows, pb, 1, m.sp, dob.p, dob.ld, dvv.p, dvv.ld, true);    // dV += P^T dO
      Gemm(rows, m.sp, m.d, dob.p, dob.ld, 1, vt, m.sp, dsb, m.sp, false);  // dP = dO V^T
      for (int64_t i = 0; i < rows; ++i) {  // dS = scale P (dP - delta): 0 in the padding columns, as P.
        const float* p = pb + i * m.sp;
        float* ds = dsb + i * m.sp;
        const float di = delta[i];
        for (int64_t c = 0; c < m.sp; ++c) ds[c] = scale * p[c] * (ds[c] - di);
      }
      float* dq = qg.dq + q_off;
      const View dqv = Out(dq, qg.ld, m, dqs);
      Gemm(rows, m.dp, m.s, dsb, m.sp, 1, kk.p, kk.ld, dqv.p, dqv.ld, false);  // dQ = dS K
      if (dscales) NormBackRows(dqv.p, dqv.ld, qg.q + q_off, qg.ld, rows, row, 0, a.nm, m.d, dscales);
      if (!m.direct()) CopyOut(dqv, rows, nullptr, qg.ld, m, dq);
      Gemm(m.s, m.dp, rows, dsb, 1, m.sp, qb.p, qb.ld, dkv.p, dkv.ld, true);  // dK += dS^T q
    }
  }
  for (int j = 0; j < a.g.nk; ++j) {
    const KSeg& kg = a.g.k[j];
    const int64_t off = kg.In(b, h, m.d);
    const View dk{dkv.p + kg.row0 * dkv.ld, dkv.ld}, dv{dvv.p + kg.row0 * dvv.ld, dvv.ld};
    if (dscales) NormBackRows(dk.p, dk.ld, kg.k + off, kg.ld, kg.rows, kg.row0, 1, a.nm, m.d, dscales);
    CopyOut(dk, kg.rows, nullptr, kg.ld, m, kg.dk + off);
    CopyOut(dv, kg.rows, nullptr, kg.ld, m, kg.dv + off);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// FFI handlers: the separate form (q, k, v; T may differ from S) and the packed form (two streams' (B, T_i, 3, N, D)
// buffers; with norm = true, the q/k RMSNorm with scales (2 streams, 2, D) and epsilon eps, split at T_0).
// ---------------------------------------------------------------------------------------------------------------

constexpr char kSeparate[] = "attention: expected q (B,T,N,D), k = v (B,S,N,D)";
constexpr char kPacked[] = "attention: expected qkv0 (B,T0,3,N,D), qkv1 (B,T1,3,N,D), scales (2,2,D)";

template <typename Args>
void Run(ffi::ThreadPool& pool, const Args& a, size_t scratch, void (*item_fn)(const Args&, int64_t, float*)) {
  ParallelFor(pool, a.m.b * a.m.n, scratch, [a, item_fn](int64_t item, float* buf) { item_fn(a, item, buf); });
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  FwdArgs a;
  if (!ReadDims(q, k, v, &a.m)) return ffi::Error::InvalidArgument(kSeparate);
  a.g = Separate(a.m, q.typed_data(), k.typed_data(), v.typed_data());
  a.g.q[0].out = out->typed_data(), a.lse = lse->typed_data();
  Run(pool, a, FwdScratch(a.m), FwdItem);
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  BwdArgs a;
  if (!ReadDims(q, k, v, &a.m)) return ffi::Error::InvalidArgument(kSeparate);
  a.g = Separate(a.m, q.typed_data(), k.typed_data(), v.typed_data());
  a.g.q[0].o = o.typed_data(), a.g.q[0].dout = dout.typed_data(), a.g.q[0].dq = dq->typed_data();
  a.g.k[0].dk = dk->typed_data(), a.g.k[0].dv = dv->typed_data();
  a.lse = lse.typed_data(), a.dscales = nullptr;
  Run(pool, a, BwdScratch(a.m), BwdItem);
  return ffi::Error::Success();
}

bool ReadNorm(const Dims& m, ffi::Buffer<ffi::F32>& scales, bool norm, float eps, int64_t split, Norm* nm) {
  if (scales.element_count() != 4 * m.d) return false;
  *nm = Norm{norm ? scales.typed_data() : nullptr, split, eps};
  return true;
}

ffi::Error PackedFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                         ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out0,
                         ffi::ResultBuffer<ffi::F32> out1, ffi::ResultBuffer<ffi::F32> lse, bool norm, float eps) {
  FwdArgs a;
  if (!ReadPacked(x0, x1, &a.m, &a.g) || !ReadNorm(a.m, scales, norm, eps, x0.dimensions()[1], &a.nm)) {
    return ffi::Error::InvalidArgument(kPacked);
  }
  float* outs[2] = {out0->typed_data(), out1->typed_data()};
  for (int j = 0; j < a.g.nq; ++j) a.g.q[j].out = outs[j];
  a.lse = lse->typed_data();
  Run(pool, a, FwdScratch(a.m), FwdItem);
  return ffi::Error::Success();
}

ffi::Error PackedBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                         ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> o0, ffi::Buffer<ffi::F32> o1,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout0, ffi::Buffer<ffi::F32> dout1,
                         ffi::ResultBuffer<ffi::F32> dx0, ffi::ResultBuffer<ffi::F32> dx1,
                         ffi::ResultBuffer<ffi::F32> dscales, bool norm, float eps) {
  BwdArgs a;
  if (!ReadPacked(x0, x1, &a.m, &a.g) || !ReadNorm(a.m, scales, norm, eps, x0.dimensions()[1], &a.nm)) {
    return ffi::Error::InvalidArgument(kPacked);
  }
  const float* os[2] = {o0.typed_data(), o1.typed_data()};
  const float* douts[2] = {dout0.typed_data(), dout1.typed_data()};
  float* dxs[2] = {dx0->typed_data(), dx1->typed_data()};
  for (int j = 0; j < a.g.nq; ++j) {
    a.g.q[j].o = os[j], a.g.q[j].dout = douts[j], a.g.q[j].dq = dxs[j];
    a.g.k[j].dk = dxs[j] + a.m.nd, a.g.k[j].dv = dxs[j] + 2 * a.m.nd;
  }
  a.lse = lse.typed_data(), a.dscales = dscales->typed_data();
  if (!norm) std::fill(a.dscales, a.dscales + a.m.b * a.m.n * 4 * a.m.d, 0.f);
  Run(pool, a, BwdScratch(a.m), BwdItem);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("norm")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RflowAttentionPackedBwd, rflow_attention::PackedBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("norm")
                                  .Attr<float>("eps"));
