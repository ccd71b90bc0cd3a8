// Fine-grained sparse linear micro-kernels, written once and compiled per ISA.
//
// Included only by sparse_fine_avx512bf16.cpp / sparse_fine_avx512.cpp / sparse_fine_avx2.cpp, each
// of which sets FINE_NS (namespace), FINE_ENTRY / FINE_NAME, SPV_AVX512 and SPV_NATIVE_BF16, and wraps
// the include in `#pragma GCC target(...)`. See sparse_fine_params.h for the formulation and layouts.
//
// Why this shape pays on a CPU: with tokens in the vector lanes, a stored weight is one broadcast
// and TV fused multiply-adds against TV vectors of packed activations that sit in L1 (one chunk of
// 128 columns x the token tile: fp32 80 tokens, 40 KiB; bf16 128 tokens, 32 KiB). Unstructured
// nonzeros of different output rows share nothing, so no row blocking is attempted; instead each
// row keeps two accumulator sets that alternate between units, which gives 2*TV independent FMA
// chains (enough to cover FMA latency; fp32 single columns at TV = 8 need only one set).
// Measured and dropped (bench/cpu_kernels.py, DeiT-S shapes): groups of 4 rows stepping through
// their units together (one loop exit per group; 2-34% slower, its zero padding costs more than
// the exits), 4 accumulator sets per row (no change); token tiles of 64/96/112 and chunks of
// 64/96/384/all columns (within +-5% of 128x128, which stays), writing each 16 finished rows of
// the last chunk to y at once instead of one store pass per row range (no change), software
// prefetch of the next units' activations (5-20% slower in a micro-benchmark: the loop is bound
// by L1/L2 bandwidth, not latency).
// Where the time goes (1 thread, fp32 384->1152, 1576 tokens, 90%): the unit loop itself runs at
// ~65-75% of peak when its activations sit in L1 (micro-benchmark), but about a third of the call
// is fixed cost that sparsity does not shrink (pack of x, the row x chunk loop, transposing store
// of y: bench/cpu_kernels.py's `fixed ms`), and each row x chunk visit costs an accumulator
// reload/store and one unpredictable loop exit.
// In a ViT MLP most of that fixed cost moves the hidden activation (fc1's transposing store, fc2's
// pack: ~0.7 ms of pack alone for 1576 x 1536 fp32), so sparse_fine.cpp's fine_mlp keeps it packed
// (compute_packed below): fc1 + GELU + fc2 at 90%, 1 thread, 1576 tokens, 1.33x fp32 / 1.17x bf16
// faster than two calls (1.13x / 1.09x at 70%). Rechecked with that in place (fp32, 90% and 70%):
// chunks of 32/64 columns lose 10-45% (more row visits), 256+ lose up to 30% at 70% (x from L2);
// 128 x 128-token tiles stay.
// Round 4 (AMD Zen 5 host, DeiT-S qkv + proj + fused MLP x 12 blocks, 1576 tokens, 1 thread, thread
// CPU time, interleaved, on a shared machine: indicative). The unit loop ran at ~1.0 cycle per FMA
// vector (ideal 0.5; ~0.65 in an L1-resident micro-benchmark): at 128 tokens a 128-column chunk is
// 64 KiB and spills the 48 KiB L1 (micro-benchmark: 1.0 there vs 0.65-0.7 at 32-48 KiB). Kept: fp32
// tiles of 80 tokens (40 KiB chunks) with two accumulator sets below 8 vectors (with one set, 4-5
// vectors are 4-5 FMA chains, too few for 2 FMAs/cycle at 4-cycle latency, which is why 64-96 token
// tiles had measured no better): 70% 220 -> 203 ms, 90% 101 -> 99 ms; 96 tokens is within noise of
// 80, 64 and 112 lose 3-5%; a second accumulator set at 8 vectors changes nothing; bf16 stays at
// 128 (its chunk is 32 KiB already; 80/96 within noise, 64 loses 12%). The odd last unit of a visit
// masked instead of branched (fp32 AVX-512): ~2%. Token tiles cut to equal sizes (sparse_fine.cpp
// plan_tiles): the 2-thread balance, neutral at 1 thread. Dropped: walking 2, 3 or all 128-column
// segments as one (fewer row visits and accumulator reloads, x from L2: within 5% at 90%, 13-36%
// slower at 70%), 32-token tiles over all columns (L1-sized, 1.5 loads per FMA: 2-8% slower),
// software prefetch of the next row's partial sums (L2) at each visit (no change).
// The fixed cost (all-zero weight, same shapes, 80-token tiles) is ~24 of ~99 ms at 90%: ~7 ms row
// visits, the rest the pack of x, the transposing store of y and the hidden tile's seal.
// Round 5 (bench/fine_kernel_probe.cpp: qkv 384->1152, 1576 tokens, 80-token tiles, 1 thread, thread
// CPU time, medians on a shared machine: indicative). 90% / 70%: whole call ~2.2 / ~4.3 ms; row kernel
// 1.59 / 3.73 ms, i.e. 0.36 / 0.28 ns per stored-unit FMA vector against 0.147 at the 217 GF/s peak
// probe; with the weights L1-hot and one 128-column chunk still 0.32 / 0.26 (so not the weight stream
// nor x from L2); transposing store 0.15-0.22 ms (0.15 into an L2-resident y: the 16x16 shuffle
// transpose itself); pack 0.07 / 0.17 ms. An all-zero weight's row kernel costs 0.36 ms, ~18 cycles
// a visit (partial sums through the L2-resident scratch, the masked tail unit): at 90% a visit holds
// ~13 units, so that is ~a quarter of the row kernel. A weight with the same unit count in every
// visit (loop exits predictable) was only 3% (90%) / 9% (70%) faster: mispredicted exits are not the
// main visit cost. Measured and dropped: weights of 8 or 16 units loaded as one vector and broadcast
// by a permute (1-2% at 70%, noise at 90%: the loop is not bound by load ports); units stored
// segment-major (each segment pass one sequential stream: -2% at 70%, +6% at 90%); rows visited
// in order of their unit count per segment (predictable exits, but the weights are then read out of
// order: +9% / +22%); two rows in one masked loop (one exit per pair: +18-28%); 4 units per
// iteration (+14-26%: one more data-dependent exit per visit); one accumulator set at 80 tokens (no
// a1 / tail work per visit, but 5 FMA chains: 2-3% slower); a compile-time TT (no change); 48 to
// 1152 rows per range (within noise).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "sparse_fine_params.h"

namespace sparsevit_cpu {
namespace FINE_NS {
namespace {

#include "sparse_fine_simd.h"

// Tokens [tile_start[tile], tile_start[tile + 1]) of a tile (see FineParams::tile_start).
static inline int64_t tile_tok0(const FineParams* p, int64_t tile) { return p->tile_start[tile]; }
static inline int64_t tile_ntok(const FineParams* p, int64_t tile) {
  return p->tile_start[tile + 1] - p->tile_start[tile];
}

// One word step: acc += x_word(TV vectors at xw) * w_word (fp32: one weight; bf16: a column pair).
template <int TV, int BF16>
static inline void word_fma(vf acc[TV], const uint32_t* xw, const void* w) {
  if (!BF16) {
    const vf wb = vset1(*(const float*)w);
#pragma GCC unroll 8
    for (int v = 0; v < TV; ++v) acc[v] = vfma(vload((const float*)xw + v * W), wb, acc[v]);
    return;
  }
  int32_t pair;
  memcpy(&pair, w, 4);
#if SPV_AVX512 && SPV_NATIVE_BF16
  const vi wb = vset1i(pair);
#pragma GCC unroll 8
  for (int v = 0; v < TV; ++v)
    acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)vloadi(xw + v * W), (__m512bh)wb);
#else
  const vf w0 = vset1(bf16_to_f32((uint16_t)(pair & 0xffff)));
  const vf w1 = vset1(bf16_to_f32((uint16_t)((uint32_t)pair >> 16)));
  const vi hi = vset1i((int32_t)0xffff0000u);
#pragma GCC unroll 8
  for (int v = 0; v < TV; ++v) {
    const vi xv = vloadi(xw + v * W);
    acc[v] = vfma(vcasti(vandi(xv, hi)), w1, vfma(vcasti(vslli16(xv)), w0, acc[v]));
  }
#endif
}

// All words of unit u; even words go to `first`, odd words to `second` (independent FMA chains).
template <int U, int TV, int BF16>
static inline void unit_fma(vf first[TV], vf second[TV], const FineParams* p, const uint32_t* xt,
                            int32_t u) {
  enum { NW = BF16 ? U / 2 : U, ESZ = BF16 ? 2 : 4 };
  const int TT = p->TT;
  const uint32_t* xr = xt + (int64_t)(p->col[u] >> BF16) * TT;
  const char* wv = (const char*)p->values + (int64_t)u * U * ESZ;
#pragma GCC unroll 8
  for (int j = 0; j < NW; ++j) {
    if (j & 1) word_fma<TV, BF16>(second, xr, wv + j * 4);
    else word_fma<TV, BF16>(first, xr, wv + j * 4);
    // One pointer stepped by TT words: left to itself the compiler keeps a separate offset register
    // for every (word, vector) pair, runs out of registers and reloads them from the stack (one
    // extra load per FMA, which halved the 1x4 / 1x8 rate).
    xr += TT;
    __asm__("" : "+r"(xr));
  }
}

#if SPV_AVX512
// fp32: the odd last unit of a visit without a branch on whether it exists. The parity of a row
// segment's unit count is data-dependent, so that branch mispredicted about every other visit; the
// unit now runs either way, masked off (k = 0: accumulators unchanged, so a NaN/Inf in the x column
// it reads never enters) when there is none, reading unit 0 in place of unit ue. The unit index is
// selected with a mask, not `?:` (which GCC compiled to the same branch). Needs nnz > 0.
template <int U, int TV>
static inline void tail_unit_fp32(vf first[TV], vf second[TV], const FineParams* p, const uint32_t* xt,
                                  int32_t u, int32_t ue) {
  const int32_t has = -(int32_t)(u < ue);  // all ones or zero
  const __mmask16 k = (__mmask16)has;
  const int32_t ui = u & has;
  const float* wv = (const float*)p->values + (int64_t)ui * U;
  const float* xr = (const float*)xt + (int64_t)p->col[ui] * p->TT;
#pragma GCC unroll 8
  for (int j = 0; j < U; ++j) {
    vf* acc = (j & 1) ? second : first;
    const vf wb = vset1(wv[j]);
#pragma GCC unroll 8
    for (int v = 0; v < TV; ++v) acc[v] = _mm512_mask3_fmadd_ps(vload(xr + v * W), wb, acc[v], k);
    xr += p->TT;
    __asm__("" : "+r"(xr));  // as in unit_fma
  }
}
#endif

// Output rows [r0, r1) of one token tile, one segment (input chunk) at a time; partial sums in
// acc_mem[row][TT]. The last segment applies bias-free activation (bias seeds the first segment).
template <int U, int TV, int BF16>
static void rows_kernel(const FineParams* p, int64_t tile, int64_t r0, int64_t r1, float* acc_mem) {
  // fp32 units of one column with TV = 8 need no second accumulator set (8 chains of 4-cycle FMAs
  // keep both pipes busy); shorter tiles keep two (TV = 5 alone has 5 chains: 2.5 FMAs in flight
  // per cycle where 8 are needed). bf16 pairs keep two sets: one set measured 3-8% slower there.
  enum { ONE_WORD = !BF16 && U == 1 && TV >= 8 };
  const int TT = p->TT;
  const int64_t nseg = p->nseg;
  const uint32_t* xt = (const uint32_t*)p->xp + (tile - p->xp_first_tile) * p->tile_words;
  const bool any_units = p->seg[p->out * (nseg + 1) - 1] > 0;  // nnz > 0 (see tail_unit_fp32)
  (void)any_units;  // AVX2 and bf16 keep the branch
  for (int64_t s = 0; s < nseg; ++s) {
    const bool last = s + 1 == nseg;
    for (int64_t o = r0; o < r1; ++o) {
      float* am = acc_mem + (o - r0) * TT;
      vf a0[TV], a1[TV];
      const vf init = p->bias ? vset1(p->bias[o]) : vzero();
#pragma GCC unroll 8
      for (int v = 0; v < TV; ++v) {
        a0[v] = s == 0 ? init : vload(am + v * W);
        a1[v] = vzero();
      }
      const int32_t* sg = p->seg + o * (nseg + 1) + s;
      int32_t u = sg[0];
      const int32_t ue = sg[1];
      if (ONE_WORD) {
        // One loop exit per visit instead of two (the odd-unit tail branch is unpredictable).
        for (; u < ue; ++u) unit_fma<U, TV, BF16>(a0, a1, p, xt, u);
      } else {
        for (; u + 1 < ue; u += 2) {
          unit_fma<U, TV, BF16>(a0, a1, p, xt, u);
          unit_fma<U, TV, BF16>(a1, a0, p, xt, u + 1);
        }
#if SPV_AVX512
        if (!BF16 && any_units) tail_unit_fp32<U, TV>(a0, a1, p, xt, u, ue);
        else
#endif
        if (u < ue) unit_fma<U, TV, BF16>(a0, a1, p, xt, u);
      }
#pragma GCC unroll 8
      for (int v = 0; v < TV; ++v) {
        vf r = ONE_WORD ? a0[v] : vadd(a0[v], a1[v]);
        vstore(am + v * W, last ? vact(r, p->act) : r);
      }
    }
  }
}

// acc_mem[row][TT] (rows [r0, r1), activation applied) -> y[token][row], transposed in registers.
static void store_tile(const FineParams* p, int64_t tile, int64_t r0, int64_t r1, const float* acc_mem) {
  const int TT = p->TT;
  const int64_t tok0 = tile_tok0(p, tile), ntok = tile_ntok(p, tile);
#if SPV_AVX512
  for (int64_t ob = r0; ob < r1; ob += 16) {
    const int nr = (int)(r1 - ob < 16 ? r1 - ob : 16);
    for (int64_t g = 0; g < ntok; g += 16) {
      // Fully unrolled so every r[i] has a constant index and stays in a register (a variable
      // index makes the compiler spill r[] and select it through a jump table).
      vf r[16];
      const float* src = acc_mem + (ob - r0) * TT + g;
      if (nr == 16) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = vload(src + i * TT);
      } else {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = i < nr ? vload(src + i * TT) : vzero();
      }
      transpose16(r);
      const int nt = (int)(ntok - g < 16 ? ntok - g : 16);
      if (nr == 16 && nt == 16 && !p->bf16) {  // the common case: 16 whole fp32 rows
        float* dst = (float*)p->y + (tok0 + g) * p->ldy + ob;
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) vstore(dst + j * p->ldy, r[j]);
      } else {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j)
          if (j < nt) store_lanes(p->y, (tok0 + g + j) * p->ldy + ob, r[j], nr, p->bf16);
      }
    }
  }
#else
  for (int64_t t = 0; t < ntok; ++t) {
    for (int64_t o = r0; o < r1; ++o) {
      const float v = acc_mem[(o - r0) * TT + t];
      if (p->bf16) ((uint16_t*)p->y)[(tok0 + t) * p->ldy + o] = f32_to_bf16(v);
      else ((float*)p->y)[(tok0 + t) * p->ldy + o] = v;
    }
  }
#endif
}

typedef void (*rows_fn)(const FineParams*, int64_t, int64_t, int64_t, float*);

template <int U, int BF16>
static rows_fn pick_tv(int tv) {
  switch (tv) {
    case 1: return rows_kernel<U, 1, BF16>;
    case 2: return rows_kernel<U, 2, BF16>;
    case 3: return rows_kernel<U, 3, BF16>;
    case 4: return rows_kernel<U, 4, BF16>;
#if SPV_AVX512
    case 5: return rows_kernel<U, 5, BF16>;
    case 6: return rows_kernel<U, 6, BF16>;
    case 7: return rows_kernel<U, 7, BF16>;
    default: return rows_kernel<U, 8, BF16>;
#else
    default: return rows_kernel<U, 4, BF16>;
#endif
  }
}

static rows_fn pick(int U, int tv, int bf16) {
  if (bf16) {
    switch (U) {
      case 2: return pick_tv<2, 1>(tv);
      case 4: return pick_tv<4, 1>(tv);
      case 8: return pick_tv<8, 1>(tv);
    }
    return nullptr;
  }
  switch (U) {
    case 1: return pick_tv<1, 0>(tv);
    case 2: return pick_tv<2, 0>(tv);
    case 4: return pick_tv<4, 0>(tv);
    case 8: return pick_tv<8, 0>(tv);
  }
  return nullptr;
}

static void compute(const FineParams* p, int64_t tile, int64_t r0, int64_t r1, float* scratch) {
  const int tv = (int)((tile_ntok(p, tile) + W - 1) / W);  // a short tile runs fewer vectors
  rows_fn fn = pick(p->U, tv, p->bf16);
  if (!fn) return;  // the caller validated U against the dtype; never reached
  fn(p, tile, r0, r1, scratch);
  store_tile(p, tile, r0, r1, scratch);
}

// The fused MLP's first layer: rows [r0, r1) of one token tile, activation applied, left in the
// packed layout the second layer reads instead of being transposed into y. fp32: the partial sums
// already live there (out[row][TT]). bf16: rows are summed in `scratch` as usual, then each row pair
// (2w, 2w+1) is rounded to nearest even and stored as the words out[w][TT] (row 2w in the low half,
// as the pack of a [T, hidden] bf16 tensor would put column 2w); r0 must be even, a missing last
// odd row is zero (the pack's padding column).
static void compute_packed(const FineParams* p, int64_t tile, int64_t r0, int64_t r1, void* out, float* scratch) {
  const int TT = p->TT;
  const int tv = (int)((tile_ntok(p, tile) + W - 1) / W);
  rows_fn fn = pick(p->U, tv, p->bf16);
  if (!fn) return;  // the caller validated U against the dtype; never reached
  if (!p->bf16) {
    fn(p, tile, r0, r1, (float*)out + r0 * TT);
    return;
  }
  fn(p, tile, r0, r1, scratch);
  for (int64_t o = r0; o < r1; o += 2) {
    const float* lo = scratch + (o - r0) * TT;
    const float* hi = o + 1 < r1 ? lo + TT : nullptr;
    uint32_t* dst = (uint32_t*)out + (o / 2) * TT;
#if SPV_AVX512 && SPV_NATIVE_BF16
    for (int v = 0; v < tv; ++v) {
      const vi l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vload(lo + v * W)));
      const vi h = hi ? _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vload(hi + v * W))), 16)
                      : _mm512_setzero_si512();
      vstorei(dst + v * W, _mm512_or_si512(l, h));
    }
#else
    for (int i = 0; i < tv * W; ++i)
      dst[i] = (uint32_t)f32_to_bf16(lo[i]) | (hi ? (uint32_t)f32_to_bf16(hi[i]) << 16 : 0u);
#endif
  }
}

static inline vi vmaxu(vi a, vi b) {
#if SPV_AVX512
  return _mm512_max_epu32(a, b);
#else
  return _mm256_max_epu32(a, b);
#endif
}

// True when any of the first `lanes` lanes of words [0, words) of a packed [words][TT] buffer holds
// a NaN/Inf (bf16: in either half). Largest |bits| per lane, over the vectors before the last and
// for the last alone, which holds lanes past `lanes` (padding tokens, never stored) that must not count.
static bool any_nonfinite(const float* buf, int64_t words, int TT, int lanes, int bf16) {
  const int nv = (lanes + W - 1) / W;
  if (nv == 0) return false;
  const vi abs_lo = vset1i(0x7fffffff), abs_hi = vset1i(0x7fff0000);
  vi most = vandi(vset1i(0), abs_lo), last = most;
  for (int64_t r = 0; r < words; ++r) {
    const float* row = buf + r * TT;
    for (int v = 0; v < nv; ++v) {
      const vi w = vcastf(vload(row + v * W));
      // bf16: the high half as is (low half masked off), the low half shifted up into fp32 position
      vi m = bf16 ? vmaxu(vandi(w, abs_hi), vandi(vslli16(w), abs_lo)) : vandi(w, abs_lo);
      if (v + 1 < nv) most = vmaxu(most, m);
      else last = vmaxu(last, m);
    }
  }
  uint32_t m[W], l[W];
  vstorei(m, most);
  vstorei(l, last);
  const int last_lanes = lanes - (nv - 1) * W;
  for (int i = 0; i < W; ++i)
    if (m[i] >= 0x7f800000u || (i < last_lanes && l[i] >= 0x7f800000u)) return true;
  return false;
}

// True when a 32-bit word of x holds a NaN/Inf (fp32, or either half of a bf16 pair).
static inline bool word_nonfinite(uint32_t w, int bf16) {
  if (!bf16) return (w & 0x7f800000u) == 0x7f800000u;
  return (w & 0x7f80u) == 0x7f80u || (w & 0x7f800000u) == 0x7f800000u;
}

// Packs token tiles: xp[tile][w][lane] = x32[tile_start[tile] + lane][w], zero past the tile's
// tokens (up to the next multiple of W) and past words_in.
static void pack(const FineParams* p, int64_t tb, int64_t te) {
  const int TT = p->TT;
  const uint32_t* x = (const uint32_t*)p->x;
  const int64_t ldw = p->bf16 ? p->ldx / 2 : p->ldx;
  for (int64_t tile = tb; tile < te; ++tile) {
    uint32_t* dst = (uint32_t*)p->xp + (tile - p->xp_first_tile) * p->tile_words;
    // Only the tile's own vectors: lanes past them are never read (compute runs ceil(ntok / W)).
    const int64_t tile_end = tile_tok0(p, tile) + tile_ntok(p, tile);
    for (int64_t g = 0; g < tile_ntok(p, tile); g += W) {
      const int64_t tok0 = tile_tok0(p, tile) + g;
      const int nrow = (int)(tile_end - tok0 < W ? tile_end - tok0 : W);
#if SPV_AVX512
      // Non-finite check after the transpose (a lane = a token): the largest |word| per lane,
      // compared once per 16 tokens, instead of a mask test and scalar bookkeeping per loaded row.
      // bf16 words hold two values, so the maximum is taken per 16-bit half.
      vi most = _mm512_setzero_si512();
      const vi abs_bits = p->bf16 ? _mm512_set1_epi16(0x7fff) : vset1i(0x7fffffff);
      for (int64_t wb = 0; wb < p->words_pad; wb += 16) {
        const int64_t left = p->words_in - wb;
        const __mmask16 lm = (__mmask16)(left >= 16 ? 0xffffu : left <= 0 ? 0u : (1u << left) - 1u);
        vf r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          r[i] = (i >= nrow || lm == 0) ? vzero() : vcasti(_mm512_maskz_loadu_epi32(lm, x + (tok0 + i) * ldw + wb));
        transpose16(r);
        const int nw = (int)(p->words_pad - wb < 16 ? p->words_pad - wb : 16);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          if (j >= nw) continue;
          vstore((float*)(dst + (wb + j) * TT + g), r[j]);
          const vi bits = vandi(vcastf(r[j]), abs_bits);
          most = p->bf16 ? _mm512_max_epu16(most, bits) : _mm512_max_epu32(most, bits);
        }
      }
      __mmask16 bad;
      if (p->bf16) {
        const vi hi = _mm512_srli_epi32(most, 16), lo = vandi(most, vset1i(0xffff));
        bad = _mm512_cmpge_epu32_mask(_mm512_max_epu32(hi, lo), vset1i(0x7f80));
      } else {
        bad = _mm512_cmpge_epu32_mask(most, vset1i(0x7f800000));
      }
      for (int i = 0; i < W; ++i) p->bad_token[tok0 + i] = (uint8_t)((bad >> i) & 1u);
#else
      for (int i = 0; i < W; ++i) {
        bool bad = false;
        for (int64_t w = 0; w < p->words_pad; ++w) {
          uint32_t v = 0;
          if (i < nrow && w < p->words_in) {
            v = x[(tok0 + i) * ldw + w];
            bad = bad || word_nonfinite(v, p->bf16);
          }
          dst[w * TT + g + i] = v;
        }
        p->bad_token[tok0 + i] = bad ? 1 : 0;
      }
#endif
    }
  }
}

}  // namespace
}  // namespace FINE_NS

const FineKernels* FINE_ENTRY() {
  // AVX-512 runs up to 8 vectors (128 tokens) per weight broadcast: (TV + 1) loads per TV FMAs; fp32
  // defaults to 5 (80 tokens): one 128-column chunk of packed fp32 activations is then 40 KiB and
  // stays in the 48 KiB L1, where 128 tokens (64 KiB) spill to L2 (see the header comment).
  static const FineKernels k = {FINE_NAME,
                                FINE_NS::W,
                                (SPV_AVX512 ? 8 : 4) * FINE_NS::W,
                                (SPV_AVX512 ? 5 : 4) * FINE_NS::W,
                                FINE_NS::pack,
                                FINE_NS::compute,
                                FINE_NS::compute_packed,
                                FINE_NS::any_nonfinite};
  return &k;
}

}  // namespace sparsevit_cpu
