// CPU attention micro-kernels for pruned heads, written once and compiled per ISA.
//
// Included only by attention_cpu_avx512{,bf16}.cpp / attention_cpu_avx2.cpp, each of which sets
// ATTN_NS, ATTN_ENTRY, ATTN_NAME, SPV_AVX512 and SPV_NATIVE_BF16 and wraps the include in
// `#pragma GCC target(...)`. See attention_cpu_params.h for the work split.
//
// Per (batch, head) K^T, V and the queries are packed once (the next head's in pieces while this one
// runs, see run_head); then per block of QB queries the keys are walked in blocks of KB with an
// online (flash) softmax in fp32. Both products are register-tiled:
//   scores  S[q][keys] : queries x key vectors (keys in the lanes), accumulated over head channels
//                        (a last key vector of <= 8 keys: queries in the lanes, see score_tail_tile);
//   P @ V   O[q][chan] : queries x channel vectors (channels in the lanes), accumulated over keys.
// The score epilogue scales by scale*log2(e), adds the bias, masks keys past N to -inf and keeps a
// running per-row max vector, so the softmax is one pass: exp2(s - max) stored in place and summed.
// Two element types run the same tiles ("Dot" below):
//   F32Dot  fp32 (bf16 inputs widened while packing): one FMA per channel / key;
//   Bf16Dot native bf16 (SPV_NATIVE_BF16, vdpbf16ps): K^T packed as channel pairs, V as key pairs,
//           P rounded to bf16 after the fp32 softmax; two products per lane per instruction.
//
// First pass (DeiT-S b8: 48 heads of N=197, head dim 64; 1 thread, CPU time, interleaved medians,
// indicative). Kept: the next head packed in pieces between query blocks, its rows and the output
// rows prefetched a few lines at a time (LineQueue), unrolled tile prologues/epilogues, V always
// packed (in place: P @ V ~3% slower), K^T in panels, 6-row tiles for a last block of <= 6 queries;
// fp32 2.91 vs 3.50 ms, bf16 1.59 vs 2.00. Dropped: queries row-major (broadcasts from six rows: 1-8%
// slower). Second pass (bench/attention_microbench.cpp, both builds alternating in one process; perf
// for shares): the tiles ran at the FMA peak (~215-225 GF/s of the ~220 probe); the overhead was
// prefetch bursts stalling on full miss buffers (~2.5%), the 12 x 1 tile of the last key vector (5
// keys of 16: ~3.4%), the softmax row by row with its reductions in series (~5% fp32, ~8% bf16).
// Kept: prefetches inside the two-vector tiles (PF_STEPS: 1-2%), a last key vector of <= 8 keys with
// queries in the lanes (score_tail_tile: ~1% at N=197, 5-7% at N=49/50), the softmax in three passes
// (softmax_block: ~1% fp32, 1-4% bf16), output rows queued last (~0.5%). Against the first pass:
// fp32 b8 2.78-2.79 vs 2.89-2.90 ms (1.04x), bf16 1.53-1.57 vs 1.61-1.64 (1.05x), b1 1.03-1.04x, head
// dims 48/40/24 1.04-1.08x, 16 1.05-1.11x, N=50 1.11-1.13x, Swin-T windows (N=49, D=32) 1.11-1.14x.
// Now (perf, fp32 b8): score tiles ~38%, P @ V ~36%, run_head (softmax, queue) ~12%, packing ~4%,
// queries ~2%, output stores ~2%: 171 of ~220 GF/s on useful FLOPs (bf16 ~310 of ~440). Dropped:
// P @ V storing the last key block's normalized rows to the output (fp32 0.99x, bf16 1.005x); the
// scale folded into the softmax (<= ~0.5%); prefetch to L2 (0.97x); one prefetch per step or per four
// (no better); a bound test or index mask on the tiles' prefetch index (0.87-0.95x). Not done: blocks
// of 16 queries in the lanes (no K^T, no horizontal max, but 197 tokens pad to 208 rows, not 198);
// next: the output stores, the queries' 16 x 16 transposes for 12 rows, small head dims.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#pragma GCC diagnostic ignored "-Wuninitialized"  // same false positive, through _mm512_max_ps
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_cpu_params.h"

namespace sparsevit_cpu {
namespace ATTN_NS {
namespace {

#include "sparse_fine_simd.h"

enum { QB = 12 };      // queries per block: a multiple of every tile height below
enum { KB = 16 * W };  // keys per online-softmax block: S is [QB][KB] fp32 (12 KiB on AVX-512)
#if SPV_AVX512
enum { MAX_ACC = 24, QK_MQ = 6, QK_NJ = 4 };  // 32 zmm: 24 accumulators + operands
#else
enum { MAX_ACC = 12, QK_MQ = 4, QK_NJ = 3 };  // 16 ymm
#endif
static const float LOG2E = 1.44269504088896341f;

// K^T is stored in panels as wide as one score tile (PANEL keys; the last of a key block narrower),
// each panel [channel steps][its width] contiguous: a tile then streams one contiguous block (16 KiB at
// head dim 64) instead of its columns of rows Np apart, which made the score tiles ~1.6x slower than
// the P @ V tiles of the same FLOPs. Index of key j's slot in channel-step row dd (rows of them):
enum { PANEL = int(QK_NJ) * int(W) };  // two enums: int arithmetic, not enum-enum
static inline int64_t kt_slot(int64_t Np, int64_t rows, int64_t dd, int64_t j) {
  const int64_t jb = j / KB * KB, nkp = Np - jb < KB ? Np - jb : KB, jj = j - jb, p0 = jj / PANEL * PANEL;
  const int64_t width = nkp - p0 < PANEL ? nkp - p0 : PANEL;
  return (jb + p0) * rows + dd * width + (jj - p0);
}

// ---- element types of the packed operands -------------------------------------------------------
struct F32Dot {
  typedef float elem;
  static constexpr int STEP = 1;  // channels (scores) or keys (P @ V) per lane per instruction
  static inline vf load(const float* p) { return vload(p); }
  static inline vf bcast(const float* p) { return vset1(*p); }
  static inline vf dot(vf acc, vf a, vf b) { return vfma(a, b, acc); }
};
#if SPV_NATIVE_BF16
struct Bf16Dot {
  typedef uint16_t elem;
  static constexpr int STEP = 2;
  static inline vf load(const uint16_t* p) { return _mm512_loadu_ps(p); }
  static inline vf bcast(const uint16_t* p) {
    int32_t w;
    memcpy(&w, p, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(w));
  }
  static inline vf dot(vf acc, vf a, vf b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};
#endif

// A loaded vector kept in a register: without this GCC folds the load into each of the MQ FMAs that
// use it (MQ loads instead of one), which makes the tiles load-bound.
static inline vf in_register(vf x) {
  __asm__("" : "+v"(x));
  return x;
}

// ---- loads, masks and exp2 ----------------------------------------------------------------------
static inline float load_elem(const void* base, int64_t idx, int bf16) {
  return bf16 ? bf16_to_f32(((const uint16_t*)base)[idx]) : ((const float*)base)[idx];
}

// n (1..W) consecutive elements of an fp32 or bf16 row, widened to fp32, zero past n.
static inline vf load_row(const void* base, int64_t idx, int n, int bf16) {
#if SPV_AVX512
  const __mmask16 m = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u);
  if (!bf16) return _mm512_maskz_loadu_ps(m, (const float*)base + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)base + idx);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  if (n >= W && !bf16) return vload((const float*)base + idx);
  if (n >= W) {
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + idx));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  float t[W] = {0.f};
  for (int l = 0; l < n; ++l) t[l] = load_elem(base, idx + l, bf16);
  return vload(t);
#endif
}

// Lanes >= n (1 <= n < W) set to -inf: keys past N take no weight.
static inline vf mask_tail(vf x, int n) {
#if SPV_AVX512
  return _mm512_mask_blend_ps((__mmask16)((1u << n) - 1u), vset1(-INFINITY), x);
#else
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_blendv_ps(vset1(-INFINITY), x, _mm256_cmp_ps(lane, vset1((float)n), _CMP_LT_OQ));
#endif
}

// vexp2 (2^t, the softmax's exponential) lives in sparse_fine_simd.h, shared with the GELU epilogue.

// ---- packing ------------------------------------------------------------------------------------
// Rows [j0, j1) of this head's K and V into the cache ahead of the packing loops. They are strided
// rows of the qkv output (a few MB at batch 8: L3, not L2), and without this the packing waits on
// each row in turn (perf: over half of the packing time on the V loads), about a seventh of the
// kernel; issued a block ahead, the misses overlap.
template <int HINT = _MM_HINT_T0>
static inline void prefetch_kv_rows(const AttnParams* p, int64_t b, int64_t h, int64_t j0, int64_t j1, bool with_v) {
  const int64_t es = p->bf16 ? 2 : 4, kbytes = p->Dqk * es, vbytes = p->Dv * es;
  const char* K = (const char*)p->k + (b * p->sk[0] + h * p->sk[1]) * es;
  const char* V = (const char*)p->v + (b * p->sv[0] + h * p->sv[1]) * es;
  for (int64_t j = j0; j < j1 && j < p->N; ++j) {
    const char* kr = K + j * p->sk[2] * es;
    const char* vr = V + j * p->sv[2] * es;
    for (int64_t off = 0; off < kbytes; off += 64) _mm_prefetch(kr + off, (enum _mm_hint)HINT);
    _mm_prefetch(kr + kbytes - 1, (enum _mm_hint)HINT);  // rows need not start on a cache line
    if (!with_v) continue;
    for (int64_t off = 0; off < vbytes; off += 64) _mm_prefetch(vr + off, (enum _mm_hint)HINT);
    _mm_prefetch(vr + vbytes - 1, (enum _mm_hint)HINT);
  }
}

// Cache lines to fetch while a query block runs, one every PF_STEPS steps of the tiles' inner loops.
// Issued in one burst (a hundred lines or more), most software prefetches did not arrive in time
// (measured: packing from rows fetched that way cost as much as packing cold rows); issued a few dozen
// at a time between tiles, the prefetch instructions stalled on the full miss buffers (perf: ~2.5% of
// the kernel on the instruction after them, DeiT-S b8 fp32); one per few steps inside the tiles does
// neither. A tile takes a run of entries (take) and reads one per PF_STEPS steps; `pad` entries past
// the queued lines name the queue itself, as many as the longest tile reads, so that the tiles never
// test for the end (a bound test or an index mask in the tiles' loops cost 5-13%: measured). Only
// tiles two or more vectors wide prefetch: the one-vector tiles are load-bound already (head dim 16:
// ~4% slower with them prefetching too).
enum { PF_STEPS = 2 };
struct LineQueue {
  enum { MAX_LINES = 1024 };  // a block's output rows and two pieces of the next head (~350 at D=64)
  const char** line;  // MAX_LINES + pad entries (in the thread's scratch: see queue_pad)
  int pad;            // the most entries one tile takes
  int n = 0, at = 0;
  void add(const void* p, int64_t bytes) {
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)63;
    const uintptr_t e = ((uintptr_t)p + bytes + 63) & ~(uintptr_t)63;
    for (; a < e && n < MAX_LINES; a += 64) line[n++] = (const char*)a;
    for (; a < e; a += 64) _mm_prefetch((const char*)a, _MM_HINT_T0);  // no room (not on the shapes pieces have): now
  }
  void seal() {  // after the last add: the padding the tiles may read past the lines
    for (int k = n; k < n + pad; ++k) line[k] = (const char*)line;
  }
  // Entries for a tile of `steps` inner steps (at most pad * PF_STEPS).
  const char* const* take(int64_t steps) {
    const char* const* r = line + (at < n ? at : n);
    at += (int)((steps + PF_STEPS - 1) / PF_STEPS);
    return r;
  }
  void flush() {  // what the tiles did not take, at the end of the block
    for (; at < n; ++at) _mm_prefetch(line[at], _MM_HINT_T0);
  }
  void reset() { n = at = 0; }
};

// fp32 K^T [Dqk][Np] and V [Np][Dvp] for keys [j_begin, j_end) (multiples of 16, j_end <= Np), zero
// past N keys and past Dv channels (bf16 widened).
#if SPV_AVX512
static void pack_kv_f32(const AttnParams* p, int64_t b, int64_t h, float* kt, float* vp, int64_t j_begin,
                        int64_t j_end) {
  const int64_t N = p->N, Np = p->Np, D = p->Dqk, Dv = p->Dv, Dvp = p->Dvp;
  const int64_t kb = b * p->sk[0] + h * p->sk[1], vb = b * p->sv[0] + h * p->sv[1];
  for (int64_t j0 = j_begin; j0 < j_end; j0 += 16) {
    const int nk = (int)(N - j0 < 16 ? (N - j0 > 0 ? N - j0 : 0) : 16);
    prefetch_kv_rows(p, b, h, j0 + 32, j0 + 48 < j_end ? j0 + 48 : j_end, true);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {  // 16 keys x 16 channels transposed in registers
      const int nd = (int)(D - d0 < 16 ? D - d0 : 16);
      vf r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = i < nk ? load_row(p->k, kb + (j0 + i) * p->sk[2] + d0, nd, p->bf16) : vzero();
      transpose16(r);
#pragma GCC unroll 16
      for (int d = 0; d < 16; ++d)
        if (d < nd) vstore(kt + kt_slot(Np, D, d0 + d, j0), r[d]);
    }
    for (int i = 0; i < 16; ++i) {
      float* dst = vp + (j0 + i) * Dvp;
      for (int64_t c = 0; c < Dvp; c += 16) {
        const int n = i < nk ? (int)(Dv - c < 16 ? Dv - c : 16) : 0;
        vstore(dst + c, n > 0 ? load_row(p->v, vb + (j0 + i) * p->sv[2] + c, n, p->bf16) : vzero());
      }
    }
  }
}
#else
static void pack_kv_f32(const AttnParams* p, int64_t b, int64_t h, float* kt, float* vp, int64_t j_begin,
                        int64_t j_end) {
  const int64_t N = p->N, Np = p->Np, D = p->Dqk, Dv = p->Dv, Dvp = p->Dvp;
  const int64_t kb = b * p->sk[0] + h * p->sk[1], vb = b * p->sv[0] + h * p->sv[1];
  for (int64_t j = j_begin; j < j_end; ++j) {
    if (j % 8 == 0) prefetch_kv_rows(p, b, h, j + 16, j + 24 < j_end ? j + 24 : j_end, true);
    if (j >= N) {
      for (int64_t d = 0; d < D; ++d) kt[kt_slot(Np, D, d, j)] = 0.f;
      for (int64_t d = 0; d < Dvp; ++d) vp[j * Dvp + d] = 0.f;
      continue;
    }
    for (int64_t d = 0; d < D; ++d) kt[kt_slot(Np, D, d, j)] = load_elem(p->k, kb + j * p->sk[2] + d, p->bf16);
    for (int64_t d = 0; d < Dv; ++d) vp[j * Dvp + d] = load_elem(p->v, vb + j * p->sv[2] + d, p->bf16);
    for (int64_t d = Dv; d < Dvp; ++d) vp[j * Dvp + d] = 0.f;
  }
}
#endif

#if SPV_NATIVE_BF16
// bf16 K^T as channel pairs [ceil(Dqk/2)][Np][2] and V as key pairs [Np/2][Dvp][2], zero-padded, for
// keys [j_begin, j_end) (multiples of 16). A channel pair is one 32-bit word of a K row, so K^T is
// the 32-bit transpose of K's words.
static void pack_kv_bf16(const AttnParams* p, int64_t b, int64_t h, uint16_t* kt, uint16_t* vp, int64_t j_begin,
                         int64_t j_end) {
  const int64_t N = p->N, Np = p->Np, D = p->Dqk, Dv = p->Dv, Dvp = p->Dvp, Dw = (D + 1) / 2;
  const uint16_t* K = (const uint16_t*)p->k + b * p->sk[0] + h * p->sk[1];
  const uint16_t* V = (const uint16_t*)p->v + b * p->sv[0] + h * p->sv[1];
  for (int64_t j0 = j_begin; j0 < j_end; j0 += 16) {
    const int nk = (int)(N - j0 < 16 ? (N - j0 > 0 ? N - j0 : 0) : 16);
    prefetch_kv_rows(p, b, h, j0 + 32, j0 + 48 < j_end ? j0 + 48 : j_end, true);  // V rows too
    for (int64_t w0 = 0; w0 < Dw; w0 += 16) {  // 16 keys x 16 channel pairs
      const int ne = (int)(D - 2 * w0 < 32 ? D - 2 * w0 : 32);
      const __mmask32 m = ne >= 32 ? 0xffffffffu : (1u << ne) - 1u;
      vf r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < nk ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, K + (j0 + i) * p->sk[2] + 2 * w0)) : vzero();
      transpose16(r);
      const int nw = (ne + 1) / 2;
#pragma GCC unroll 16
      for (int w = 0; w < 16; ++w)
        if (w < nw) vstore((float*)(kt + kt_slot(Np, Dw, w0 + w, j0) * 2), r[w]);
    }
  }
  for (int64_t j = j_begin; j < j_end; j += 2) {  // interleave rows j and j+1 channel by channel
    uint16_t* dst = vp + j * Dvp;
    for (int64_t c = 0; c < Dvp; c += 16) {
      const int n = (int)(Dv - c < 16 ? Dv - c : 16);
      const __mmask16 m = n > 0 ? (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u) : 0;
      const __m256i a = j < N ? _mm256_maskz_loadu_epi16(m, V + j * p->sv[2] + c) : _mm256_setzero_si256();
      const __m256i z = j + 1 < N ? _mm256_maskz_loadu_epi16(m, V + (j + 1) * p->sv[2] + c) : _mm256_setzero_si256();
      const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(z), 16));
      _mm512_storeu_si512(dst + 2 * c, w);
    }
  }
}
#endif

// ---- one query block ----------------------------------------------------------------------------
// What the tiles of one query block share. Row strides are in elements of the Dot type.
template <class Dot>
struct Block {
  typedef typename Dot::elem elem;
  const AttnParams* p;
  const elem* kt;   // packed K^T in panels: key j of channel step dd at kt + kt_slot(Np, nd, dd, j) * STEP
  const elem* qs;   // [nd][QB][STEP] queries of the block, channel-step major so that one pointer with
                    // constant offsets reaches every row (unscaled, zero past D and past nq rows)
  int64_t Dp, nd;   // D rounded up to STEP; channel steps Dp / STEP
  const elem* vp;   // packed V: key step jj at vp + jj * vrow, channel c at + c * STEP
  int64_t vrow;     // Dvp * STEP
  float* s;         // [QB][ss] fp32 scores, then fp32 probabilities (F32Dot)
  elem* pm;         // probabilities P @ V reads: s itself (F32Dot) or a bf16 copy [QB][ss]
  int64_t ss;       // row stride of s and pm
  float* o;         // [QB][Dvp] fp32 accumulator
  float scale2;     // scale * log2(e): scores are kept in base-2 units
  int64_t bias_row0;  // bias offset of (b, h, first query of the block)
  int nq;             // valid queries in the block
  int rows;           // rows the tiles compute: QB, or 6 where nq <= 6 (AVX-512; 197 = 16 * 12 + 5)
  LineQueue* fetch;   // lines the tiles prefetch (the block's output rows, the next head's next piece)
};

// Score vector of block row qi, keys [jv, jv + W), from its dot products: scaled to base 2, bias added,
// keys past N masked to -inf; stored to dst and returned (for the row max).
template <class Dot>
static inline vf score_vector(const Block<Dot>& c, int qi, int64_t jv, vf dots, float* dst) {
  const AttnParams* p = c.p;
  const int valid = (int)(p->N - jv < W ? p->N - jv : W);
  vf x = vmul(dots, vset1(c.scale2));
  if (p->bias && qi < c.nq) x = vfma(load_row(p->bias, c.bias_row0 + qi * p->sb[2] + jv, valid, p->bias_bf16), vset1(LOG2E), x);
  if (valid < W) x = mask_tail(x, valid);
  vstore(dst, x);
  return x;
}

// S[q0 .. q0+MQ)[keys jv0 .. jv0 + NJ*W) of the current key block (s already offset to jv0), with
// the epilogue (scale, bias, tail mask) and the running row max mx[q0 ..]. k: the keys' K^T panel,
// krow elements from one channel step to the next.
template <class Dot, int MQ, int NJ>
__attribute__((noinline)) static void score_tile(const Block<Dot>& c, int q0, int64_t jv0, const typename Dot::elem* k,
                                                 int64_t krow, float* s, vf* mx) {
  const char* const* pf = NJ >= 2 ? c.fetch->take(c.nd) : nullptr;  // see PF_STEPS
  vf acc[MQ][NJ];
#pragma GCC unroll 12
  for (int qi = 0; qi < MQ; ++qi)
#pragma GCC unroll 4
    for (int n = 0; n < NJ; ++n) acc[qi][n] = vzero();
  const typename Dot::elem* q = c.qs + q0 * Dot::STEP;
  for (int64_t dd = 0; dd < c.nd; ++dd, q += QB * Dot::STEP, k += krow) {
    if (NJ >= 2 && dd % PF_STEPS == 0) _mm_prefetch(pf[dd / PF_STEPS], _MM_HINT_T0);
    vf kv[NJ];
    for (int n = 0; n < NJ; ++n) kv[n] = in_register(Dot::load(k + n * W * Dot::STEP));
    for (int qi = 0; qi < MQ; ++qi) {
      const vf qb = Dot::bcast(q + qi * Dot::STEP);
      for (int n = 0; n < NJ; ++n) acc[qi][n] = Dot::dot(acc[qi][n], kv[n], qb);
    }
  }
  const AttnParams* p = c.p;
  const vf sc = vset1(c.scale2);
  if (p->bias == nullptr && jv0 + NJ * W <= p->N) {  // the common case, unrolled so acc stays in registers
#pragma GCC unroll 12
    for (int qi = 0; qi < MQ; ++qi) {
      vf m = mx[q0 + qi];
#pragma GCC unroll 4
      for (int n = 0; n < NJ; ++n) {
        const vf x = vmul(acc[qi][n], sc);
        vstore(s + qi * c.ss + n * W, x);
        m = vmax(m, x);
      }
      mx[q0 + qi] = m;
    }
    return;
  }
#pragma GCC unroll 12
  for (int qi = 0; qi < MQ; ++qi) {
    vf m = mx[q0 + qi];
#pragma GCC unroll 4
    for (int n = 0; n < NJ; ++n) m = vmax(m, score_vector(c, q0 + qi, jv0 + n * W, acc[qi][n], s + qi * c.ss + n * W));
    mx[q0 + qi] = m;
  }
}

#if SPV_AVX512
// The last key vector of a row when it holds only NK < W keys (197 tokens: 5 of 16), with the block's
// queries in the lanes instead of the keys: NK FMAs per channel step instead of QB (a QB x 1 tile of
// which 16 - NK lanes are padding), then one 16 x 16 transpose back to rows of keys. Two accumulator
// sets (even and odd channel steps) keep 2 * NK FMA chains in flight.
template <class Dot, int NK>
__attribute__((noinline)) static void score_tail_tile(const Block<Dot>& c, int64_t jv, const typename Dot::elem* k,
                                                      int64_t krow, float* s, vf* mx) {
  const char* const* pf = c.fetch->take(c.nd);
  vf acc[2][NK];
#pragma GCC unroll 16
  for (int j = 0; j < NK; ++j) acc[0][j] = acc[1][j] = vzero();
  const __mmask16 rows = (__mmask16)((1u << QB) - 1u);  // qs holds QB rows per channel step (zero past nq)
  const float* q = (const float*)c.qs;  // one fp32 or one bf16 channel pair per query
  int64_t dd = 0;
  for (; dd + 1 < c.nd; dd += 2, q += 2 * QB, k += 2 * krow) {
    if (dd % PF_STEPS == 0) _mm_prefetch(pf[dd / PF_STEPS], _MM_HINT_T0);
    const vf q0 = in_register(_mm512_maskz_loadu_ps(rows, q)), q1 = in_register(_mm512_maskz_loadu_ps(rows, q + QB));
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) {
      acc[0][j] = Dot::dot(acc[0][j], q0, Dot::bcast(k + j * Dot::STEP));
      acc[1][j] = Dot::dot(acc[1][j], q1, Dot::bcast(k + krow + j * Dot::STEP));
    }
  }
  if (dd < c.nd) {
    const vf q0 = _mm512_maskz_loadu_ps(rows, q);
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) acc[0][j] = Dot::dot(acc[0][j], q0, Dot::bcast(k + j * Dot::STEP));
  }
  vf r[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) r[j] = j < NK ? vadd(acc[0][j], acc[1][j]) : vzero();
  transpose16(r);  // r[qi]: query qi's scores against the 16 keys (zero past NK, masked below)
#pragma GCC unroll 12
  for (int qi = 0; qi < QB; ++qi)
    if (qi < c.rows) mx[qi] = vmax(mx[qi], score_vector(c, qi, jv, r[qi], s + qi * c.ss));
}
#endif

// Key vectors [jv, jv + nv * W) (nv 0-3) of one K^T panel, its rows krow elements apart, by the
// narrow tiles.
template <class Dot>
static inline __attribute__((always_inline)) void narrow_tiles(const Block<Dot>& c, int nv, int64_t jv, const typename Dot::elem* panel, int64_t krow,
                         float* s, vf* mx) {
  if (nv == 1) {
    if (c.rows == QB) score_tile<Dot, QB, 1>(c, 0, jv, panel, krow, s, mx);
    else for (int q0 = 0; q0 < c.rows; q0 += 6) score_tile<Dot, 6, 1>(c, q0, jv, panel, krow, s + q0 * c.ss, mx);
  } else if (nv == 2) {
    if (QB * 2 <= MAX_ACC && c.rows == QB) score_tile<Dot, (QB * 2 <= MAX_ACC ? QB : 1), 2>(c, 0, jv, panel, krow, s, mx);
    else for (int q0 = 0; q0 < c.rows; q0 += 6) score_tile<Dot, 6, 2>(c, q0, jv, panel, krow, s + q0 * c.ss, mx);
  } else if (nv == 3) {
    for (int q0 = 0; q0 < c.rows; q0 += 6) score_tile<Dot, 6, 3>(c, q0, jv, panel, krow, s + q0 * c.ss, mx);
  }
}

#if SPV_AVX512
template <class Dot>
static inline __attribute__((always_inline)) void tail_tile(const Block<Dot>& c, int64_t keys, int64_t jv, const typename Dot::elem* k, int64_t krow,
                      float* s, vf* mx) {
  switch (keys) {
    case 1: return score_tail_tile<Dot, 1>(c, jv, k, krow, s, mx);
    case 2: return score_tail_tile<Dot, 2>(c, jv, k, krow, s, mx);
    case 3: return score_tail_tile<Dot, 3>(c, jv, k, krow, s, mx);
    case 4: return score_tail_tile<Dot, 4>(c, jv, k, krow, s, mx);
    case 5: return score_tail_tile<Dot, 5>(c, jv, k, krow, s, mx);
    case 6: return score_tail_tile<Dot, 6>(c, jv, k, krow, s, mx);
    case 7: return score_tail_tile<Dot, 7>(c, jv, k, krow, s, mx);
    default: return score_tail_tile<Dot, 8>(c, jv, k, krow, s, mx);
  }
}
#endif

// Scores of the whole block against keys [j0, j0 + nkp) (nkp a multiple of W) into s[QB][ss]: one
// K^T panel per group of QK_NJ key vectors, the narrower last panel by the narrow tiles. A last key
// vector of 1-8 keys (197 tokens: 5; Swin's 49: 1) goes to the tail tile, out of whichever panel
// holds it, where rows have 20 channel steps or more (fewer: the transpose costs more than it saves).
template <class Dot>
static void scores(const Block<Dot>& c, int64_t j0, int64_t nkp, vf* mx) {
  const int64_t nvec = nkp / W, step = Dot::STEP;
  const typename Dot::elem* panel = c.kt + j0 * c.nd * step;
  const int64_t tail_keys = c.p->N - (j0 + (nvec - 1) * W);  // keys in the last vector (<= 0: all padding)
  const bool split_tail = SPV_AVX512 && tail_keys > 0 && tail_keys <= 8 && c.nd >= 20;
  int64_t v = 0;
  for (; v + QK_NJ <= nvec && !(split_tail && v + QK_NJ == nvec); v += QK_NJ, panel += PANEL * c.nd * step)
    for (int q0 = 0; q0 < c.rows; q0 += QK_MQ)
      score_tile<Dot, QK_MQ, QK_NJ>(c, q0, j0 + v * W, panel, PANEL * step, c.s + q0 * c.ss + v * W, mx);
  const int rem = (int)(nvec - v);  // vectors of the last panel (its width: rem * W keys)
  const int64_t jv = j0 + v * W, krow = rem * W * step;
  if (!split_tail) return narrow_tiles(c, rem, jv, panel, krow, c.s + v * W, mx);
  narrow_tiles(c, rem - 1, jv, panel, krow, c.s + v * W, mx);
#if SPV_AVX512
  const int64_t t = rem - 1;
  tail_tile(c, tail_keys, jv + t * W, panel + t * W * step, krow, c.s + (v + t) * W, mx);
#endif
}

// Running softmax state of one query row, in base-2 units.
struct RowState {
  float max;  // largest score so far (-inf before any)
  float sum;  // sum of 2^(score - max) so far (NaN once a score was NaN: the row comes out NaN)
};

// 2^(s - ref) of row qi's key vector at j, stored in place (and as the bf16 copy P @ V reads).
template <class Dot, int DEG>
static inline vf exp_store(const Block<Dot>& c, int qi, int64_t j, vf ref) {
  float* s = c.s + qi * c.ss + j;
  const vf e = vexp2<DEG>(vsub(vload(s), ref));
#if SPV_NATIVE_BF16
  if (Dot::STEP == 2) _mm256_storeu_si256((__m256i*)((uint16_t*)c.pm + qi * c.ss + j), (__m256i)_mm512_cvtneps_pbh(e));
  else vstore(s, e);
#else
  vstore(s, e);
#endif
  return e;
}

// The block's rows for one key block: s <- 2^(s - new row max), the running states updated, corr[qi]
// the factor that rescales what row qi accumulated before. Masked keys (-inf) give exactly 0. In three
// passes over the rows (maxima, exponentials with two partial sums, sums): row by row, each row's
// horizontal max, its chain of adds and its horizontal sum came one after the other (perf: the state
// update waiting on them, ~4% of the bf16 kernel); this way the rows' reductions overlap.
template <class Dot, int DEG>
static void softmax_block(const Block<Dot>& c, int64_t nkp, const vf* mx, RowState* st, float* corr) {
  float ref[QB];
  for (int qi = 0; qi < c.rows; ++qi) {
    const float m = vhmax(mx[qi]), old = st[qi].max;
    const float new_max = m > old ? m : old;
    // While every score so far is -inf the reference is exp(-inf - -inf) = NaN; keep the state at
    // -inf instead (a later finite key rescues the row) and apply the reference's NaN at the end.
    ref[qi] = new_max == -INFINITY ? 0.f : new_max;
    corr[qi] = old == -INFINITY ? 0.f : exp2f(old - ref[qi]);
    st[qi].max = new_max;
  }
  vf sum[QB];
  for (int qi = 0; qi < c.rows; ++qi) {
    const vf r = vset1(ref[qi]);
    vf even = vzero(), odd = vzero();
    int64_t j = 0;
    for (; j + 2 * W <= nkp; j += 2 * W) {
      even = vadd(even, exp_store<Dot, DEG>(c, qi, j, r));
      odd = vadd(odd, exp_store<Dot, DEG>(c, qi, j + W, r));
    }
    if (j < nkp) even = vadd(even, exp_store<Dot, DEG>(c, qi, j, r));
    sum[qi] = vadd(even, odd);
  }
  for (int qi = 0; qi < c.rows; ++qi) st[qi].sum = st[qi].sum * corr[qi] + vhsum(sum[qi]);
}

// O[q0 .. q0+MQ)[channel vectors dvb ..] = O * corr + P[., keys) @ V[keys, .] over nsteps key steps;
// corr == nullptr for the first key block: O starts at 0 (neither cleared nor read).
template <class Dot, int MQ, int NV>
__attribute__((noinline)) static void pv_tile(const Block<Dot>& c, int q0, int64_t dvb, const typename Dot::elem* pm,
                    const typename Dot::elem* vb, int64_t nsteps, const float* corr) {
  vf acc[MQ][NV];
  float* o = c.o + q0 * c.p->Dvp + dvb;
#pragma GCC unroll 12
  for (int qi = 0; qi < MQ; ++qi) {
    const vf cr = vset1(corr == nullptr ? 0.f : corr[q0 + qi]);
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[qi][n] = corr == nullptr ? vzero() : vmul(vload(o + qi * c.p->Dvp + n * W), cr);
  }
  const typename Dot::elem* v = vb + dvb * Dot::STEP;
  const typename Dot::elem* pq = pm + q0 * c.ss;
  const char* const* pf = NV >= 2 ? c.fetch->take(nsteps) : nullptr;  // see PF_STEPS
  for (int64_t jj = 0; jj < nsteps; ++jj) {
    if (NV >= 2 && jj % PF_STEPS == 0) _mm_prefetch(pf[jj / PF_STEPS], _MM_HINT_T0);
    vf vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = in_register(Dot::load(v + jj * c.vrow + n * W * Dot::STEP));
    for (int qi = 0; qi < MQ; ++qi) {
      const vf pb = Dot::bcast(pq + qi * c.ss + jj * Dot::STEP);
      for (int n = 0; n < NV; ++n) acc[qi][n] = Dot::dot(acc[qi][n], vv[n], pb);
    }
  }
#pragma GCC unroll 12
  for (int qi = 0; qi < MQ; ++qi)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) vstore(o + qi * c.p->Dvp + n * W, acc[qi][n]);
}

// P @ V of the block for one key block: channel vectors in groups of up to 4 (2 on AVX2).
template <class Dot>
static void pv(const Block<Dot>& c, const typename Dot::elem* vb, int64_t nsteps, const float* corr) {
  const int64_t nvec = c.p->Dvp / W;
  for (int64_t v0 = 0; v0 < nvec;) {
    const int64_t left = nvec - v0;
#if SPV_AVX512
    if (left >= 4) {
      for (int q0 = 0; q0 < c.rows; q0 += 6) pv_tile<Dot, 6, 4>(c, q0, v0 * W, c.pm, vb, nsteps, corr);
      v0 += 4;
    } else if (left == 3) {
      for (int q0 = 0; q0 < c.rows; q0 += 6) pv_tile<Dot, 6, 3>(c, q0, v0 * W, c.pm, vb, nsteps, corr);
      v0 += 3;
    } else
#endif
    if (left >= 2) {
      if (QB * 2 <= MAX_ACC && c.rows == QB) pv_tile<Dot, (QB * 2 <= MAX_ACC ? QB : 1), 2>(c, 0, v0 * W, c.pm, vb, nsteps, corr);
      else for (int q0 = 0; q0 < c.rows; q0 += 6) pv_tile<Dot, 6, 2>(c, q0, v0 * W, c.pm, vb, nsteps, corr);
      v0 += 2;
    } else {
      if (c.rows == QB) pv_tile<Dot, QB, 1>(c, 0, v0 * W, c.pm, vb, nsteps, corr);
      else for (int q0 = 0; q0 < c.rows; q0 += 6) pv_tile<Dot, 6, 1>(c, q0, v0 * W, c.pm, vb, nsteps, corr);
      v0 += 1;
    }
  }
}

// out rows = o / sum (NaN where every score was -inf, as softmax gives).
static void store_rows(const AttnParams* p, const float* o, const RowState* st, int64_t out0, int nq) {
  for (int qi = 0; qi < nq; ++qi) {
    const float inv = st[qi].max == -INFINITY ? NAN : 1.0f / st[qi].sum;
    const vf sc = vset1(inv);
    for (int64_t c = 0; c < p->Dv; c += W) {
      const int lanes = (int)(p->Dv - c < W ? p->Dv - c : W);
      store_lanes(p->out, out0 + qi * p->so[2] + c, vmul(vload(o + qi * p->Dvp + c), sc), lanes, p->bf16);
    }
  }
}

// Queries [i, i + nq) of head (b, h) into qs [Dp / STEP][QB][STEP] (zero past D and past nq rows):
// fp32 (bf16 widened) for F32Dot, bf16 channel pairs (32-bit words) as is for Bf16Dot. On AVX-512 a
// 16 x 16 word transpose per 16 channels (words); AVX2 copies element by element.
#if SPV_AVX512
static void load_queries_words(const AttnParams* p, int64_t qrow0, int nq, int64_t nwords, int pairs, float* qs) {
  for (int64_t w0 = 0; w0 < nwords; w0 += 16) {
    const int64_t ne = pairs ? p->Dqk - 2 * w0 : p->Dqk - w0;  // elements left in a row
    vf r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i >= nq) { r[i] = vzero(); continue; }
      if (!pairs) { r[i] = load_row(p->q, qrow0 + i * p->sq[2] + w0, (int)(ne < 16 ? ne : 16), p->bf16); continue; }
      const __mmask32 m = ne >= 32 ? 0xffffffffu : (1u << ne) - 1u;
      r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, (const uint16_t*)p->q + qrow0 + i * p->sq[2] + 2 * w0));
    }
    transpose16(r);
    for (int w = 0; w < 16 && w0 + w < nwords; ++w) _mm512_mask_storeu_ps(qs + (w0 + w) * QB, (__mmask16)((1u << QB) - 1u), r[w]);
  }
}
static void load_queries(const AttnParams* p, int64_t qrow0, int nq, int64_t Dp, float* qs) {
  load_queries_words(p, qrow0, nq, Dp, 0, qs);
}
#else
static void load_queries(const AttnParams* p, int64_t qrow0, int nq, int64_t Dp, float* qs) {
  for (int qi = 0; qi < QB; ++qi)
    for (int64_t d = 0; d < Dp; ++d)
      qs[d * QB + qi] = qi < nq && d < p->Dqk ? load_elem(p->q, qrow0 + qi * p->sq[2] + d, p->bf16) : 0.f;
}
#endif
#if SPV_NATIVE_BF16
static void load_queries(const AttnParams* p, int64_t qrow0, int nq, int64_t Dp, uint16_t* qs) {
  load_queries_words(p, qrow0, nq, Dp / 2, 1, (float*)qs);
}
#endif

template <class Dot>
static void query_block(Block<Dot>& c, int64_t out0) {
  const AttnParams* p = c.p;
  RowState st[QB];
  for (int qi = 0; qi < QB; ++qi) st[qi] = RowState{-INFINITY, 0.f};
  for (int64_t j0 = 0; j0 < p->Np; j0 += KB) {
    const int64_t nkp = p->Np - j0 < KB ? p->Np - j0 : KB;
    vf mx[QB];
    for (int qi = 0; qi < QB; ++qi) mx[qi] = vset1(-INFINITY);
    scores<Dot>(c, j0, nkp, mx);
    float corr[QB];
    softmax_block<Dot, Dot::STEP == 2 ? 3 : 5>(c, nkp, mx, st, corr);
    const int64_t nk = p->N - j0 < nkp ? p->N - j0 : nkp;
    pv<Dot>(c, c.vp + j0 / Dot::STEP * c.vrow, (nk + Dot::STEP - 1) / Dot::STEP, j0 == 0 ? nullptr : corr);
  }
  store_rows(p, c.o, st, out0, c.nq);
}

// ---- per-thread scratch: two head buffers, so that the next head is packed while this one runs ----
// A head buffer holds everything the tiles read of one head: K^T, V and the queries of every block
// (Q^T per block), packed from the strided rows of the qkv output. Those rows sit in L3 or memory,
// and packing a head at its start waited on the misses (measured: pack + query loads ~15% of the
// kernel at batch 8, ~4% when the rows were in L2); packing the next head in pieces between this
// head's query blocks, each piece fetched a block ahead, overlaps the misses with the tiles.
enum { HEADER_FLOATS = 16 };  // int64 ready_head (+1; 0: none, the caller zeroes it), int32 its buffer

static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
static int64_t n_qblocks(const AttnParams* p) { return (p->N + QB - 1) / QB; }
static int64_t dp_of(const AttnParams* p) { return (p->Dqk + 1) / 2 * 2; }
static int64_t head_buffer_floats(const AttnParams* p) {
  return round16(dp_of(p) * p->Np) + round16(p->Np * p->Dvp) + round16(n_qblocks(p) * QB * dp_of(p));
}

// Floats of scratch one thread needs (64-byte aligned pieces).
static int64_t queue_pad(const AttnParams* p) {  // tile steps: channel steps (<= Dp) or key steps (<= KB)
  return ((dp_of(p) > KB ? dp_of(p) : KB) + PF_STEPS - 1) / PF_STEPS;
}
static int64_t queue_floats(const AttnParams* p) {
  return round16((LineQueue::MAX_LINES + queue_pad(p)) * (int64_t)(sizeof(const char*) / sizeof(float)));
}
static int64_t scratch_floats(const AttnParams* p) {
  const int64_t ss = p->Np < KB ? p->Np : KB;
  return HEADER_FLOATS + 2 * head_buffer_floats(p) + 2 * round16(QB * ss) + round16(QB * p->Dvp) + queue_floats(p);
}

struct HeadBuffer {
  float* kt;  // K^T in panels (kt_slot; F32Dot: Dqk rows of keys; Bf16Dot: Dp/2 rows of channel pairs)
  float* vp;  // V (F32Dot: [Np][Dvp]; Bf16Dot: key pairs [Np/2][Dvp][2])
  float* qs;  // query block k at qs + k * QB * Dp: [Dp / STEP][QB][STEP] elements (see load_queries)
};

static HeadBuffer head_buffer(const AttnParams* p, float* scratch, int which) {
  HeadBuffer hb;
  hb.kt = scratch + HEADER_FLOATS + which * head_buffer_floats(p);
  hb.vp = hb.kt + round16(dp_of(p) * p->Np);
  hb.qs = hb.vp + round16(p->Np * p->Dvp);
  return hb;
}

// Piece `part` of `parts` of head (b, h): its share of the 16-key groups of K and V and of the query
// blocks [k0, k1), packed into hb; or, with `fetch`, only the piece's rows queued for prefetching.
template <class Dot>
static void pack_piece(const AttnParams* p, int64_t b, int64_t h, const HeadBuffer& hb, int64_t k0, int64_t k1,
                       int64_t part, int64_t parts, LineQueue* fetch) {
  const int64_t groups = p->Np / 16 + (p->Np % 16 != 0), nb = k1 - k0;
  const int64_t j0 = groups * part / parts * 16, j1e = groups * (part + 1) / parts * 16;
  const int64_t j1 = j1e < p->Np ? j1e : p->Np;
  const int64_t qb0 = k0 + nb * part / parts, qb1 = k0 + nb * (part + 1) / parts;
  const int64_t qbase = b * p->sq[0] + h * p->sq[1], es = p->bf16 ? 2 : 4, Dp = dp_of(p);
  if (fetch != nullptr) {
    const char* K = (const char*)p->k + (b * p->sk[0] + h * p->sk[1]) * es;
    const char* V = (const char*)p->v + (b * p->sv[0] + h * p->sv[1]) * es;
    for (int64_t j = j0; j < j1 && j < p->N; ++j) {
      fetch->add(K + j * p->sk[2] * es, p->Dqk * es);
      fetch->add(V + j * p->sv[2] * es, p->Dv * es);
    }
    for (int64_t r = qb0 * QB; r < qb1 * QB && r < p->N; ++r)
      fetch->add((const char*)p->q + (qbase + r * p->sq[2]) * es, p->Dqk * es);
    return;
  }
  if (parts == 1) prefetch_kv_rows(p, b, h, j0, j0 + 32, true);  // a whole head at once: its first rows
#if SPV_NATIVE_BF16
  if (Dot::STEP == 2) pack_kv_bf16(p, b, h, (uint16_t*)hb.kt, (uint16_t*)hb.vp, j0, j1);
  else pack_kv_f32(p, b, h, hb.kt, hb.vp, j0, j1);
#else
  pack_kv_f32(p, b, h, hb.kt, hb.vp, j0, j1);
#endif
  for (int64_t k = qb0; k < qb1; ++k) {
    for (int64_t r = (k + 1) * QB; r < (k + 2) * QB && r < qb1 * QB && r < p->N; ++r)  // the next block's rows
      for (int64_t off = 0; off < p->Dqk * es; off += 64)
        _mm_prefetch((const char*)p->q + (qbase + r * p->sq[2]) * es + off, _MM_HINT_T0);
    const int nq = (int)(p->N - k * QB < QB ? p->N - k * QB : QB);
    load_queries(p, qbase + k * QB * p->sq[2], nq, Dot::STEP == 2 ? Dp : p->Dqk,
                 (typename Dot::elem*)(hb.qs + k * QB * Dp));
  }
}

// Rows [i0, i1) of head (b, h). A whole head whose buffer the previous item of this thread packed is
// not packed again; while its blocks run, the head this thread likely takes next
// (AttnParams::next_head_stride) is packed into the other buffer.
template <class Dot>
static void run_head(const AttnParams* p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch) {
  typedef typename Dot::elem elem;
  const int64_t ss = p->Np < KB ? p->Np : KB, Dp = dp_of(p), head = b * p->H + h;
  int64_t ready;
  int32_t which;
  memcpy(&ready, scratch, 8);
  memcpy(&which, scratch + 2, 4);
  const bool whole = i0 == 0 && i1 == p->N;
  const int64_t k0 = i0 / QB, k1 = (i1 + QB - 1) / QB;
  if (!(whole && ready == head + 1)) {
    which = 0;
    pack_piece<Dot>(p, b, h, head_buffer(p, scratch, which), k0, k1, 0, 1, nullptr);
  }
  const HeadBuffer cur = head_buffer(p, scratch, which), nxt = head_buffer(p, scratch, 1 - which);
  const int64_t next = whole && p->next_head_stride > 0 ? head + p->next_head_stride : -1;
  const bool pipelined = next >= 0 && next < p->B * p->H;
  Block<Dot> c;
  c.p = p;
  c.kt = (const elem*)cur.kt;
  c.Dp = Dot::STEP == 2 ? Dp : p->Dqk;
  c.nd = c.Dp / Dot::STEP;
  c.vp = (const elem*)cur.vp;
  c.vrow = p->Dvp * Dot::STEP;
  float* s = scratch + HEADER_FLOATS + 2 * head_buffer_floats(p);
  c.s = s;
  c.pm = Dot::STEP == 2 ? (elem*)(s + round16(QB * ss)) : (elem*)s;
  c.ss = ss;
  c.o = s + 2 * round16(QB * ss);
  c.scale2 = p->scale * LOG2E;
  const int64_t out_base = b * p->so[0] + h * p->so[1];
  const int64_t parts = k1 - k0, es = p->bf16 ? 2 : 4;
  LineQueue fetch;
  fetch.line = (const char**)(c.o + round16(QB * p->Dvp));
  fetch.pad = (int)queue_pad(p);
  c.fetch = &fetch;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k * QB;
    c.nq = (int)(i1 - i < QB ? i1 - i : QB);
    c.rows = SPV_AVX512 && c.nq <= 6 ? 6 : QB;
    // Fetched a few lines per tile while the block runs: the block's output rows (written at its end;
    // leaving the stores out saved ~6% of the kernel without this, ~4% with it), and the next head's
    // piece packed after the next block (the first block fetches the first two pieces).
    fetch.reset();
    for (int64_t piece = k == k0 ? 0 : k - k0 + 1; pipelined && piece <= k - k0 + 1 && piece < parts; ++piece)
      pack_piece<Dot>(p, next / p->H, next % p->H, nxt, 0, n_qblocks(p), piece, parts, &fetch);
    for (int qi = 0; qi < c.nq; ++qi) fetch.add((char*)p->out + (out_base + (i + qi) * p->so[2]) * es, p->Dv * es);
    fetch.seal();
    c.qs = (const elem*)(cur.qs + k * QB * Dp);
    c.bias_row0 = b * p->sb[0] + h * p->sb[1] + i * p->sb[2];
    query_block<Dot>(c, out_base + i * p->so[2]);
    fetch.flush();
    if (pipelined) pack_piece<Dot>(p, next / p->H, next % p->H, nxt, 0, n_qblocks(p), k - k0, parts, nullptr);
  }
  ready = pipelined ? next + 1 : 0;
  which = 1 - which;
  memcpy(scratch, &ready, 8);
  memcpy(scratch + 2, &which, 4);
}

static void run(const AttnParams* p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch) {
#if SPV_NATIVE_BF16
  if (p->bf16) return run_head<Bf16Dot>(p, b, h, i0, i1, scratch);
#endif
  run_head<F32Dot>(p, b, h, i0, i1, scratch);
}

}  // namespace
}  // namespace ATTN_NS

const AttnKernels* ATTN_ENTRY() {
  static const AttnKernels k = {ATTN_NAME, ATTN_NS::W, ATTN_NS::KB, ATTN_NS::QB, ATTN_NS::scratch_floats,
                                ATTN_NS::run};
  return &k;
}

}  // namespace sparsevit_cpu
