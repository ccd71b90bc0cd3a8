// CPU attention micro-kernels for pruned heads, written once and compiled per ISA.
//
// Included only by attention_cpu_avx512.cpp / attention_cpu_avx2.cpp, each of which sets ATTN_NS,
// ATTN_ENTRY, ATTN_NAME and SPV_AVX512 and wraps the include in `#pragma GCC target(...)`. See
// attention_cpu_params.h for the work split. All arithmetic is fp32 (bf16 inputs are widened while
// packing). Keys are walked in blocks of KB with an online (flash) softmax: per query a running max
// and sum, the P @ V accumulator rescaled when the max grows. The score block [QB][KB] stays in L1
// for any sequence length; for ViT/Swin lengths (49..577 keys) it is one or three blocks.
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

enum { QB = 4 };       // queries per register block
enum { KB = 16 * W };  // keys per softmax block: the [QB][KB] score block is 16 KiB (AVX-512)

static inline float load_elem(const void* base, int64_t idx, int bf16) {
  return bf16 ? bf16_to_f32(((const uint16_t*)base)[idx]) : ((const float*)base)[idx];
}

#if SPV_AVX512
// Up to 16 consecutive elements (n of them; the rest 0) of an fp32 or bf16 row, widened to fp32.
static inline vf load_row16(const void* base, int64_t idx, int n, int bf16) {
  const __mmask16 m = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u);
  if (!bf16) return _mm512_maskz_loadu_ps(m, (const float*)base + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)base + idx);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// K^T [Dqk][Np] and V [Np][Dvp] of head (b, h) in fp32, zero past N keys and past Dv channels.
// K is transposed 16 keys x 16 channels at a time in registers; V rows are copied (widened).
static void pack_kv(const AttnParams* p, int64_t b, int64_t h, float* kt, float* vp) {
  const int64_t N = p->N, Np = p->Np, D = p->Dqk, Dv = p->Dv, Dvp = p->Dvp;
  const int64_t kb = b * p->sk[0] + h * p->sk[1], vb = b * p->sv[0] + h * p->sv[1];
  for (int64_t j0 = 0; j0 < Np; j0 += 16) {
    const int nk = (int)(N - j0 < 0 ? 0 : (N - j0 < 16 ? N - j0 : 16));
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int nd = (int)(D - d0 < 16 ? D - d0 : 16);
      vf r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = i < nk ? load_row16(p->k, kb + (j0 + i) * p->sk[2] + d0, nd, p->bf16) : vzero();
      transpose16(r);
#pragma GCC unroll 16
      for (int d = 0; d < 16; ++d)
        if (d < nd) vstore(kt + (d0 + d) * Np + j0, r[d]);
    }
    for (int i = 0; i < 16; ++i) {
      float* dst = vp + (j0 + i) * Dvp;
      for (int64_t c = 0; c < Dvp; c += 16) {
        const int n = i < nk ? (int)(Dv - c < 0 ? 0 : (Dv - c < 16 ? Dv - c : 16)) : 0;
        vstore(dst + c, n ? load_row16(p->v, vb + (j0 + i) * p->sv[2] + c, n, p->bf16) : vzero());
      }
    }
  }
}
#else
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
#endif

// s[qi][jb .. jb + NJ*W) = sum_d qs[qi][d] * kt[d][...] for the QB queries of the block.
template <int NJ>
static void score_block(const float* kt, int64_t Np, const float* qs, int64_t D, float* s, int64_t ss) {
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
    for (int n = 0; n < NJ; ++n) vstore(s + qi * ss + n * W, acc[qi][n]);
}

// o[qi][dv block] = o[qi][dv block] * corr[qi] + sum_{j < nk} s[qi][j] * vp[j][dv block].
template <int NV>
static void pv_block(const float* s, int64_t ss, const float* vp, int64_t Dvp, int64_t nk, int64_t dvb,
                     const float* corr, float* o) {
  vf acc[QB][NV];
  for (int qi = 0; qi < QB; ++qi) {
    const vf c = vset1(corr[qi]);
    for (int n = 0; n < NV; ++n) acc[qi][n] = vmul(vload(o + qi * Dvp + dvb + n * W), c);
  }
  for (int64_t j = 0; j < nk; ++j) {
    vf vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = vload(vp + j * Dvp + dvb + n * W);
    for (int qi = 0; qi < QB; ++qi) {
      const vf pb = vset1(s[qi * ss + j]);
      for (int n = 0; n < NV; ++n) acc[qi][n] = vfma(vv[n], pb, acc[qi][n]);
    }
  }
  for (int qi = 0; qi < QB; ++qi)
    for (int n = 0; n < NV; ++n) vstore(o + qi * Dvp + dvb + n * W, acc[qi][n]);
}

// Running softmax state of one query row.
struct RowState {
  float max;  // largest score so far (-inf before any; NaN once a score was NaN)
  float sum;  // sum of exp(score - max) so far
};

// Key block [j0, j0 + nk) of one score row (nkp = nk rounded up to W, s holds nkp scores): adds the
// bias, exponentiates in place against the updated running max and returns the factor that
// rescales what was accumulated before. Keys past N are left at exactly 0.
static float softmax_block(const AttnParams* p, float* s, int64_t b, int64_t h, int64_t i, int64_t j0,
                           int64_t nk, int64_t nkp, RowState* st) {
  if (p->bias) {
    const int64_t off = b * p->sb[0] + h * p->sb[1] + i * p->sb[2] + j0;
    for (int64_t j = 0; j < nk; ++j) s[j] += load_elem(p->bias, off + j, p->bias_bf16);
  }
  for (int64_t j = nk; j < nkp; ++j) s[j] = -INFINITY;
  vf m = vset1(-INFINITY);
  for (int64_t j = 0; j < nkp; j += W) m = vmax(m, vload(s + j));
  float mx = vhmax(m);
  for (int64_t j = 0; j < nk; ++j) mx = s[j] != s[j] ? s[j] : mx;  // a NaN score makes the row NaN
  const float new_max = (st->max != st->max || mx != mx) ? NAN : (mx > st->max ? mx : st->max);
  // While every score so far is -inf the reference is exp(-inf - -inf) = NaN; keep the state at
  // -inf instead (a later finite key rescues the row) and apply the reference's NaN at the end.
  const float ref = new_max == -INFINITY ? 0.f : new_max;
  const float corr = st->max == -INFINITY ? 0.f : expf(st->max - ref);
  const vf mv = vset1(ref);
  vf sum = vzero();
  for (int64_t j = 0; j < nkp; j += W) {
    const vf e = vexp(vsub(vload(s + j), mv));
    vstore(s + j, e);
    sum = vadd(sum, e);
  }
  float total = vhsum(sum);
  for (int64_t j = nk; j < nkp; ++j) {  // vexp clamps -inf to a denormal-sized value: take it back out
    total -= s[j];
    s[j] = 0.f;
  }
  st->sum = st->sum * corr + total;
  st->max = new_max;
  return corr;
}

// Scores of the QB queries in qs against keys [j0, j0 + nkp) (a multiple of W) into s[QB][ss].
static void scores(const float* kt, int64_t Np, const float* qs, int64_t D, int64_t j0, int64_t nkp, float* s,
                   int64_t ss) {
  for (int64_t jb = 0; jb < nkp; jb += 4 * W) {
    const int nj = (int)((nkp - jb) / W < 4 ? (nkp - jb) / W : 4);
    const float* k = kt + j0 + jb;
    if (nj == 4) score_block<4>(k, Np, qs, D, s + jb, ss);
    else if (nj == 3) score_block<3>(k, Np, qs, D, s + jb, ss);
    else if (nj == 2) score_block<2>(k, Np, qs, D, s + jb, ss);
    else score_block<1>(k, Np, qs, D, s + jb, ss);
  }
}

// out rows = o / sum (NaN where every score was -inf, as softmax gives).
static void store_rows(const AttnParams* p, const float* o, const RowState* st, int64_t out_row0, int nq) {
  for (int qi = 0; qi < nq; ++qi) {
    const float inv = st[qi].max == -INFINITY ? NAN : 1.0f / st[qi].sum;
    const vf sc = vset1(inv);
    for (int64_t c = 0; c < p->Dv; c += W) {
      const int lanes = (int)(p->Dv - c < W ? p->Dv - c : W);
      store_lanes(p->out, (out_row0 + qi) * p->Dv + c, vmul(vload(o + qi * p->Dvp + c), sc), lanes, p->bf16);
    }
  }
}

static void run(const AttnParams* p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch) {
  const int64_t Np = p->Np, D = p->Dqk, Dvp = p->Dvp, N = p->N;
  const int64_t ss = Np < KB ? Np : KB;  // score row stride
  float* kt = scratch;
  float* vp = kt + D * Np;
  float* s = vp + Np * Dvp;
  float* qs = s + QB * ss;
  float* o = qs + QB * D;
  pack_kv(p, b, h, kt, vp);
  const int64_t qbase = b * p->sq[0] + h * p->sq[1];
  const int64_t out_base = (b * p->H + h) * p->N;
  for (int64_t i = i0; i < i1; i += QB) {
    const int nq = (int)(i1 - i < QB ? i1 - i : QB);
    for (int qi = 0; qi < QB; ++qi)
      for (int64_t d = 0; d < D; ++d)
        qs[qi * D + d] = qi < nq ? p->scale * load_elem(p->q, qbase + (i + qi) * p->sq[2] + d, p->bf16) : 0.f;
    memset(o, 0, sizeof(float) * QB * Dvp);
    RowState st[QB];
    for (int qi = 0; qi < QB; ++qi) st[qi] = RowState{-INFINITY, 0.f};
    for (int64_t j0 = 0; j0 < Np; j0 += KB) {
      const int64_t nkp = Np - j0 < KB ? Np - j0 : KB;
      const int64_t nk = N - j0 < nkp ? N - j0 : nkp;
      scores(kt, Np, qs, D, j0, nkp, s, ss);
      float corr[QB] = {0.f, 0.f, 0.f, 0.f};
      for (int qi = 0; qi < nq; ++qi) corr[qi] = softmax_block(p, s + qi * ss, b, h, i + qi, j0, nk, nkp, &st[qi]);
      for (int qi = nq; qi < QB; ++qi) memset(s + qi * ss, 0, sizeof(float) * nkp);
      const float* vb = vp + j0 * Dvp;
      for (int64_t dvb = 0; dvb < Dvp; dvb += 4 * W) {
        const int nv = (int)((Dvp - dvb) / W < 4 ? (Dvp - dvb) / W : 4);
        if (nv == 4) pv_block<4>(s, ss, vb, Dvp, nk, dvb, corr, o);
        else if (nv == 3) pv_block<3>(s, ss, vb, Dvp, nk, dvb, corr, o);
        else if (nv == 2) pv_block<2>(s, ss, vb, Dvp, nk, dvb, corr, o);
        else pv_block<1>(s, ss, vb, Dvp, nk, dvb, corr, o);
      }
    }
    store_rows(p, o, st, out_base + i, nq);
  }
}

}  // namespace
}  // namespace ATTN_NS

const AttnKernels* ATTN_ENTRY() {
  static const AttnKernels k = {ATTN_NAME, ATTN_NS::W, ATTN_NS::KB, ATTN_NS::run};
  return &k;
}

}  // namespace sparsevit_cpu
