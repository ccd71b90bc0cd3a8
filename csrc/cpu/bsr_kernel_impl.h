// Block-sparse linear micro-kernels, written once and compiled per ISA.
//
// Included only by bsr_avx512bf16.cpp / bsr_avx512.cpp / bsr_avx2.cpp, each of which sets
//   SPV_NS          namespace for this ISA's copy,
//   SPV_AVX512      1: 16-wide zmm, 0: 8-wide ymm (AVX2 + FMA),
//   SPV_NATIVE_BF16 1: vdpbf16ps, 0: bf16 widened to fp32 with shifts,
// and wraps the include in `#pragma GCC target(...)`. Everything here is in an anonymous namespace
// and uses no STL/torch templates, so nothing compiled for a wide ISA leaks into generic code.
//
// Two register-tiled kernels (see bsr_params.h for the packed layouts):
//  * kernel A (BHP >= 16): vectors run over the BHP output rows of a block row, TT tokens are
//    broadcast from the packed activation tile: acc[TT][BHP/W] lives in registers across all kept
//    blocks of the row, one pass over the weights per token tile.
//  * kernel B (BHP <= 8, e.g. 1x8 blocks): vectors run over TT = TV*W tokens, weights broadcast.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bsr_params.h"

namespace sparsevit_cpu {
namespace SPV_NS {
namespace {

#if SPV_AVX512
typedef __m512 vf;
typedef __m512i vi;
enum { W = 16 };
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vi vloadi(const void* p) { return _mm512_loadu_si512(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vi vset1i(int32_t a) { return _mm512_set1_epi32(a); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi vcvti(vf a) { return _mm512_cvtps_epi32(a); }
static inline vf vcasti(vi a) { return _mm512_castsi512_ps(a); }
static inline vi vcastf(vf a) { return _mm512_castps_si512(a); }
static inline vi vaddi(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vslli16(vi a) { return _mm512_slli_epi32(a, 16); }
static inline vi vslli23(vi a) { return _mm512_slli_epi32(a, 23); }
static inline vi vandi(vi a, vi b) { return _mm512_and_si512(a, b); }
static inline vi vxori(vi a, vi b) { return _mm512_xor_si512(a, b); }
#else
typedef __m256 vf;
typedef __m256i vi;
enum { W = 8 };
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vi vloadi(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vi vset1i(int32_t a) { return _mm256_set1_epi32(a); }
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi vcvti(vf a) { return _mm256_cvtps_epi32(a); }
static inline vf vcasti(vi a) { return _mm256_castsi256_ps(a); }
static inline vi vcastf(vf a) { return _mm256_castps_si256(a); }
static inline vi vaddi(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi vslli16(vi a) { return _mm256_slli_epi32(a, 16); }
static inline vi vslli23(vi a) { return _mm256_slli_epi32(a, 23); }
static inline vi vandi(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi vxori(vi a, vi b) { return _mm256_xor_si256(a, b); }
#endif

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// ---- activations (fp32, vectorised; same formulas as ATen's vectorised GELU) -------------------
static inline vf vexp(vf x) {  // cephes expf, ~1 ulp
  x = vmin(vmax(x, vset1(-87.0f)), vset1(88.3f));
  vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
  vi e = vslli23(vaddi(vcvti(n), vset1i(127)));
  return vmul(p, vcasti(e));
}

static inline vf verf(vf x) {  // Abramowitz-Stegun 7.1.26, as ATen's Vectorized<float>::erf
  vi sign_bit = vset1i((int32_t)0x80000000u);
  vi sign = vandi(vcastf(x), sign_bit);
  vf a = vcasti(vxori(vcastf(x), sign));  // |x|
  vf t = vdiv(vset1(1.0f), vfma(vset1(0.3275911f), a, vset1(1.0f)));
  vf r = vset1(1.061405429f);
  r = vfma(r, t, vset1(-1.453152027f));
  r = vfma(r, t, vset1(1.421413741f));
  r = vfma(r, t, vset1(-0.284496736f));
  r = vfma(r, t, vset1(0.254829592f));
  r = vmul(r, t);
  vf e = vexp(vsub(vzero(), vmul(a, a)));
  vf y = vsub(vset1(1.0f), vmul(r, e));
  return vcasti(vxori(vcastf(y), sign));
}

static inline vf vtanh(vf u) {  // 1 - 2 / (exp(2u) + 1), saturates cleanly
  vf e = vexp(vadd(u, u));
  return vsub(vset1(1.0f), vdiv(vset1(2.0f), vadd(e, vset1(1.0f))));
}

static inline vf vact(vf v, int act) {
  if (act == 1) {
    vf e = verf(vmul(v, vset1(0.70710678118654752f)));
    return vmul(vmul(v, vset1(0.5f)), vadd(e, vset1(1.0f)));
  }
  if (act == 2) {
    vf v3 = vmul(vmul(v, v), v);
    vf u = vmul(vset1(0.79788456080286536f), vfma(vset1(0.044715f), v3, v));
    return vmul(vmul(v, vset1(0.5f)), vadd(vtanh(u), vset1(1.0f)));
  }
  return v;
}

// Stores n (<= W) fp32 lanes of v to y (fp32 or bf16).
static inline void store_lanes(void* y, int64_t off, vf v, int n, int bf16) {
  if (!bf16) {
    float* dst = (float*)y + off;
    if (n == W) { vstore(dst, v); return; }
#if SPV_AVX512
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << n) - 1u), v);
#else
    float tmp[W];
    vstore(tmp, v);
    for (int l = 0; l < n; ++l) dst[l] = tmp[l];
#endif
    return;
  }
  uint16_t* dst = (uint16_t*)y + off;
#if SPV_AVX512 && SPV_NATIVE_BF16
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (n == W) _mm256_storeu_si256((__m256i*)dst, h);
  else _mm256_mask_storeu_epi16(dst, (__mmask16)((1u << n) - 1u), h);
#else
  float tmp[W];
  vstore(tmp, v);
  for (int l = 0; l < n; ++l) dst[l] = f32_to_bf16(tmp[l]);
#endif
}

// ---- kernel A: rows in vectors, tokens broadcast -----------------------------------------------
template <int NV, int TT, int BF16>
static void kernel_a(const BsrParams* p, int64_t r, int64_t tile, const void* xtile, int64_t ld) {
  // Two-level summation: registers hold the partial sums of ~32 input columns (one block or a few
  // narrow ones), which are then added into an L1-resident [TT x BHP] tile. Rounding error then
  // grows with 32 + K/32 terms instead of K (more accurate than dense BLAS) for ~3% extra uops.
  const int BHP = NV * W;
  alignas(64) float tacc[TT * BHP];
  for (int v = 0; v < NV; ++v) {
    vf b = p->bias_pad ? vload(p->bias_pad + r * BHP + v * W) : vzero();
    for (int t = 0; t < TT; ++t) vstore(tacc + t * BHP + v * W, b);
  }
  vf acc[TT][NV];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[t][v] = vzero();
  int kin = 0;
  // Activations are read in place, row-major: token t of the tile, column k is xt[t * ld + k].
  // Four tokens share one base pointer (offsets 0, ld, 2ld, 3ld fit x86 addressing), so the
  // broadcasts stay memory operands and no general register is spilled.
  const int KP = p->KP, bw = p->bw;
  const int32_t b0 = p->crow[r], b1 = p->crow[r + 1];
  enum { NQ = (TT + 3) / 4 };
  if (!BF16) {
    const float* xt = (const float*)xtile;
    const float* wp = (const float*)p->wpack + (int64_t)b0 * KP * BHP;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BHP) {
      const float* xb = xt + (int64_t)p->col[b] * bw;
      if (b + 1 < b1) {  // the next block sits at a random column: fetch its activations early
        const char* nx = (const char*)(xt + (int64_t)p->col[b + 1] * bw);
        for (int t = 0; t < TT; ++t)
          for (int off = 0; off < bw * 4; off += 64) _mm_prefetch(nx + t * ld * 4 + off, _MM_HINT_T0);
      }
      const float* q[NQ];
      for (int i = 0; i < NQ; ++i) q[i] = xb + 4 * i * ld;
#pragma GCC unroll 2
      for (int j = 0; j < KP; ++j) {
        vf w[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) w[v] = vload(wp + j * BHP + v * W);
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          vf xv = vset1(q[t >> 2][(t & 3) * ld + j]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[t][v] = vfma(w[v], xv, acc[t][v]);
        }
      }
      kin += bw;
      if (kin >= 32 || b + 1 == b1) {
        kin = 0;
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            vstore(tacc + t * BHP + v * W, vadd(vload(tacc + t * BHP + v * W), acc[t][v]));
            acc[t][v] = vzero();
          }
      }
    }
  } else {
    const uint16_t* xt = (const uint16_t*)xtile;
    const uint16_t* wp = (const uint16_t*)p->wpack + (int64_t)b0 * KP * BHP;
    const int KH = KP / 2;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BHP) {
      const uint16_t* xb = xt + (int64_t)p->col[b] * bw;
      if (b + 1 < b1) {
        const char* nx = (const char*)(xt + (int64_t)p->col[b + 1] * bw);
        for (int t = 0; t < TT; ++t)
          for (int off = 0; off < bw * 2; off += 64) _mm_prefetch(nx + t * ld * 2 + off, _MM_HINT_T0);
      }
      const uint16_t* q[NQ];
      for (int i = 0; i < NQ; ++i) q[i] = xb + 4 * i * ld;
#pragma GCC unroll 2
      for (int jp = 0; jp < KH; ++jp) {
        vi w[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) w[v] = vloadi(wp + (jp * BHP + v * W) * 2);
#if SPV_NATIVE_BF16
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          int32_t pair;  // (x[t, k], x[t, k+1]) are adjacent in a row: one 32-bit broadcast
          memcpy(&pair, q[t >> 2] + (t & 3) * ld + 2 * jp, 4);
          vi xv = vset1i(pair);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)w[v], (__m512bh)xv);
        }
#else
        vf we[NV], wo[NV];
        vi hi = vset1i((int32_t)0xffff0000u);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          we[v] = vcasti(vslli16(w[v]));
          wo[v] = vcasti(vandi(w[v], hi));
        }
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          const uint16_t* xs = q[t >> 2] + (t & 3) * ld + 2 * jp;
          vf x0 = vset1(bf16_to_f32(xs[0]));
          vf x1 = vset1(bf16_to_f32(xs[1]));
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[t][v] = vfma(wo[v], x1, vfma(we[v], x0, acc[t][v]));
        }
#endif
      }
      kin += bw;
      if (kin >= 32 || b + 1 == b1) {
        kin = 0;
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            vstore(tacc + t * BHP + v * W, vadd(vload(tacc + t * BHP + v * W), acc[t][v]));
            acc[t][v] = vzero();
          }
      }
    }
  }
  // epilogue: activation in fp32, masked stores for padded rows / tokens
  const int64_t row0 = r * p->bh;
  int64_t nrow = p->out - row0;
  if (nrow > p->bh) nrow = p->bh;
  const int64_t tok0 = tile * TT;
  for (int t = 0; t < TT; ++t) {
    if (tok0 + t >= p->T) break;
    for (int v = 0; v < NV; ++v) {
      int n = (int)(nrow - v * W);
      if (n <= 0) break;
      if (n > W) n = W;
      store_lanes(p->y, (tok0 + t) * p->ldy + row0 + v * W, vact(vload(tacc + t * BHP + v * W), p->act), n, BF16);
    }
  }
}

// ---- kernel B: tokens in vectors, weights broadcast (short blocks such as 1x8) -----------------
template <int BH, int TV, int BF16>
static void kernel_b(const BsrParams* p, int64_t r, int64_t tile, const void* xtile, int64_t ld) {
  (void)ld;
  const int TT = TV * W;
  alignas(64) float tacc[BH * TT];  // two-level summation, as in kernel A
  for (int i = 0; i < BH; ++i) {
    vf b = p->bias_pad ? vset1(p->bias_pad[r * BH + i]) : vzero();
    for (int u = 0; u < TV; ++u) vstore(tacc + i * TT + u * W, b);
  }
  vf acc[BH][TV];
#pragma GCC unroll 8
  for (int i = 0; i < BH; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < TV; ++u) acc[i][u] = vzero();
  int kin = 0;
  const int KP = p->KP;
  const int32_t b0 = p->crow[r], b1 = p->crow[r + 1];
  if (!BF16) {
    const float* xt = (const float*)xtile;
    const float* wp = (const float*)p->wpack + (int64_t)b0 * KP * BH;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BH) {
      const float* xb = xt + (int64_t)p->col[b] * KP * TT;
      for (int j = 0; j < KP; ++j) {
        vf xv[TV];
#pragma GCC unroll 8
        for (int u = 0; u < TV; ++u) xv[u] = vload(xb + j * TT + u * W);
#pragma GCC unroll 8
        for (int i = 0; i < BH; ++i) {
          vf wv = vset1(wp[j * BH + i]);
#pragma GCC unroll 8
          for (int u = 0; u < TV; ++u) acc[i][u] = vfma(xv[u], wv, acc[i][u]);
        }
      }
      kin += p->bw;
      if (kin >= 32 || b + 1 == b1) {
        kin = 0;
#pragma GCC unroll 8
        for (int i = 0; i < BH; ++i)
#pragma GCC unroll 8
          for (int u = 0; u < TV; ++u) {
            vstore(tacc + i * TT + u * W, vadd(vload(tacc + i * TT + u * W), acc[i][u]));
            acc[i][u] = vzero();
          }
      }
    }
  } else {
    const uint16_t* xt = (const uint16_t*)xtile;
    const uint16_t* wp = (const uint16_t*)p->wpack + (int64_t)b0 * KP * BH;
    const int KH = KP / 2;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BH) {
      const uint16_t* xb = xt + (int64_t)p->col[b] * KP * TT;
      for (int jp = 0; jp < KH; ++jp) {
        vi xv[TV];
#pragma GCC unroll 8
        for (int u = 0; u < TV; ++u) xv[u] = vloadi(xb + (jp * TT + u * W) * 2);
#if SPV_NATIVE_BF16
#pragma GCC unroll 8
        for (int i = 0; i < BH; ++i) {
          int32_t pair;
          memcpy(&pair, wp + (jp * BH + i) * 2, 4);
          vi wv = vset1i(pair);
#pragma GCC unroll 8
          for (int u = 0; u < TV; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], (__m512bh)xv[u], (__m512bh)wv);
        }
#else
        vf xe[TV], xo[TV];
        vi hi = vset1i((int32_t)0xffff0000u);
#pragma GCC unroll 8
        for (int u = 0; u < TV; ++u) {
          xe[u] = vcasti(vslli16(xv[u]));
          xo[u] = vcasti(vandi(xv[u], hi));
        }
#pragma GCC unroll 8
        for (int i = 0; i < BH; ++i) {
          vf w0 = vset1(bf16_to_f32(wp[(jp * BH + i) * 2]));
          vf w1 = vset1(bf16_to_f32(wp[(jp * BH + i) * 2 + 1]));
#pragma GCC unroll 8
          for (int u = 0; u < TV; ++u) acc[i][u] = vfma(xo[u], w1, vfma(xe[u], w0, acc[i][u]));
        }
#endif
      }
      kin += p->bw;
      if (kin >= 32 || b + 1 == b1) {
        kin = 0;
#pragma GCC unroll 8
        for (int i = 0; i < BH; ++i)
#pragma GCC unroll 8
          for (int u = 0; u < TV; ++u) {
            vstore(tacc + i * TT + u * W, vadd(vload(tacc + i * TT + u * W), acc[i][u]));
            acc[i][u] = vzero();
          }
      }
    }
  }
  const int64_t row0 = r * p->bh;
  const int64_t tok0 = tile * TT;
  float tmp[W];
  for (int i = 0; i < BH; ++i) {
    if (i >= p->bh || row0 + i >= p->out) break;
    for (int u = 0; u < TV; ++u) {
      vstore(tmp, vact(vload(tacc + i * TT + u * W), p->act));
      for (int l = 0; l < W; ++l) {
        const int64_t tok = tok0 + u * W + l;
        if (tok >= p->T) break;
        if (BF16) ((uint16_t*)p->y)[tok * p->ldy + row0 + i] = f32_to_bf16(tmp[l]);
        else ((float*)p->y)[tok * p->ldy + row0 + i] = tmp[l];
      }
    }
  }
}

// ---- tile sizes and dispatch --------------------------------------------------------------------
#if SPV_AVX512
// 32 zmm: acc TT x NV <= 24 plus NV weight registers.
static int tokens_a(int nv) { return nv == 1 ? 16 : nv == 2 ? 12 : nv == 3 ? 8 : nv == 4 ? 6 : 0; }
static int tv_b(int bh) { return bh == 8 ? 3 : (bh == 1 || bh == 2 || bh == 4) ? 4 : 0; }
#else
// 16 ymm: acc TT x NV <= 12.
static int tokens_a(int nv) { return nv == 2 ? 6 : nv == 4 ? 3 : nv == 6 ? 2 : nv == 8 ? 1 : 0; }
static int tv_b(int bh) { return bh == 8 ? 1 : bh == 4 ? 2 : (bh == 1 || bh == 2) ? 4 : 0; }
#endif

static int token_tile(int BHP, int bf16) {
  (void)bf16;
  if (BHP >= 16) return (BHP % W == 0) ? tokens_a(BHP / W) : 0;
  return tv_b(BHP) * W;
}

typedef void (*row_fn)(const BsrParams*, int64_t, int64_t, const void*, int64_t);

template <int BF16>
static row_fn pick(int BHP) {
#if SPV_AVX512
  switch (BHP) {
    case 16: return kernel_a<1, 16, BF16>;
    case 32: return kernel_a<2, 12, BF16>;
    case 48: return kernel_a<3, 8, BF16>;
    case 64: return kernel_a<4, 6, BF16>;
    case 1: return kernel_b<1, 4, BF16>;
    case 2: return kernel_b<2, 4, BF16>;
    case 4: return kernel_b<4, 4, BF16>;
    case 8: return kernel_b<8, 3, BF16>;
  }
#else
  switch (BHP) {
    case 16: return kernel_a<2, 6, BF16>;
    case 32: return kernel_a<4, 3, BF16>;
    case 48: return kernel_a<6, 2, BF16>;
    case 64: return kernel_a<8, 1, BF16>;
    case 1: return kernel_b<1, 4, BF16>;
    case 2: return kernel_b<2, 4, BF16>;
    case 4: return kernel_b<4, 2, BF16>;
    case 8: return kernel_b<8, 1, BF16>;
  }
#endif
  return nullptr;
}

// Where token tile `tile` starts. Kernel B reads the transposed pack; kernel A reads row-major
// activations: x itself, or (padded columns / last partial tile) a zero-padded copy.
static const void* tile_ptr(const BsrParams* p, int64_t tile) {
  const int64_t esz = p->bf16 ? 2 : 4;
  if (p->BHP < 16) return (const char*)p->xp + tile * p->tile_stride * esz;
  if (p->xa_tail && tile == p->n_tiles - 1) return p->xa_tail;
  return (const char*)p->xa + tile * p->TT * p->lda * esz;
}

static void compute(const BsrParams* p, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  row_fn fn = p->bf16 ? pick<1>(p->BHP) : pick<0>(p->BHP);
  if (!fn) return;  // token_tile() returned 0 for this shape; the caller never gets here
  // Cache blocking: a chunk of block rows whose packed weights fit in ~512 KiB of L2 (1-2 MiB on current cores) is reused
  // across all token tiles before moving on, so each weight byte is read from memory once.
  const int64_t esz = p->bf16 ? 2 : 4;
  const int64_t block_bytes = (int64_t)p->KP * p->BHP * esz;
  const int64_t budget = 512 * 1024;
  int64_t r = r0;
  while (r < r1) {
    int64_t re = r + 1;
    while (re < r1 && (int64_t)(p->crow[re + 1] - p->crow[r]) * block_bytes <= budget) ++re;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const void* xtile = tile_ptr(p, tile);
      for (int64_t rr = r; rr < re; ++rr) fn(p, rr, tile, xtile, p->lda);
    }
    r = re;
  }
}

template <int BF16> struct Elem { typedef float type; };
template <> struct Elem<1> { typedef uint16_t type; };

// Packs token tiles of x: fp32 xp[q][TT], bf16 xp[q/2][TT][2], with q = c*KP + j. Pads with zeros
// (tokens past T, k past `in`, j past bw) so the kernels never branch on edges.
template <int BF16>
static void pack_tiles(const BsrParams* p, int64_t tb, int64_t te) {
  typedef typename Elem<BF16>::type elem_t;
  const int TT = p->TT, KP = p->KP, bw = p->bw;
  const elem_t* x = (const elem_t*)p->x;
  for (int64_t tile = tb; tile < te; ++tile) {
    elem_t* dst = (elem_t*)p->xp + tile * p->tile_stride;
    const int64_t tok0 = tile * TT;
    const int nt = (int)((p->T - tok0) < TT ? (p->T - tok0) : TT);
    for (int64_t c = 0; c < p->nbc; ++c) {
      for (int j = 0; j < KP; ++j) {
        const int64_t q = c * KP + j, k = c * bw + j;
        elem_t* d = BF16 ? dst + ((q >> 1) * TT) * 2 + (q & 1) : dst + q * TT;
        const int stride = BF16 ? 2 : 1;
        if (j >= bw || k >= p->in) {
          for (int t = 0; t < TT; ++t) d[t * stride] = 0;
          continue;
        }
        const elem_t* s = x + tok0 * p->ldx + k;
        int t = 0;
        for (; t < nt; ++t) d[t * stride] = s[t * p->ldx];
        for (; t < TT; ++t) d[t * stride] = 0;
      }
    }
  }
}

static void pack(const BsrParams* p, int64_t tb, int64_t te) {
  if (p->bf16) pack_tiles<1>(p, tb, te);
  else pack_tiles<0>(p, tb, te);
}

}  // namespace
}  // namespace SPV_NS

const BsrKernels* SPV_ENTRY() {
  static const BsrKernels k = {SPV_NAME, SPV_NS::token_tile, SPV_NS::pack, SPV_NS::compute};
  return &k;
}

}  // namespace sparsevit_cpu
