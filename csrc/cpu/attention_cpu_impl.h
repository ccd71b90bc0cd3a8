// CPU attention micro-kernels for pruned heads, written once and compiled per ISA.
//
// Included only by attention_cpu_avx512.cpp / attention_cpu_avx2.cpp, each of which sets ATTN_NS,
// ATTN_ENTRY, ATTN_NAME and SPV_AVX512 and wraps the include in `#pragma GCC target(...)`. See
// attention_cpu_params.h for the work split. All arithmetic is fp32 (bf16 inputs are widened while
// packing); the softmax is exact two-pass over the whole score row, which for ViT/Swin sequence
// lengths (49..577 keys) is a few KiB per query and stays in L1 with its 4-query block.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_cpu_params.h"

namespace sparsevit_cpu {
namespace ATTN_NS {
namespace {

#define SPV_NATIVE_BF16 0
#include "sparse_fine_simd.h"
#undef SPV_NATIVE_BF16

enum { QB = 4 };  // queries per register block

static inline float load_elem(const void* base, int64_t idx, int bf16) {
  return bf16 ? bf16_to_f32(((const uint16_t*)base)[idx]) : ((const float*)base)[idx];
}

// K^T [Dqk][Np] and V [Np][Dvp] of head (b, h) in fp32, zero past N keys and past Dv channels.
static void pack_kv(const AttnParams* p, int64_t b, int64_t h, float* kt, float* vp) {
  const int64_t N = p->N, Np = p->Np, D = p->Dqk, Dv = p->Dv, Dvp = p->Dvp;
  const int64_t kb = b * p->sk[0] + h * p->sk[1], vb = b * p->sv[0] + h * p->sv[1];
  for (int64_t j = 0; j < Np; ++j) {
    if (j >= N) {
      for (int64_t d = 0; d < D; ++d) kt[d * Np + j] = 0.f;
      for (int64_t d = 0; d < Dvp; ++d) vp[j * Dvp + d] = 0.f;
      continue;
    }
    for (int64_t d = 0; d < D; ++d) kt[d * Np + j] = load_elem(p->k, kb + j * p->sk[2] + d, p->bf16);
    for (int64_t d = 0; d < Dv; ++d) vp[j * Dvp + d] = load_elem(p->v, vb + j * p->sv[2] + d, p->bf16);
    for (int64_t d = Dv; d < Dvp; ++d) vp[j * Dvp + d] = 0.f;
  }
}

// s[qi][jb .. jb + NJ*W) = sum_d qs[qi][d] * kt[d][...] for the QB queries of the block.
template <int NJ>
static void score_block(const float* kt, int64_t Np, const float* qs, int64_t D, float* s) {
  vf acc[QB][NJ];
  for (int qi = 0; qi < QB; ++qi)
    for (int n = 0; n < NJ; ++n) acc[qi][n] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    vf kv[NJ];
    for (int n = 0; n < NJ; ++n) kv[n] = vload(kt + d * Np + n * W);
    for (int qi = 0; qi < QB; ++qi) {
      const vf qb = vset1(qs[qi * D + d]);
      for (int n = 0; n < NJ; ++n) acc[qi][n] = vfma(kv[n], qb, acc[qi][n]);
    }
  }
  for (int qi = 0; qi < QB; ++qi)
    for (int n = 0; n < NJ; ++n) vstore(s + qi * Np + n * W, acc[qi][n]);
}

// acc[qi][dv block] = sum_j s[qi][j] * vp[j][dv block]; out row = acc / row sum.
template <int NV>
static void pv_block(const AttnParams* p, const float* s, const float* vp, int64_t dvb, const float* inv,
                     int64_t out_row0, int nq) {
  const int64_t Np = p->Np, Dvp = p->Dvp, N = p->N;
  vf acc[QB][NV];
  for (int qi = 0; qi < QB; ++qi)
    for (int n = 0; n < NV; ++n) acc[qi][n] = vzero();
  for (int64_t j = 0; j < N; ++j) {
    vf vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = vload(vp + j * Dvp + dvb + n * W);
    for (int qi = 0; qi < QB; ++qi) {
      const vf pb = vset1(s[qi * Np + j]);
      for (int n = 0; n < NV; ++n) acc[qi][n] = vfma(vv[n], pb, acc[qi][n]);
    }
  }
  for (int qi = 0; qi < nq; ++qi) {
    const vf sc = vset1(inv[qi]);
    for (int n = 0; n < NV; ++n) {
      const int64_t c = dvb + n * W;
      const int lanes = (int)(p->Dv - c < W ? p->Dv - c : W);
      if (lanes > 0) store_lanes(p->out, (out_row0 + qi) * p->Dv + c, vmul(acc[qi][n], sc), lanes, p->bf16);
    }
  }
}

// Adds the bias row, then exponentiates in place against the row maximum; returns 1 / row sum.
// Keys past N are left at exactly 0 so they add nothing to P @ V.
static float softmax_row(const AttnParams* p, float* s, int64_t b, int64_t h, int64_t i) {
  const int64_t N = p->N, Np = p->Np;
  if (p->bias) {
    const int64_t off = b * p->sb[0] + h * p->sb[1] + i * p->sb[2];
    for (int64_t j = 0; j < N; ++j) s[j] += load_elem(p->bias, off + j, p->bias_bf16);
  }
  for (int64_t j = N; j < Np; ++j) s[j] = -INFINITY;
  vf m = vset1(-INFINITY);
  for (int64_t j = 0; j < Np; j += W) m = vmax(m, vload(s + j));
  float mx = vhmax(m);
  for (int64_t j = 0; j < N; ++j) mx = s[j] != s[j] ? s[j] : mx;  // a NaN score makes the row NaN
  const vf mv = vset1(mx);
  vf sum = vzero();
  for (int64_t j = 0; j < Np; j += W) {
    const vf e = vexp(vsub(vload(s + j), mv));
    vstore(s + j, e);
    sum = vadd(sum, e);
  }
  float total = vhsum(sum);
  for (int64_t j = N; j < Np; ++j) {  // vexp clamps -inf to a denormal-sized value: take it back out
    total -= s[j];
    s[j] = 0.f;
  }
  return 1.0f / total;
}

static void run(const AttnParams* p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch) {
  const int64_t Np = p->Np, D = p->Dqk, Dvp = p->Dvp;
  float* kt = scratch;
  float* vp = kt + D * Np;
  float* s = vp + Np * Dvp;
  float* qs = s + QB * Np;
  pack_kv(p, b, h, kt, vp);
  const int64_t qbase = b * p->sq[0] + h * p->sq[1];
  const int64_t out_base = (b * p->H + h) * p->N;
  for (int64_t i = i0; i < i1; i += QB) {
    const int nq = (int)(i1 - i < QB ? i1 - i : QB);
    for (int qi = 0; qi < QB; ++qi)
      for (int64_t d = 0; d < D; ++d)
        qs[qi * D + d] = qi < nq ? p->scale * load_elem(p->q, qbase + (i + qi) * p->sq[2] + d, p->bf16) : 0.f;
    for (int64_t jb = 0; jb < Np; jb += 4 * W) {
      const int nj = (int)((Np - jb) / W < 4 ? (Np - jb) / W : 4);
      if (nj == 4) score_block<4>(kt + jb, Np, qs, D, s + jb);
      else if (nj == 3) score_block<3>(kt + jb, Np, qs, D, s + jb);
      else if (nj == 2) score_block<2>(kt + jb, Np, qs, D, s + jb);
      else score_block<1>(kt + jb, Np, qs, D, s + jb);
    }
    float inv[QB] = {0.f, 0.f, 0.f, 0.f};
    for (int qi = 0; qi < nq; ++qi) inv[qi] = softmax_row(p, s + qi * Np, b, h, i + qi);
    for (int qi = nq; qi < QB; ++qi) memset(s + qi * Np, 0, sizeof(float) * Np);
    for (int64_t dvb = 0; dvb < Dvp; dvb += 4 * W) {
      const int nv = (int)((Dvp - dvb) / W < 4 ? (Dvp - dvb) / W : 4);
      if (nv == 4) pv_block<4>(p, s, vp, dvb, inv, out_base + i, nq);
      else if (nv == 3) pv_block<3>(p, s, vp, dvb, inv, out_base + i, nq);
      else if (nv == 2) pv_block<2>(p, s, vp, dvb, inv, out_base + i, nq);
      else pv_block<1>(p, s, vp, dvb, inv, out_base + i, nq);
    }
  }
}

}  // namespace
}  // namespace ATTN_NS

const AttnKernels* ATTN_ENTRY() {
  static const AttnKernels k = {ATTN_NAME, ATTN_NS::W, ATTN_NS::run};
  return &k;
}

}  // namespace sparsevit_cpu
