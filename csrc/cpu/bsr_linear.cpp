// sparsevit_C::bsr_linear -- y = act(x @ W^T + b) with W block-sparse (BSR), on CPU.
//
// This file holds the torch-facing part: argument checks, scratch allocation (all of it before the
// parallel region, none in the hot loop), run-time ISA choice and the work split over threads. The
// register-tiled micro-kernels live in bsr_kernel_impl.h, compiled once per ISA by
// bsr_avx512bf16.cpp / bsr_avx512.cpp / bsr_avx2.cpp (function-level `target` options, no -march).
//
// Ops registered here:
//   bsr_linear(x[T,in], packed, col_indices, crow_indices, bias?, out_features, in_features, bh, bw,
//              act, isa) -> y[T,out]        act: 0 none, 1 gelu(erf), 2 gelu(tanh); isa: -1 auto
//   bsr_linear_isa(isa) -> str              kernel name that `isa` resolves to on this CPU ("" = none)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "bsr_host.h"

namespace sparsevit_cpu {
namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// isa: -1 best available, 0 avx2, 1 avx512 (bf16 widened), 2 avx512 + avx512_bf16.
// Returns nullptr when the requested level is not supported by this CPU.
const BsrKernels* select_kernels(int64_t isa) {
  static const int best = cpu_has_avx512bf16() ? 2 : cpu_has_avx512() ? 1 : cpu_has_avx2() ? 0 : -2;
  if (isa < 0) isa = best;
  if (isa > best || isa < 0) return nullptr;
  if (isa == 2) return bsr_kernels_avx512bf16();
  if (isa == 1) return bsr_kernels_avx512();
  return bsr_kernels_avx2();
}

int64_t packed_rows(int64_t bh) {  // must match sparsevit/formats/bsr.py::packed_block_rows
  if (bh <= 8) {
    int64_t p = 1;
    while (p < bh) p *= 2;
    return p;
  }
  return (bh + 15) / 16 * 16;
}

// crow_indices: starts at 0, never decreases, ends at nnz; col_indices: in [0, nbc), strictly
// increasing within a block row.
void check_indices(const at::Tensor& col, const at::Tensor& crow, int64_t nbr, int64_t nbc) {
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cl = col.data_ptr<int32_t>();
  const int64_t nnz = col.size(0);
  TORCH_CHECK(cr[0] == 0 && cr[nbr] == nnz, "sparsevit_C::bsr_linear: crow_indices must start at 0 and end at nnz=",
              nnz, ", got ", cr[0], " ... ", cr[nbr]);
  for (int64_t r = 0; r < nbr; ++r) {
    TORCH_CHECK(cr[r] <= cr[r + 1], "sparsevit_C::bsr_linear: crow_indices decreases at block row ", r);
    for (int64_t k = cr[r]; k < cr[r + 1]; ++k) {
      TORCH_CHECK(cl[k] >= 0 && cl[k] < nbc, "sparsevit_C::bsr_linear: col_indices[", k, "] = ", cl[k],
                  " out of range [0, ", nbc, ")");
      TORCH_CHECK(k == cr[r] || cl[k] > cl[k - 1],
                  "sparsevit_C::bsr_linear: col_indices not strictly increasing in block row ", r);
    }
  }
}

// True when the row holds a NaN or an infinity (exponent bits all ones); written on the bits so the
// compiler vectorises it and -ffast-math style flags cannot fold it away.
template <typename Bits>
bool row_nonfinite(const Bits* u, int64_t n, Bits exp_mask) {
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (Bits)((u[i] & exp_mask) == exp_mask);
  return bad != 0;
}

constexpr int64_t kNonfiniteScanGrainElems = 32768;  // elements per parallel chunk of the scan below

// Dense x @ W^T is NaN at output o whenever x[t, i] is NaN/Inf and W[o, i] == 0 (0 * Inf = NaN).
// Kept blocks multiply their zeros and do that by themselves; dropped blocks are never read, so
// their output rows are marked here. A non-finite x[t, i] in a block column that some kept block
// reads makes that block row's outputs non-finite, and the kernels flag token t in p.bad_tok; so
// only block columns no kept block reads are scanned here, and only flagged tokens pay more.
void propagate_nonfinite(const at::Tensor& xc, at::Tensor& y, const BsrParams& p) {
  const bool bf16 = p.bf16 != 0;
  std::vector<char> read_col(p.nbc, 0);
  for (int32_t k = 0; k < p.crow[p.nbr]; ++k) read_col[p.col[k]] = 1;
  std::vector<std::pair<int64_t, int64_t>> unread;  // [begin, end) input columns, merged
  for (int64_t c = 0; c < p.nbc; ++c) {
    if (read_col[c]) continue;
    const int64_t lo = c * p.bw, hi = std::min<int64_t>(p.in, lo + p.bw);
    if (!unread.empty() && unread.back().second == lo) unread.back().second = hi;
    else unread.emplace_back(lo, hi);
  }
  char* bad_row = p.bad_tok;
  if (!unread.empty()) {
    const int64_t esz = xc.element_size();
    int64_t per_row = 0;  // elements scanned per token
    for (const auto& u : unread) per_row += u.second - u.first;
    // A scan of a few thousand elements (batch 1: 197 tokens x a block column or two, in a quarter
    // of the combined plan's layers) runs inline: a parallel region costs more than it saves.
    const int64_t grain = std::max<int64_t>(16, kNonfiniteScanGrainElems / std::max<int64_t>(1, per_row));
    at::parallel_for(0, p.T, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const char* row = (const char*)xc.data_ptr() + t * p.ldx * esz;
        for (size_t i = 0; i < unread.size() && !bad_row[t]; ++i) {
          const char* s = row + unread[i].first * esz;
          const int64_t n = unread[i].second - unread[i].first;
          if (bf16 ? row_nonfinite((const uint16_t*)s, n, (uint16_t)0x7f80)
                   : row_nonfinite((const uint32_t*)s, n, (uint32_t)0x7f800000u))
            bad_row[t] = 1;
        }
      }
    });
  }
  if (std::find(bad_row, bad_row + p.T, 1) == bad_row + p.T) return;
  at::Tensor xf = xc.to(at::kFloat).contiguous();
  std::vector<char> bad_col(p.nbc), kept(p.nbc);
  for (int64_t t = 0; t < p.T; ++t) {
    if (!bad_row[t]) continue;
    const float* xr = xf.data_ptr<float>() + t * p.in;
    std::fill(bad_col.begin(), bad_col.end(), 0);
    for (int64_t i = 0; i < p.in; ++i) bad_col[i / p.bw] |= !std::isfinite(xr[i]);
    for (int64_t r = 0; r < p.nbr; ++r) {
      std::fill(kept.begin(), kept.end(), 0);
      for (int32_t k = p.crow[r]; k < p.crow[r + 1]; ++k) kept[p.col[k]] = 1;
      bool dropped_bad = false;
      for (int64_t c = 0; c < p.nbc && !dropped_bad; ++c) dropped_bad = bad_col[c] && !kept[c];
      if (dropped_bad) {
        const int64_t o0 = r * p.bh, n = std::min<int64_t>(p.bh, p.out - o0);
        y.select(0, t).narrow(0, o0, n).fill_(std::numeric_limits<float>::quiet_NaN());
      }
    }
  }
}

std::string bsr_linear_isa(int64_t isa) {
  const BsrKernels* k = select_kernels(isa);
  return k ? std::string(k->name) : std::string();
}

// Every argument check, so that a bad call raises instead of reading out of bounds. The index
// checks are O(nnz + block rows): negligible next to the product, and they make a corrupt weight
// (hand-built or loaded from a file) an error instead of a crash.
void check_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& col, const at::Tensor& crow,
                const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features, int64_t bh,
                int64_t bw, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && col.device().is_cpu() && crow.device().is_cpu(),
              "sparsevit_C::bsr_linear: every tensor must be on the CPU (x is on ", x.device(), ")");
  TORCH_CHECK(x.dim() == 2, "sparsevit_C::bsr_linear: x must be 2-D [tokens, in_features], got ",
              x.sizes(), " (the Python wrapper flattens leading dims)");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat,
              "sparsevit_C::bsr_linear: supports float32 and bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "sparsevit_C::bsr_linear: weight dtype ",
              packed.scalar_type(), " != input dtype ", x.scalar_type(), "; convert one of them");
  TORCH_CHECK(x.size(1) == in_features, "sparsevit_C::bsr_linear: x has ", x.size(1),
              " features, weight expects ", in_features);
  TORCH_CHECK(out_features >= 0, "sparsevit_C::bsr_linear: out_features must be >= 0, got ", out_features);
  TORCH_CHECK(bh >= 1 && bw >= 1 && bh <= 64, "sparsevit_C::bsr_linear: bad block ", bh, "x", bw);
  TORCH_CHECK(act >= 0 && act <= 2, "sparsevit_C::bsr_linear: act must be 0, 1 or 2");
  TORCH_CHECK(col.scalar_type() == at::kInt && crow.scalar_type() == at::kInt && col.dim() == 1,
              "sparsevit_C::bsr_linear: col_indices / crow_indices must be 1-D int32");
  const int64_t nbr = (out_features + bh - 1) / bh;
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) == nbr + 1, "sparsevit_C::bsr_linear: crow_indices has ",
              crow.sizes(), " entries, expected ", nbr + 1);
  const int64_t V = bf16 ? 2 : 1, BHP = packed_rows(bh), KP = bf16 ? (bw + 1) / 2 * 2 : bw;
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == col.size(0) && packed.size(1) == KP / V &&
                  packed.size(2) == BHP && packed.size(3) == V,
              "sparsevit_C::bsr_linear: packed values have shape ", packed.sizes(), ", expected [",
              col.size(0), ", ", KP / V, ", ", BHP, ", ", V,
              "]; re-pack with BlockSparseWeight.to(dtype=...) after changing dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out_features,
                "sparsevit_C::bsr_linear: bias must be a CPU tensor [", out_features, "], got ", bias->sizes(),
                " on ", bias->device());
  }
  check_indices(col.contiguous(), crow.contiguous(), nbr, (in_features + bw - 1) / bw);
}

// Kernel A reads x in place (it stops at the row's end in a partial last block column), unless the
// row stride aliases in L1 (indexed by address bits 6..11): when more rows of a tile than L1 ways
// fall into one set (a 12 KiB stride puts all 16 rows of a 16-token tile in one set) they evict each
// other within every block. Then it reads a zero-padded copy whose stride is an odd number of lines.
bool needs_padded_copy(const BsrParams& p, int64_t esz) {
  return p.BHP >= 16 && rows_alias_in_l1(p.ldx * esz, p.TT);
}

// Fills the activation fields of `p` (x in place, a padded copy, or a packed copy for kernel B) and
// the scratch they live in.
void stage_activations(BsrParams& p, const BsrKernels* kern, const at::Tensor& xc) {
  const int64_t esz = xc.element_size();
  const bool kernel_a = p.BHP >= 16;
  const bool pad_copy = needs_padded_copy(p, esz);
  int64_t lda = xc.stride(0);
  if (pad_copy) lda = odd_line_stride(p.nbc * p.bw + 1, esz);
  const bool tail = kernel_a && !pad_copy && (p.T % p.TT) != 0;
  int64_t scratch = 0;
  if (!kernel_a) scratch = p.n_tiles * p.tile_stride;
  else if (pad_copy) scratch = p.n_tiles * p.TT * lda;
  else if (tail) scratch = p.TT * lda;
  static thread_local ThreadScratch workspace("sparsevit_C::bsr_linear");
  char* ws = (char*)workspace.get((size_t)std::max<int64_t>(scratch, 1) * esz);
  p.xp = ws;
  p.xa = pad_copy ? (const void*)ws : xc.data_ptr();
  p.lda = lda;
  p.xa_tail = tail ? (const void*)ws : nullptr;

  const char* xs = (const char*)xc.data_ptr();
  const int64_t row_bytes = p.in * esz, T = p.T, TT = p.TT, ldx = p.ldx;
  if (!kernel_a) {
    at::parallel_for(0, p.n_tiles, 1, [&](int64_t b, int64_t e) { kern->pack(&p, b, e); });
  } else if (pad_copy) {  // rows [0, n_tiles*TT) of a zero-padded copy with row stride lda
    at::parallel_for(0, p.n_tiles * TT, 64, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        char* d = ws + t * lda * esz;
        const int64_t n = t < T ? row_bytes : 0;
        if (n) std::memcpy(d, xs + t * ldx * esz, n);
        std::memset(d + n, 0, lda * esz - n);
      }
    });
  } else if (tail) {
    const int64_t t0 = (p.n_tiles - 1) * TT;
    for (int64_t t = 0; t < TT; ++t) {
      char* d = ws + t * lda * esz;
      if (t0 + t < T) std::memcpy(d, xs + (t0 + t) * ldx * esz, row_bytes);
      else std::memset(d, 0, row_bytes);
    }
  }
}

// Work split: units of (a group of block rows) x (a run of token tiles). Block rows are cut into as
// few groups as keep each group's weights within kBsrL2WeightBudget (one for sliced / pruned DeiT-S
// layers), grouped by kept blocks (plus a small per-row cost for the epilogue); token tiles into runs
// of equal length (a run's cost does not depend on where it is); more row groups only when there are
// too few runs (batch 1 on DeiT-S has only 17 token tiles: split over tiles alone, 2 threads would get
// 9 and 8). Many small units keep the last one small next to a thread's share.
// Each group is owned by one thread (group g by thread g % threads), which takes its runs first, so
// a group's weights stay in that core's L2 (handing units out from one shared counter moved a group
// between cores whenever the two threads' order drifted; in a kernel-only 2-thread harness owning
// gained 1-4% on fp32 DeiT-S shapes of two groups, nothing on one group; indicative, shared host);
// a thread whose groups are done takes runs of the others' (dynamically, from each group's atomic
// counter), so one that loses its core to another process does not hold the others up.
constexpr int64_t kUnitsPerThread = 16;     // at least, where the work allows
constexpr int64_t kMaxUnitsPerThread = 64;  // at most: each unit costs an atomic and a compute() call

std::vector<int64_t> row_groups(const BsrParams& p, int64_t n_groups) {
  const int32_t* cr = p.crow;
  auto cost = [&](int64_t r) { return (double)cr[r] + 0.25 * (double)r; };
  const double total = cost(p.nbr);
  std::vector<int64_t> rb(n_groups + 1, p.nbr);
  rb[0] = 0;
  int64_t r = 0;
  for (int64_t q = 1; q < n_groups; ++q) {
    const double target = total * (double)q / (double)n_groups;
    while (r < p.nbr && cost(r) < target) ++r;
    rb[q] = r;
  }
  return rb;
}

void run_parallel(const BsrParams& p, const BsrKernels* kern) {
  const int64_t nbr = p.nbr, n_tiles = p.n_tiles;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  if (nth == 1) {
    kern->compute(&p, 0, nbr, 0, n_tiles);
    return;
  }
  const int64_t want = kUnitsPerThread * nth;
  const int64_t weight_bytes = (int64_t)p.crow[nbr] * p.KP * p.BHP * (p.bf16 ? 2 : 4);
  const int64_t min_groups =
      std::min(nbr, std::max<int64_t>(1, (weight_bytes + kBsrL2WeightBudget - 1) / kBsrL2WeightBudget));
  const int64_t max_runs = std::min(n_tiles, std::max<int64_t>(1, kMaxUnitsPerThread * nth / min_groups));
  const int64_t run = (n_tiles + max_runs - 1) / max_runs;  // token tiles per unit
  const int64_t runs = (n_tiles + run - 1) / run;
  const int64_t P_r = std::min(nbr, std::max(min_groups, (want + runs - 1) / runs));
  const std::vector<int64_t> rb = row_groups(p, P_r);
  std::vector<std::atomic<int64_t>> next_run(P_r);  // per row group: the next run to hand out
  for (auto& n : next_run) n.store(0, std::memory_order_relaxed);
  const int64_t roles = std::min(nth, P_r * runs);
  auto drain = [&](int64_t g) {
    if (rb[g] == rb[g + 1]) return;
    for (int64_t k = next_run[g].fetch_add(1); k < runs; k = next_run[g].fetch_add(1))
      kern->compute(&p, rb[g], rb[g + 1], k * run, std::min(n_tiles, (k + 1) * run));
  };
  at::parallel_for(0, roles, 1, [&](int64_t b, int64_t e) {
    for (int64_t role = b; role < e; ++role) {
      for (int64_t g = role % P_r; g < P_r; g += roles) drain(g);  // own groups
      for (int64_t i = 1; i < P_r; ++i) drain((role + i) % P_r);   // then help with the others
    }
  });
}

at::Tensor bsr_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& col,
                      const at::Tensor& crow, const c10::optional<at::Tensor>& bias,
                      int64_t out_features, int64_t in_features, int64_t bh, int64_t bw, int64_t act,
                      int64_t isa) {
  check_args(x, packed, col, crow, bias, out_features, in_features, bh, bw, act);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const BsrKernels* kern = select_kernels(isa);
  TORCH_CHECK(kern != nullptr, "sparsevit_C::bsr_linear: this CPU lacks the requested ISA level ", isa,
              " (AVX2+FMA is the minimum); use the reference path");
  const int64_t BHP = packed_rows(bh), KP = bf16 ? (bw + 1) / 2 * 2 : bw;
  const int TT = kern->token_tile((int)BHP, bf16);
  TORCH_CHECK(TT > 0, "sparsevit_C::bsr_linear: no kernel for packed block height ", BHP);

  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor pc = packed.contiguous(), cc = col.contiguous(), rc = crow.contiguous();
  const int64_t T = xc.size(0), nbr = (out_features + bh - 1) / bh, nbc = (in_features + bw - 1) / bw;
  at::Tensor y = at::empty({T, out_features}, xc.options());
  if (T == 0 || out_features == 0) return y;

  BsrParams p;
  p.x = xc.data_ptr();
  p.ldx = xc.stride(0);
  p.y = y.data_ptr();
  p.ldy = out_features;
  p.wpack = pc.data_ptr();
  p.col = cc.data_ptr<int32_t>();
  p.crow = rc.data_ptr<int32_t>();
  p.bias_pad = nullptr;
  p.T = T;
  p.in = in_features;
  p.out = out_features;
  p.nbr = nbr;
  p.nbc = nbc;
  p.bh = (int)bh;
  p.bw = (int)bw;
  p.BHP = (int)BHP;
  p.KP = (int)KP;
  p.TT = TT;
  p.bf16 = bf16 ? 1 : 0;
  p.act = (int)act;
  p.tile_stride = nbc * KP * TT;
  p.n_tiles = (T + TT - 1) / TT;
  static thread_local ThreadScratch bias_scratch("sparsevit_C::bsr_linear");
  if (bias.has_value()) p.bias_pad = kernel_bias(*bias, p, bias_scratch);
  std::vector<char> bad_tok(T, 0);
  p.bad_tok = bad_tok.data();
  stage_activations(p, kern, xc);
  run_parallel(p, kern);
  propagate_nonfinite(xc, y, p);
  return y;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def(
      "bsr_linear(Tensor x, Tensor packed, Tensor col_indices, Tensor crow_indices, Tensor? bias, "
      "int out_features, int in_features, int bh, int bw, int act, int isa=-1) -> Tensor");
  m.def("bsr_linear_isa(int isa=-1) -> str", &sparsevit_cpu::bsr_linear_isa);
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) { m.impl("bsr_linear", &sparsevit_cpu::bsr_linear); }
