// sparsevit_C::fine_linear -- y = act(x @ W^T + b) with W fine-grained sparse (unstructured or 1xU
// tiles, see sparsevit/formats/fine.py), on CPU.
//
// This file holds the torch-facing part: argument checks, scratch allocation (all of it before the
// parallel regions), run-time ISA choice, the work split over threads and the NaN/Inf fix-up. The
// micro-kernels live in sparse_fine_impl.h, compiled once per ISA by sparse_fine_avx512bf16.cpp /
// sparse_fine_avx512.cpp / sparse_fine_avx2.cpp.
//
// Ops registered here:
//   fine_linear(x[T,in], values[nnz,U], col_indices[nnz], seg_ptr[out,nseg+1], bias?, out_features,
//               in_features, unit, act, isa, token_tile=0) -> y[T,out]
//               act: 0 none, 1 gelu(erf), 2 gelu(tanh); token_tile: tokens per packed tile (0: the
//               kernel's default: AVX-512 fp32 80, bf16 128; AVX2 32)
//   fine_mlp(x, fc1 fields, hidden, unit1, act1, fc2 fields, out_features, in_features, unit2, isa,
//            token_tile=0) -> fc2(act1(fc1(x))), the hidden activation never leaves the packed
//            layout (see fine_mlp below)
//   fine_linear_isa(isa) -> str     kernel name that `isa` resolves to on this CPU ("" = none)
// Column indices are trusted (FineSparseWeight validates every one at construction); the segment
// pointers, which bound every loop, are checked here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "sparse_fine_params.h"
#include "thread_scratch.h"

namespace sparsevit_cpu {
namespace {

// Same ISA levels as bsr_linear: -1 best, 0 avx2, 1 avx512 (bf16 widened), 2 avx512 + avx512_bf16.
const FineKernels* select_fine_kernels(int64_t isa) {
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512bf16")) return 2;
    if (avx512) return 1;
    return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 0 : -2;
  }();
  if (isa < 0) isa = best;
  if (isa > best || isa < 0) return nullptr;
  if (isa == 2) return fine_kernels_avx512bf16();
  if (isa == 1) return fine_kernels_avx512();
  return fine_kernels_avx2();
}

std::string fine_linear_isa(int64_t isa) {
  const FineKernels* k = select_fine_kernels(isa);
  return k ? std::string(k->name) : std::string();
}

// One layer's weight: `op` names the op (and layer) in every message.
void check_weight(const char* op, at::ScalarType dtype, const at::Tensor& values, const at::Tensor& col,
                  const at::Tensor& seg, const c10::optional<at::Tensor>& bias, int64_t out_f, int64_t unit,
                  int64_t act) {
  const bool bf16 = dtype == at::kBFloat16;
  TORCH_CHECK(values.scalar_type() == dtype, op, "weight dtype ", values.scalar_type(),
              " != input dtype ", dtype, "; convert with FineSparseWeight.to(dtype=...)");
  TORCH_CHECK(unit == 1 || unit == 2 || unit == 4 || unit == 8, op, "unit must be 1, 2, 4 or 8, got ", unit);
  TORCH_CHECK(!bf16 || unit % 2 == 0, op, "bfloat16 needs an even unit width (column pairs), got ", unit,
              "; re-pack with FineSparseWeight.to(dtype=torch.bfloat16)");
  TORCH_CHECK(act >= 0 && act <= 2, op, "act must be 0, 1 or 2");
  TORCH_CHECK(values.dim() == 2 && values.size(1) == unit, op, "values must be [nnz, ", unit, "], got ",
              values.sizes());
  TORCH_CHECK(col.scalar_type() == at::kInt && seg.scalar_type() == at::kInt, op,
              "col_indices / seg_ptr must be int32");
  TORCH_CHECK(col.dim() == 1 && col.size(0) == values.size(0), op, "col_indices has ", col.sizes(),
              " entries for ", values.size(0), " units");
  TORCH_CHECK(seg.dim() == 2 && seg.size(0) == out_f && seg.size(1) >= 2, op, "seg_ptr must be [", out_f,
              ", n_segments + 1], got ", seg.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f, op, "bias must be [", out_f, "], got ", bias->sizes());
  }
}

void check_x(const char* op, const at::Tensor& x, int64_t in_f) {
  TORCH_CHECK(x.device().is_cpu(), op, "x must be on CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D [tokens, in_features], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              "supports float32 and bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == in_f, op, "x has ", x.size(1), " features, weight expects ", in_f);
}

void check_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col, const at::Tensor& seg,
                const c10::optional<at::Tensor>& bias, int64_t out_f, int64_t in_f, int64_t unit, int64_t act) {
  const char* op = "sparsevit_C::fine_linear: ";
  check_x(op, x, in_f);
  check_weight(op, x.scalar_type(), values, col, seg, bias, out_f, unit, act);
}

// Every loop bound comes from seg_ptr: rows must rise within [0, nnz] and chain row to row.
void check_segments(const int32_t* seg, int64_t out_f, int64_t nseg1, int64_t nnz) {
  int32_t prev = 0;
  for (int64_t o = 0; o < out_f; ++o) {
    const int32_t* s = seg + o * nseg1;
    TORCH_CHECK(s[0] == prev, "sparsevit_C::fine_linear: seg_ptr row ", o, " starts at ", s[0],
                ", expected ", prev, " (corrupt FineSparseWeight)");
    for (int64_t j = 1; j < nseg1; ++j)
      TORCH_CHECK(s[j] >= s[j - 1] && s[j] <= nnz, "sparsevit_C::fine_linear: seg_ptr[", o, ", ", j, "] = ",
                  s[j], " out of order or past ", nnz, " units (corrupt FineSparseWeight)");
    prev = s[nseg1 - 1];
  }
  TORCH_CHECK(prev == nnz, "sparsevit_C::fine_linear: seg_ptr ends at ", prev, ", expected ", nnz);
}

// Dense semantics for non-finite inputs: an Inf/NaN in x[t, k] meets a *zero* weight wherever row o
// stores nothing at column k, and 0 * Inf = NaN in F.linear. The kernel skips those zeros, so tokens
// flagged by the pack get y[t, o] = NaN for every row that does not store column k. Rare; scalar.
template <typename T>
void nonfinite_fixup(const FineParams& p, const uint8_t* bad, const int32_t* col, const int32_t* seg,
                     int64_t nseg1) {
  const T* x = (const T*)p.x;
  T* y = (T*)p.y;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t t = 0; t < p.T; ++t) {
    if (!bad[t]) continue;
    std::vector<int64_t> cols;
    for (int64_t k = 0; k < p.in; ++k)
      if (!std::isfinite((float)x[t * p.ldx + k])) cols.push_back(k);
    for (int64_t o = 0; o < p.out; ++o) {
      const int32_t* b = col + seg[o * nseg1];
      const int32_t* e = col + seg[o * nseg1 + nseg1 - 1];
      for (int64_t k : cols) {
        const int32_t* it = std::upper_bound(b, e, (int32_t)k);  // first unit starting after k
        if (it == b || k >= (int64_t)it[-1] + p.U) {
          y[t * p.ldy + o] = nan;
          break;
        }
      }
    }
  }
}

// Row ranges balanced by stored units (plus a per-row cost for the segment loop and epilogue),
// each at most `rows_cap` rows so its fp32 partial sums (rows x TT) stay in L2 between input
// chunks; ranges x token tiles are handed out dynamically so a thread that loses its core does not
// stall the rest. Work units run tile-major: one thread's consecutive units share a packed tile.
std::vector<int64_t> row_ranges(const FineParams& p, int64_t want, int64_t rows_cap) {
  const int64_t nseg1 = p.nseg + 1;
  auto cost = [&](int64_t o) {  // cost of rows [0, o)
    return (double)p.seg[o * nseg1] + (double)o * (2.0 + 0.5 * p.nseg);
  };
  const double total = (double)p.seg[(p.out - 1) * nseg1 + p.nseg] + (double)p.out * (2.0 + 0.5 * p.nseg);
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(p.out, want));
  std::vector<int64_t> rb{0};
  int64_t r = 0;
  for (int64_t q = 1; q <= n; ++q) {
    const double target = total * (double)q / (double)n;
    while (r < p.out && cost(r) < target) ++r;
    const int64_t end = q == n ? p.out : std::max(r, rb.back());
    while (end - rb.back() > rows_cap) rb.push_back(rb.back() + rows_cap);  // split what is too large
    if (end > rb.back()) rb.push_back(end);
  }
  return rb;
}

// With enough token tiles for every thread (>= 3 each, so the dynamic hand-out still balances), a
// thread claims a whole tile: it packs the tile and runs every row range on it while the packed tile
// is in its own L2. Packing everything first instead sends the whole packed activation (as large as
// x) to L3 and back, which measured 10-20% of the call at 90% sparsity. With few tiles (short
// inputs, several threads) the tiles are packed up front and row ranges x tiles are handed out.
void run_compute(const FineKernels* kern, const FineParams& p, float* scratch, int64_t rows_cap) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const bool tile_owned = nth == 1 || p.n_tiles >= 3 * nth;
  if (!tile_owned) at::parallel_for(0, p.n_tiles, 1, [&](int64_t b, int64_t e) { kern->pack(&p, b, e); });
  const int64_t want = tile_owned ? 1 : (3 * nth + p.n_tiles - 1) / p.n_tiles;
  const std::vector<int64_t> rb = row_ranges(p, want, rows_cap);
  const int64_t P_r = (int64_t)rb.size() - 1;
  const int64_t n_units = tile_owned ? p.n_tiles : P_r * p.n_tiles;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nth, n_units), 1, [&](int64_t b, int64_t e) {
    float* mine = scratch + (int64_t)at::get_thread_num() * rows_cap * p.TT;
    for (int64_t i = b; i < e; ++i) {
      for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) {
        if (tile_owned) {
          kern->pack(&p, u, u + 1);
          for (int64_t pr = 0; pr < P_r; ++pr)
            if (rb[pr] < rb[pr + 1]) kern->compute(&p, u, rb[pr], rb[pr + 1], mine);
          continue;
        }
        const int64_t pr = u % P_r, tile = u / P_r;
        if (rb[pr] < rb[pr + 1]) kern->compute(&p, tile, rb[pr], rb[pr + 1], mine);
      }
    }
  });
}

// Tokens per tile: a multiple of the vector width up to the kernel's maximum (0: the kernel's
// default for the dtype, sized so one chunk of packed activations (TT x chunk columns) stays in L1).
int checked_token_tile(const FineKernels* kern, int64_t token_tile, bool bf16) {
  const int W = kern->vector_width;
  TORCH_CHECK(token_tile == 0 || (token_tile > 0 && token_tile % W == 0 && token_tile <= kern->token_tile),
              "sparsevit_C::fine_linear: token_tile must be 0 or a multiple of ", W, " up to ",
              kern->token_tile, ", got ", token_tile);
  if (token_tile) return (int)token_tile;
  return bf16 ? kern->token_tile : kern->fp32_token_tile;
}

// Token tiles of near-equal size, whole vectors each, at most TT tokens: ceil(T / TT) of them, rounded
// up to a multiple of the thread count where threads own whole tiles (see run_compute). Full tiles
// and one short last tile balanced badly: 1576 tokens at 2 threads made 12 tiles of 128 and one of
// 40, so one thread ran 7 full tiles while the other ran 5 and the short one; 14 tiles of 112-128
// tokens give both 7 tiles of equal work. Returns tile_start (n_tiles + 1 entries) and sets n_tiles.
std::vector<int64_t> plan_tiles(FineParams& p, int W, int64_t nth) {
  const int64_t n_vec = (p.T + W - 1) / W;
  int64_t n = (p.T + p.TT - 1) / p.TT;
  if (nth > 1 && n >= 3 * nth) n = std::min(n_vec, (n + nth - 1) / nth * nth);
  std::vector<int64_t> start(n + 1);
  for (int64_t i = 0; i < n; ++i) start[i] = i * n_vec / n * W;
  start[n] = p.T;
  p.n_tiles = n;
  return start;
}

// 128 KiB of partial sums per thread: L2-resident, so chunk-to-chunk reloads stay cheap
int64_t rows_cap_for(int TT) { return std::max<int64_t>(16, (int64_t)(32768 / TT) / 16 * 16); }

// Everything of one layer's FineParams except y and the scratch pointers (xp, bad_token); the token
// tiles' starts go to `tile_start`, which must outlive the call.
FineParams layer_params(const FineKernels* kern, const at::Tensor& xc, const at::Tensor& vc, const at::Tensor& cc,
                        const at::Tensor& sc, const at::Tensor* bias_f, int64_t out_features,
                        int64_t in_features, int64_t unit, int64_t act, int64_t token_tile,
                        std::vector<int64_t>& tile_start) {
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  FineParams p{};
  p.TT = checked_token_tile(kern, token_tile, bf16);
  const int64_t Kp = (in_features + unit - 1) / unit * unit;
  p.x = xc.data_ptr();
  p.ldx = xc.stride(0);
  p.values = vc.data_ptr();
  p.col = cc.data_ptr<int32_t>();
  p.seg = sc.data_ptr<int32_t>();
  p.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  p.T = xc.size(0);
  p.in = in_features;
  p.out = out_features;
  p.words_in = bf16 ? xc.size(1) / 2 : in_features;
  p.words_pad = bf16 ? Kp / 2 : Kp;
  p.tile_words = p.words_pad * p.TT;
  tile_start = plan_tiles(p, kern->vector_width, std::max<int64_t>(1, at::get_num_threads()));
  p.tile_start = tile_start.data();
  p.nseg = sc.size(1) - 1;
  p.U = (int)unit;
  p.bf16 = bf16 ? 1 : 0;
  p.act = (int)act;
  p.xp_first_tile = 0;
  return p;
}

at::Tensor fine_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col,
                       const at::Tensor& seg, const c10::optional<at::Tensor>& bias, int64_t out_features,
                       int64_t in_features, int64_t unit, int64_t act, int64_t isa, int64_t token_tile) {
  check_args(x, values, col, seg, bias, out_features, in_features, unit, act);
  const FineKernels* kern = select_fine_kernels(isa);
  TORCH_CHECK(kern != nullptr, "sparsevit_C::fine_linear: this CPU lacks the requested ISA level ", isa,
              " (AVX2+FMA is the minimum); use the reference path");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor vc = values.contiguous(), cc = col.contiguous(), sc = seg.contiguous();
  const int64_t nseg1 = sc.size(1), nnz = vc.size(0);
  check_segments(sc.data_ptr<int32_t>(), out_features, nseg1, nnz);

  // The pack reads x as 32-bit words: bf16 rows need an even length and a 4-byte aligned start.
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  if (bf16 && ((in_features % 2) || (xc.stride(0) % 2) || ((uintptr_t)xc.data_ptr() % 4))) {
    xc = at::constant_pad_nd(x, {0, in_features % 2}).contiguous();
  }
  const int64_t T = xc.size(0);
  at::Tensor y = at::empty({T, out_features}, x.options());
  if (T == 0 || out_features == 0) return y;
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();

  std::vector<int64_t> tile_start;
  FineParams p = layer_params(kern, xc, vc, cc, sc, bias.has_value() ? &bias_f : nullptr, out_features,
                               in_features, unit, act, token_tile, tile_start);
  p.y = y.data_ptr();
  p.ldy = out_features;

  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_cap = rows_cap_for(p.TT);
  const size_t xp_bytes = (size_t)(p.n_tiles * p.tile_words * 4);
  const size_t acc_bytes = (size_t)(nth * rows_cap * p.TT * 4);
  const size_t bad_bytes = (size_t)(p.n_tiles * p.TT + 63) / 64 * 64;
  static thread_local ThreadScratch workspace("sparsevit_C::fine_linear");
  char* ws = workspace.get(xp_bytes + acc_bytes + bad_bytes);
  p.xp = ws;
  float* scratch = (float*)(ws + xp_bytes);
  p.bad_token = (uint8_t*)(ws + xp_bytes + acc_bytes);

  run_compute(kern, p, scratch, rows_cap);  // packs the activation tiles too
  bool any_bad = false;
  for (int64_t t = 0; t < T; ++t) any_bad = any_bad || p.bad_token[t];
  if (any_bad) {
    if (bf16) nonfinite_fixup<at::BFloat16>(p, p.bad_token, p.col, p.seg, nseg1);
    else nonfinite_fixup<float>(p, p.bad_token, p.col, p.seg, nseg1);
  }
  return y;
}

// Work units [0, n) handed out dynamically to min(threads, n) threads: fn(unit, thread index).
template <typename F>
void hand_out(int64_t n, F fn) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nth, n), 1, [&](int64_t b, int64_t e) {
    const int64_t me = at::get_thread_num();
    for (int64_t i = b; i < e; ++i)
      for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) fn(u, me);
  });
}

// Row ranges for fc1 of a bf16 fused MLP start at even rows (its rows are stored in pairs): each
// interior bound rounds down, so a range may hold one row more than rows_cap (scratch allows it).
void even_bounds(std::vector<int64_t>& rb) {
  for (size_t i = 1; i + 1 < rb.size(); ++i) rb[i] &= ~(int64_t)1;
}

// Zeroes the words of a finished hidden tile past the hidden width (fc2's unit padding); returns
// whether the tile holds a NaN/Inf for a real token.
bool seal_hidden_tile(const FineKernels* kern, const FineParams& p1, const FineParams& p2, int64_t tile, float* h) {
  const int64_t TT = p1.TT;
  if (p2.words_pad > p2.words_in) memset(h + p2.words_in * TT, 0, (size_t)((p2.words_pad - p2.words_in) * TT * 4));
  const int lanes = (int)(p1.tile_start[tile + 1] - p1.tile_start[tile]);
  return kern->any_nonfinite(h, p2.words_in, (int)TT, lanes, p1.bf16);
}

// The fused MLP's buffers: hidden tiles (one per thread, or one per token tile), per-thread fc2
// partial sums (and bf16 fc1 rows), and a NaN/Inf flag per hidden tile.
struct MlpScratch {
  float* hidden;
  float* acc;
  int64_t acc_floats;  // per thread
  uint8_t* hidden_bad;
};

// Runs fc1 into packed hidden tiles and fc2 from them. With enough token tiles for every thread, a
// thread owns a tile start to end (pack, fc1, fc2), so its hidden tile stays in its own L2; else
// every tile's hidden activation is kept and row ranges x tiles are shared out, layer by layer.
void run_mlp(const FineKernels* kern, const FineParams& p1, FineParams& p2, const MlpScratch& m, bool tile_owned,
             int64_t rows_cap) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), n_tiles = p1.n_tiles;
  const int64_t want = tile_owned ? 1 : (3 * nth + n_tiles - 1) / n_tiles;
  std::vector<int64_t> rb1 = row_ranges(p1, want, rows_cap);
  const std::vector<int64_t> rb2 = row_ranges(p2, want, rows_cap);
  if (p1.bf16) even_bounds(rb1);
  const int64_t P1 = (int64_t)rb1.size() - 1, P2 = (int64_t)rb2.size() - 1;
  auto fc1 = [&](int64_t tile, int64_t pr, float* h, float* acc) {
    if (rb1[pr] < rb1[pr + 1]) kern->compute_packed(&p1, tile, rb1[pr], rb1[pr + 1], h, acc);
  };
  auto fc2 = [&](const FineParams& q2, int64_t tile, int64_t pr, float* acc) {
    if (rb2[pr] < rb2[pr + 1]) kern->compute(&q2, tile, rb2[pr], rb2[pr + 1], acc);
  };
  if (tile_owned) {
    hand_out(n_tiles, [&](int64_t tile, int64_t me) {
      float* h = m.hidden + me * p2.tile_words;
      float* acc = m.acc + me * m.acc_floats;
      kern->pack(&p1, tile, tile + 1);
      for (int64_t pr = 0; pr < P1; ++pr) fc1(tile, pr, h, acc);
      m.hidden_bad[tile] = seal_hidden_tile(kern, p1, p2, tile, h);
      FineParams q2 = p2;
      q2.xp = h;
      q2.xp_first_tile = tile;
      for (int64_t pr = 0; pr < P2; ++pr) fc2(q2, tile, pr, acc);
    });
    return;
  }
  at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) { kern->pack(&p1, b, e); });
  hand_out(P1 * n_tiles, [&](int64_t u, int64_t me) {
    fc1(u / P1, u % P1, m.hidden + (u / P1) * p2.tile_words, m.acc + me * m.acc_floats);
  });
  for (int64_t tile = 0; tile < n_tiles; ++tile)
    m.hidden_bad[tile] = seal_hidden_tile(kern, p1, p2, tile, m.hidden + tile * p2.tile_words);
  p2.xp = m.hidden;
  hand_out(P2 * n_tiles, [&](int64_t u, int64_t me) { fc2(p2, u / P2, u % P2, m.acc + me * m.acc_floats); });
}

// fc2(act(fc1(x))) with the hidden activation kept in the packed token-tile layout: fc1 leaves its
// rows where fc2 reads them, which drops fc1's transposing store of [T, hidden] and fc2's pack of it
// (both as large as the hidden activation, 4x the block's width in a ViT). Same kernels, same
// summation order and (bf16) the same rounding of the hidden activation: the result equals
// fine_linear twice bit for bit. A NaN/Inf in x or in the hidden activation reruns the call as two
// fine_linear calls, whose fix-up gives the dense semantics.
at::Tensor fine_mlp(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& col1, const at::Tensor& seg1,
                    const c10::optional<at::Tensor>& bias1, int64_t hidden, int64_t unit1, int64_t act1,
                    const at::Tensor& values2, const at::Tensor& col2, const at::Tensor& seg2,
                    const c10::optional<at::Tensor>& bias2, int64_t out_features, int64_t in_features,
                    int64_t unit2, int64_t isa, int64_t token_tile) {
  const char* op = "sparsevit_C::fine_mlp: ";
  check_x(op, x, in_features);
  check_weight(op, x.scalar_type(), values1, col1, seg1, bias1, hidden, unit1, act1);
  check_weight(op, x.scalar_type(), values2, col2, seg2, bias2, out_features, unit2, 0);
  const FineKernels* kern = select_fine_kernels(isa);
  TORCH_CHECK(kern != nullptr, op, "this CPU lacks the requested ISA level ", isa, " (AVX2+FMA is the minimum)");
  at::Tensor v1 = values1.contiguous(), c1 = col1.contiguous(), s1 = seg1.contiguous();
  at::Tensor v2 = values2.contiguous(), c2 = col2.contiguous(), s2 = seg2.contiguous();
  check_segments(s1.data_ptr<int32_t>(), hidden, s1.size(1), v1.size(0));
  check_segments(s2.data_ptr<int32_t>(), out_features, s2.size(1), v2.size(0));
  auto unfused = [&] {
    at::Tensor h = fine_linear(x, v1, c1, s1, bias1, hidden, in_features, unit1, act1, isa, token_tile);
    return fine_linear(h, v2, c2, s2, bias2, out_features, hidden, unit2, 0, isa, token_tile);
  };
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  if (bf16 && ((in_features % 2) || (xc.stride(0) % 2) || ((uintptr_t)xc.data_ptr() % 4))) return unfused();
  if (xc.size(0) == 0 || out_features == 0 || hidden == 0) return unfused();
  at::Tensor b1, b2;
  if (bias1.has_value()) b1 = bias1->to(at::kFloat).contiguous();
  if (bias2.has_value()) b2 = bias2->to(at::kFloat).contiguous();
  std::vector<int64_t> tiles1, tiles2;  // the same tiles: same tokens, TT and thread count
  FineParams p1 = layer_params(kern, xc, v1, c1, s1, bias1.has_value() ? &b1 : nullptr, hidden, in_features,
                               unit1, act1, token_tile, tiles1);
  // fc2 never packs (its x is fc1's packed output): only the fields its compute and store read.
  FineParams p2 = layer_params(kern, xc, v2, c2, s2, bias2.has_value() ? &b2 : nullptr, out_features, hidden,
                               unit2, 0, token_tile, tiles2);
  const int64_t Kp2 = (hidden + unit2 - 1) / unit2 * unit2;
  p2.words_in = bf16 ? (hidden + 1) / 2 : hidden;
  p2.words_pad = bf16 ? Kp2 / 2 : Kp2;
  p2.tile_words = p2.words_pad * p2.TT;
  at::Tensor y = at::empty({xc.size(0), out_features}, x.options());
  p2.y = y.data_ptr();
  p2.ldy = out_features;

  const int64_t nth = std::max<int64_t>(1, at::get_num_threads()), n_tiles = p1.n_tiles, TT = p1.TT;
  // fc1's bf16 row ranges may hold one row more than rows_cap (even_bounds)
  const int64_t rows_cap = rows_cap_for(p1.TT), acc_floats = (rows_cap + 2) * TT;
  const bool tile_owned = nth == 1 || n_tiles >= 3 * nth;  // see run_mlp
  const int64_t n_h = tile_owned ? nth : n_tiles;
  const size_t xp_bytes = (size_t)(n_tiles * p1.tile_words * 4), h_bytes = (size_t)(n_h * p2.tile_words * 4);
  const size_t acc_bytes = (size_t)(nth * acc_floats * 4), bad_bytes = (size_t)(n_tiles * TT + n_tiles);
  static thread_local ThreadScratch workspace("sparsevit_C::fine_mlp");
  char* ws = workspace.get(xp_bytes + h_bytes + acc_bytes + bad_bytes);
  p1.xp = ws;
  p1.bad_token = (uint8_t*)(ws + xp_bytes + h_bytes + acc_bytes);
  const MlpScratch m{(float*)(ws + xp_bytes), (float*)(ws + xp_bytes + h_bytes), acc_floats,
                     p1.bad_token + n_tiles * TT};
  run_mlp(kern, p1, p2, m, tile_owned, rows_cap);
  bool any_bad = false;
  for (int64_t t = 0; t < p1.T; ++t) any_bad = any_bad || p1.bad_token[t];
  for (int64_t tile = 0; tile < n_tiles; ++tile) any_bad = any_bad || m.hidden_bad[tile];
  return any_bad ? unfused() : y;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def(
      "fine_linear(Tensor x, Tensor values, Tensor col_indices, Tensor seg_ptr, Tensor? bias, "
      "int out_features, int in_features, int unit, int act, int isa=-1, int token_tile=0) -> Tensor");
  m.def(
      "fine_mlp(Tensor x, Tensor values1, Tensor col_indices1, Tensor seg_ptr1, Tensor? bias1, int hidden, "
      "int unit1, int act1, Tensor values2, Tensor col_indices2, Tensor seg_ptr2, Tensor? bias2, "
      "int out_features, int in_features, int unit2, int isa=-1, int token_tile=0) -> Tensor");
  m.def("fine_linear_isa(int isa=-1) -> str", &sparsevit_cpu::fine_linear_isa);
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) {
  m.impl("fine_linear", &sparsevit_cpu::fine_linear);
  m.impl("fine_mlp", &sparsevit_cpu::fine_mlp);
}
