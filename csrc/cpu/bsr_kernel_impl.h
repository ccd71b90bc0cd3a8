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
//
// Measured (Zen 5 host, 1 thread, thread CPU time, 32x32 blocks at 70% on DeiT-S shapes, hot caches;
// indicative, the host is shared): kernel A's inner loop compiles to 2 weight loads + 12
// vbroadcastss/vpbroadcastd + 24 FMA / vdpbf16ps per k (27 zmm live, no spills) and reaches ~92% of
// the register-only peak probe on fully dense rows. DeiT-S rows hold 3-4 kept blocks, so per-(row,
// tile) costs matter: with the next-block prefetch limited to rows whose tile may be out of L1, the
// half-width last tile and the compare-based non-finite check, kernel A runs at 90-94% (fp32) and
// 87-93% (bf16) of the best peak probe at 1576 and 197 tokens (before: 86-92% / 83-92%; the kernel
// alone, called in a loop by a C++ harness, interleaved with the old code, best of 4).
// 14-token tiles (28 accumulators) gained nothing and pad batch 1 more. With cold caches (64 MiB
// written between calls) the kernels drop to 45-85%: memory traffic of x and y, which prefetching
// the next tile's x or claiming y's lines early (prefetchw) did not change. Cold weights (a layer's
// first token tile; at batch 1 on DeiT-S that is 1 of 17 tiles, but the whole layer's weight
// traffic): prefetching the weight stream 8 KiB ahead on that tile gave the combined plan at batch 1,
// with 64 MiB written before every forward, a 2.6-6% lower minimum over 60 calls in every one of 4
// alternations at 1 thread (thread CPU time, 12.5-12.8 vs 12.9-13.6 ms); at 2 threads the host was too
// noisy to tell (wall clock: prefetching on every unit's first tile was lower in 10 of 11 pairs, this
// variant in 2 of 4); batch 8 did not move beyond the noise.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bsr_params.h"

namespace sparsevit_cpu {
namespace SPV_NS {
namespace {

// Vector wrappers, bf16 conversions, exp/erf/tanh/GELU and store_lanes: one copy for every CPU
// kernel (NaN propagates through vexp there).
#include "sparse_fine_simd.h"

// Input columns summed in registers before the partial sums go to the L1 tile (see kernel_a).
enum { FLUSH_COLS = 128 };

// Threads working on different block rows may flag the same token: a relaxed atomic store.
static inline void mark_bad(const BsrParams* p, int64_t tok) { __atomic_store_n(p->bad_tok + tok, (char)1, __ATOMIC_RELAXED); }

// tacc (+)= acc, acc = 0.
template <int NV, int TT>
static inline __attribute__((always_inline)) void flush_a(vf (&acc)[TT][NV], float* tacc, bool add) {
  const int BHP = NV * W;
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vf s = add ? vadd(vload(tacc + t * BHP + v * W), acc[t][v]) : acc[t][v];
      vstore(tacc + t * BHP + v * W, s);
      acc[t][v] = vzero();
    }
}

// True when some value is NaN or +-Inf (or their sum overflows, a harmless false alarm): one
// reduction per tile instead of a scan of all of x per call.
template <int NV, int TT>
static inline __attribute__((always_inline)) bool any_nonfinite(const vf (&acc)[TT][NV]) {
  vf s[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    vf a = acc[0][v], c = TT > 1 ? acc[1][v] : vzero();
#pragma GCC unroll 16
    for (int t = 2; t + 1 < TT; t += 2) {
      a = vadd(a, acc[t][v]);
      c = vadd(c, acc[t + 1][v]);
    }
    if (TT > 2 && (TT & 1)) a = vadd(a, acc[TT - 1][v]);
    s[v] = vadd(a, c);
  }
#pragma GCC unroll 4
  for (int v = 1; v < NV; ++v) s[0] = vadd(s[0], s[v]);
  // s - s is 0 in finite lanes, NaN elsewhere: one compare, no horizontal sum (its shuffles share
  // ports with the FMAs; the check cost 1-2.5% of a DeiT-S row of 3-4 blocks with it).
  const vf d = vsub(s[0], s[0]);
#if SPV_AVX512
  return _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q) != 0;
#else
  return _mm256_movemask_ps(_mm256_cmp_ps(d, d, _CMP_UNORD_Q)) != 0;
#endif
}

// Writes act(acc) into y (masked for padded rows / tokens) and marks tokens whose pre-activation
// output is not finite in p->bad_tok: bsr_linear.cpp then redoes those tokens' NaN propagation.
template <int NV, int TT, int BF16>
static inline __attribute__((always_inline)) void epilogue_a(const BsrParams* p, int64_t r, int64_t tok0,
                                                             vf (&acc)[TT][NV], float* tacc) {
  const int BHP = NV * W;
  const int64_t row0 = r * p->bh;
  int64_t nrow = p->out - row0;
  if (nrow > p->bh) nrow = p->bh;
  const bool bad = any_nonfinite<NV, TT>(acc);
  if (!bad && nrow == BHP && tok0 + TT <= p->T) {  // full tile: straight from registers
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) store_lanes(p->y, (tok0 + t) * p->ldy + row0 + v * W, vact(acc[t][v], p->act), W, BF16);
    return;
  }
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(tacc + t * BHP + v * W, acc[t][v]);
  for (int t = 0; t < TT; ++t) {
    if (tok0 + t >= p->T) break;
    if (bad) {
      for (int i = 0; i < BHP; ++i)
        if (!(tacc[t * BHP + i] - tacc[t * BHP + i] == 0.0f)) mark_bad(p, tok0 + t);
    }
    for (int v = 0; v < NV; ++v) {
      int n = (int)(nrow - v * W);
      if (n <= 0) break;
      if (n > W) n = W;
      store_lanes(p->y, (tok0 + t) * p->ldy + row0 + v * W, vact(vload(tacc + t * BHP + v * W), p->act), n, BF16);
    }
  }
}

// ---- kernel A: rows in vectors, tokens broadcast -----------------------------------------------
// One k pair of a bf16 block: acc[t] += w[k] * x[t, k] + w[k+1] * x[t, k+1], with x[t, k+1] read as
// zero when ODD (the block's last valid column is k).
template <int NV, int TT, bool ODD>
static inline __attribute__((always_inline)) void bf16_pair_step(vf (&acc)[TT][NV], const uint16_t* wpair,
                                                                 const uint16_t* const* q, int64_t ld, int k) {
  const int BHP = NV * W;
  vi w[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) w[v] = vloadi(wpair + v * W * 2);
#if SPV_NATIVE_BF16
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    const uint16_t* xs = q[t >> 2] + (t & 3) * ld + k;
    int32_t pair;  // (x[t, k], x[t, k+1]) are adjacent in a row: one 32-bit broadcast
    if (ODD) pair = (int32_t)xs[0];
    else memcpy(&pair, xs, 4);
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
    const uint16_t* xs = q[t >> 2] + (t & 3) * ld + k;
    vf x0 = vset1(bf16_to_f32(xs[0]));
    if (ODD) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = vfma(we[v], x0, acc[t][v]);
    } else {
      vf x1 = vset1(bf16_to_f32(xs[1]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = vfma(wo[v], x1, vfma(we[v], x0, acc[t][v]));
    }
  }
#endif
  (void)BHP;
}

// Prefetch flags of the row kernels (see compute()).
enum { PF_X = 1,   // each next block's activations (the tile may not be in L1, see kBsrL1TileBudget)
       PF_W = 2 }; // the weight stream kBsrWeightPrefetchAhead bytes ahead (the layer's first tile)

// The packed weights of consecutive kept blocks are one contiguous stream (rows follow each other),
// but each 32x32 fp32 block is one 4 KiB page, where the hardware prefetchers stop: with the weights
// in DRAM (a layer's first token tile, at batch 1 the whole layer) every block would start with
// demand misses. One to four lines per column step (BHP x 4 bytes), only where the weights may be cold.
// Near the end of the weights this prefetches past them: harmless, a prefetch never faults.
static inline __attribute__((always_inline)) void prefetch_weights(const char* at, int bytes) {
#pragma GCC unroll 4
  for (int off = 0; off < bytes; off += 64) _mm_prefetch(at + kBsrWeightPrefetchAhead + off, _MM_HINT_T0);
}

// Block row r for tokens [tok0, tok0 + TT) read from xtile (row stride ld); pf: PF_* flags.
template <int NV, int TT, int BF16>
static void kernel_a(const BsrParams* p, int64_t r, int64_t tok0, const void* xtile, int64_t ld, int pf) {
  // Accumulators start at the bias and stay in registers for up to FLUSH_COLS input columns; longer
  // rows add each such partial sum into an L1-resident [TT x BHP] tile (two-level summation: the
  // rounding error grows with FLUSH_COLS + K/FLUSH_COLS terms instead of K). DeiT-S rows at 30-50%
  // density hold 2-8 blocks of 32 columns, so most of them never touch the tile at all.
  const int BHP = NV * W;
  alignas(64) float tacc[TT * BHP];
  vf acc[TT][NV];
  {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = p->bias_pad ? vload(p->bias_pad + r * BHP + v * W) : vzero();
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = b[v];
  }
  int kin = 0;
  bool spilled = false;  // tacc holds earlier partial sums
  // Activations are read in place, row-major: token t of the tile, column k is xt[t * ld + k].
  // Four tokens share one base pointer (offsets 0, ld, 2ld, 3ld fit x86 addressing), so the
  // broadcasts stay memory operands and no general register is spilled.
  const int KP = p->KP, bw = p->bw;
  const int32_t b0 = p->crow[r], b1 = p->crow[r + 1];
  // The last block column may run past the end of a row (in % bw != 0): only its first
  // `tail_k` columns are read (the packed weights beyond are zero, but the bytes there belong to the
  // next row or lie past x, and 0 * Inf would be NaN).
  const int32_t last_col = (int32_t)p->nbc - 1;
  const int tail_k = (int)(p->in - (int64_t)last_col * bw);
  enum { NQ = (TT + 3) / 4 };
  if (!BF16) {
    const float* xt = (const float*)xtile;
    const float* wp = (const float*)p->wpack + (int64_t)b0 * KP * BHP;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BHP) {
      const float* xb = xt + (int64_t)p->col[b] * bw;
      if ((pf & PF_X) && b + 1 < b1) {  // the next block sits at a random column: fetch its activations early
        const char* nx = (const char*)(xt + (int64_t)p->col[b + 1] * bw);
        for (int t = 0; t < TT; ++t)
          for (int off = 0; off < bw * 4; off += 64) _mm_prefetch(nx + t * ld * 4 + off, _MM_HINT_T0);
      }
      const float* q[NQ];
      for (int i = 0; i < NQ; ++i) q[i] = xb + 4 * i * ld;
      const int nk = p->col[b] == last_col ? tail_k : KP;
#pragma GCC unroll 2
      for (int j = 0; j < nk; ++j) {
        if (pf & PF_W) prefetch_weights((const char*)(wp + j * BHP), BHP * 4);
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
      if (kin >= FLUSH_COLS && b + 1 < b1) {
        kin = 0;
        flush_a<NV, TT>(acc, tacc, spilled);
        spilled = true;
      }
    }
  } else {
    const uint16_t* xt = (const uint16_t*)xtile;
    const uint16_t* wp = (const uint16_t*)p->wpack + (int64_t)b0 * KP * BHP;
    for (int32_t b = b0; b < b1; ++b, wp += KP * BHP) {
      const uint16_t* xb = xt + (int64_t)p->col[b] * bw;
      if ((pf & PF_X) && b + 1 < b1) {
        const char* nx = (const char*)(xt + (int64_t)p->col[b + 1] * bw);
        for (int t = 0; t < TT; ++t)
          for (int off = 0; off < bw * 2; off += 64) _mm_prefetch(nx + t * ld * 2 + off, _MM_HINT_T0);
      }
      const uint16_t* q[NQ];
      for (int i = 0; i < NQ; ++i) q[i] = xb + 4 * i * ld;
      // Pairs (k, k+1) of this block's valid columns; an odd last column (odd bw, or the row's
      // end) pairs with a zero so that nothing past it is read.
      const int nk = p->col[b] == last_col ? tail_k : bw;
#pragma GCC unroll 2
      for (int jp = 0; jp < nk / 2; ++jp) {
        if (pf & PF_W) prefetch_weights((const char*)(wp + jp * BHP * 2), BHP * 4);
        bf16_pair_step<NV, TT, false>(acc, wp + jp * BHP * 2, q, ld, 2 * jp);
      }
      if (nk & 1) bf16_pair_step<NV, TT, true>(acc, wp + (nk / 2) * BHP * 2, q, ld, nk - 1);
      kin += bw;
      if (kin >= FLUSH_COLS && b + 1 < b1) {
        kin = 0;
        flush_a<NV, TT>(acc, tacc, spilled);
        spilled = true;
      }
    }
  }
  if (spilled) {
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = vadd(acc[t][v], vload(tacc + t * BHP + v * W));
  }
  epilogue_a<NV, TT, BF16>(p, r, tok0, acc, tacc);
}

// ---- kernel B: tokens in vectors, weights broadcast (short blocks such as 1x8) -----------------
template <int BH, int TV, int BF16>
static void kernel_b(const BsrParams* p, int64_t r, int64_t tok0, const void* xtile, int64_t ld, int pf) {
  (void)ld;
  (void)pf;
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
  float tmp[W];
  for (int i = 0; i < BH; ++i) {
    if (i >= p->bh || row0 + i >= p->out) break;
    for (int u = 0; u < TV; ++u) {
      const vf pre = vload(tacc + i * TT + u * W);
      vstore(tmp, pre);
      for (int l = 0; l < W; ++l)  // non-finite pre-activation outputs: see epilogue_a
        if (tok0 + u * W + l < p->T && !(tmp[l] - tmp[l] == 0.0f)) mark_bad(p, tok0 + u * W + l);
      vstore(tmp, vact(pre, p->act));
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

typedef void (*row_fn)(const BsrParams*, int64_t, int64_t, const void*, int64_t, int);

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

// Kernel A at half the token tile, for a last tile that holds at most TT/2 tokens (batch 1 on DeiT-S:
// 197 = 16 * 12 + 5 tokens, so the full-width last tile would be 7/12 padding, ~3.5% of the layer).
// Only the 32-row blocks of AVX-512 have one; elsewhere the last tile runs at full width.
template <int BF16>
static row_fn pick_half(int BHP) {
#if SPV_AVX512
  if (BHP == 32) return kernel_a<2, 6, BF16>;
#endif
  (void)BHP;
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
  row_fn half = p->bf16 ? pick_half<1>(p->BHP) : pick_half<0>(p->BHP);
  if (p->T - (p->n_tiles - 1) * p->TT > p->TT / 2) half = nullptr;  // last tile more than half full
  // Cache blocking: a chunk of block rows whose packed weights fit the L2 budget is reused across
  // all token tiles before moving on, so each weight byte is read from memory once.
  const int64_t esz = p->bf16 ? 2 : 4;
  const int64_t block_bytes = (int64_t)p->KP * p->BHP * esz;
  const int64_t budget = kBsrL2WeightBudget;
  const bool tile_fits_l1 = (int64_t)p->TT * p->nbc * p->bw * esz <= kBsrL1TileBudget;
  int64_t r = r0;
  while (r < r1) {
    int64_t re = r + 1;
    while (re < r1 && (int64_t)(p->crow[re + 1] - p->crow[r]) * block_bytes <= budget) ++re;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const void* xtile = tile_ptr(p, tile);
      const row_fn f = (half && tile == p->n_tiles - 1) ? half : fn;
      // The layer's first tile reads the chunk's weights from memory, later ones from L2 (a row
      // group's runs go to its owning thread first, run 0 first: see bsr_linear.cpp run_parallel).
      const int pf_w = tile == 0 ? PF_W : 0;
      for (int64_t rr = r; rr < re; ++rr)
        f(p, rr, tile * p->TT, xtile, p->lda, pf_w | (rr == r || !tile_fits_l1 ? PF_X : 0));
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
