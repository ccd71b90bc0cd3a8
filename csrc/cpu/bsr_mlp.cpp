// sparsevit_C::bsr_mlp -- y = fc2(act(fc1(x))) with both weights block-sparse (BSR), on CPU, in one call.
//
// Two bsr_linear calls write fc1's [T, hidden] output (4x the block width in a ViT: 9.7 MB fp32 for
// DeiT-S at batch 8, far above L2) and read it back in fc2, so both layers' activations go through
// L3/DRAM. Here each thread takes a group of token tiles at a time, runs fc1 over it (bias and
// activation in the epilogue) into a hidden tile of its own, row-major, which is the layout fc2's
// kernel A reads in place, then fc2 over the same tiles: the hidden tile stays in the thread's L2.
//
// Same micro-kernels (bsr_kernel_impl.h, through the BsrKernels table) on the same per-element
// summation order, and (bf16) the hidden tile rounded to bf16 by the same epilogue: the result is
// bit for bit what two bsr_linear calls return. Only kernel A (packed block height >= 16) reads
// row-major activations, so both layers need blocks at least 9 rows high (the Python side checks
// this first and reports it). A NaN/Inf in x, a non-finite hidden value or an overflow reruns the
// call as two bsr_linear calls, whose fix-up gives the dense semantics; so does an x whose row stride
// would alias in L1 (bsr_linear copies it; rare: in_features * element size a multiple of 4 KiB).
//
// Ops registered here:
//   bsr_mlp(x[T,in], packed1, col1, crow1, bias1?, hidden, bh1, bw1, act1,
//           packed2, col2, crow2, bias2?, out_features, in_features, bh2, bw2, isa, group_tiles) -> y[T,out]
//   group_tiles: token tiles per work item (0: sized so the hidden tile fits kBsrMlpHiddenBudget)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bsr_host.h"

namespace sparsevit_cpu {
namespace {

// Hidden-tile bytes per thread work item (3 token tiles of DeiT-S's fp32 hidden, 6 in bf16), next to
// the L2-sized weight chunk compute() reuses across the group's tiles. The group size barely matters
// beyond 2 tiles: 2 to 32 tiles (1 thread, 1576 tokens, thread CPU time) were within 1% of each other;
// 1 tile lost 1-2% (bench/bsr_mlp.py --group-tiles; indicative, shared host).
constexpr int64_t kBsrMlpHiddenBudget = 256 * 1024;
constexpr const char* kOp = "sparsevit_C::bsr_mlp: ";

at::Tensor call_bsr_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& col,
                           const at::Tensor& crow, const c10::optional<at::Tensor>& bias, int64_t out_features,
                           int64_t in_features, int64_t bh, int64_t bw, int64_t act, int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsevit_C::bsr_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t)>();
  return op.call(x, packed, col, crow, bias, out_features, in_features, bh, bw, act, isa);
}

// The micro-kernels `isa` resolves to, by the name bsr_linear_isa gives (one place decides the ISA);
// looked up once per level.
const BsrKernels* kernels_for(int64_t isa) {
  static std::atomic<const BsrKernels*> cache[4] = {};
  const int64_t slot = std::min<int64_t>(std::max<int64_t>(isa, -1), 2) + 1;
  if (const BsrKernels* k = cache[slot].load(std::memory_order_relaxed)) return k;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sparsevit_C::bsr_linear_isa", "")
                       .typed<std::string(int64_t)>();
  const std::string name = op.call(isa);
  for (const BsrKernels* k : {bsr_kernels_avx512bf16(), bsr_kernels_avx512(), bsr_kernels_avx2()})
    if (name == k->name) {
      if (isa >= -1 && isa <= 2) cache[slot].store(k, std::memory_order_relaxed);
      return k;
    }
  return nullptr;
}

// One layer's fields of BsrParams that do not depend on the token group; the bias as the kernels read
// it, in `bias_scratch` when it needs a padded copy.
BsrParams layer_params(const at::Tensor& packed, const at::Tensor& col, const at::Tensor& crow,
                       const c10::optional<at::Tensor>& bias, ThreadScratch& bias_scratch, int64_t in, int64_t out,
                       int64_t bh, int64_t bw, int64_t act, bool bf16, int TT) {
  BsrParams p;
  std::memset(&p, 0, sizeof(p));
  p.wpack = packed.data_ptr();
  p.col = col.data_ptr<int32_t>();
  p.crow = crow.data_ptr<int32_t>();
  p.in = in;
  p.out = out;
  p.bh = (int)bh;
  p.bw = (int)bw;
  p.nbr = (out + bh - 1) / bh;
  p.nbc = (in + bw - 1) / bw;
  p.BHP = (int)packed.size(2);
  p.KP = (int)(packed.size(1) * packed.size(3));
  p.TT = TT;
  p.bf16 = bf16 ? 1 : 0;
  p.act = (int)act;
  p.bias_pad = bias.has_value() ? kernel_bias(*bias, p, bias_scratch) : nullptr;
  return p;
}

// True when some x[t, i] in an input column no kept fc1 block reads is NaN/Inf (kernels flag the rest).
bool unread_columns_nonfinite(const at::Tensor& xc, const BsrParams& p) {
  std::vector<char> read(p.nbc, 0);
  for (int32_t k = 0; k < p.crow[p.nbr]; ++k) read[p.col[k]] = 1;
  if (std::find(read.begin(), read.end(), 0) == read.end()) return false;
  const at::Tensor xf = xc.to(at::kFloat);
  const float* xs = xf.data_ptr<float>();
  const int64_t ld = xf.stride(0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, p.T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e && !bad.load(std::memory_order_relaxed); ++t)
      for (int64_t i = 0; i < p.in; ++i)
        if (!read[i / p.bw] && !std::isfinite(xs[t * ld + i])) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

struct Mlp {
  const BsrKernels* kern;
  BsrParams p1, p2;        // whole-call views: T, n_tiles, x / y / bad_tok of the full call
  char* hidden;            // per worker: group_tiles * TT rows of ldh elements
  int64_t ldh, group_tiles, esz;
  char* bad1;              // [T] fc1 flags (pre-activation non-finite)
};

// fc1 over token tiles [t0, t1), into hidden tile h (row 0 = token t0 * TT).
void group_fc1(const Mlp& m, int64_t t0, int64_t t1, char* h) {
  const int TT = m.p1.TT;
  const int64_t tok0 = t0 * TT, T = std::min(m.p1.T, t1 * TT) - tok0, nt = t1 - t0;
  BsrParams p1 = m.p1;  // the group as a call of its own: tile indices start at 0
  p1.x = (const char*)m.p1.x + tok0 * m.p1.ldx * m.esz;
  p1.xa = (const char*)m.p1.xa + tok0 * m.p1.lda * m.esz;
  p1.xa_tail = t1 == m.p1.n_tiles ? m.p1.xa_tail : nullptr;
  p1.y = h;
  p1.ldy = m.ldh;
  p1.T = T;
  p1.n_tiles = nt;
  p1.bad_tok = m.bad1 + tok0;
  m.kern->compute(&p1, 0, p1.nbr, 0, nt);
}

// fc2 over token tiles [t0, t1), from hidden tile h.
void group_fc2(const Mlp& m, int64_t t0, int64_t t1, const char* h) {
  const int TT = m.p2.TT;
  const int64_t tok0 = t0 * TT;
  BsrParams p2 = m.p2;
  p2.x = p2.xa = h;  // read only
  p2.ldx = p2.lda = m.ldh;
  p2.xa_tail = nullptr;
  p2.y = (char*)m.p2.y + tok0 * m.p2.ldy * m.esz;
  p2.T = std::min(m.p2.T, t1 * TT) - tok0;
  p2.n_tiles = t1 - t0;
  p2.bad_tok = m.p2.bad_tok + tok0;
  m.kern->compute(&p2, 0, p2.nbr, 0, t1 - t0);
}

// fc2 reads whole tiles: rows of the last tile past the last token are zero (fc1 never writes them;
// stale values there could be NaN and cost the slow path).
void zero_pad_rows(const Mlp& m, int64_t t0, int64_t t1, char* h) {
  const int TT = m.p1.TT;
  const int64_t T = std::min(m.p1.T, t1 * TT) - t0 * TT, rows = (t1 - t0) * TT;
  if (T < rows) std::memset(h + T * m.ldh * m.esz, 0, (rows - T) * m.ldh * m.esz);
}

// Threads split the tokens: groups are handed out one at a time from a shared counter (a thread that
// loses its core to another process does not hold the other up); each worker runs fc1 and fc2 on its
// own hidden tile and streams both weights once per group. Splitting block rows instead (both
// threads on every group, each keeping its half of both weights in its L2, one barrier per group)
// was measured and never faster: at 2 threads, DeiT-S 384->1536->384 at 70% 32x32, best of 60-300
// wall-clock rounds on a shared host, it matched two bsr_linear calls at 197 tokens (this split
// loses 5-7% there) and lost 1-13% to this split at 394 and 1576 tokens (bench/bsr_mlp.py numbers).
void run_owned_groups(const Mlp& m, int64_t n_groups, int64_t workers) {
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t me) {
    for (int64_t g = next.fetch_add(1); g < n_groups; g = next.fetch_add(1)) {
      const int64_t t0 = g * m.group_tiles, t1 = std::min(m.p1.n_tiles, t0 + m.group_tiles);
      char* h = m.hidden + me * m.group_tiles * m.p1.TT * m.ldh * m.esz;
      group_fc1(m, t0, t1, h);
      zero_pad_rows(m, t0, t1, h);
      group_fc2(m, t0, t1, h);
    }
  };
  if (workers == 1) return work(0);
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t me = b; me < e; ++me) work(me);
  });
}

// Token tiles per work item: as many as the hidden budget holds; split by tokens, also at least ~4
// items per thread when the call is small (batch 1 on DeiT-S has 17 tiles).
int64_t pick_group_tiles(int64_t requested, int64_t n_tiles, int64_t owners, int TT, int64_t ldh, int64_t esz) {
  if (requested > 0) return std::min(requested, n_tiles);
  const int64_t by_budget = std::max<int64_t>(1, kBsrMlpHiddenBudget / (TT * ldh * esz));
  const int64_t by_balance = std::max<int64_t>(1, (n_tiles + 4 * owners - 1) / (4 * owners));
  return std::min({by_budget, by_balance, n_tiles});
}

// fc1 reads x in place; kernel A reads whole tiles, so the last, partial one from a zero-padded copy
// in `tail` (same row stride).
void stage_x(BsrParams& p1, const at::Tensor& xc, char* tail, int64_t esz) {
  p1.x = p1.xa = xc.data_ptr();
  p1.ldx = p1.lda = xc.stride(0);
  if (p1.T % p1.TT == 0) return;
  const int64_t t0 = (p1.n_tiles - 1) * p1.TT, ld = xc.stride(0) * esz, row = p1.in * esz;
  for (int64_t t = 0; t < p1.TT; ++t) {
    char* d = tail + t * ld;
    if (t0 + t < p1.T) std::memcpy(d, (const char*)xc.data_ptr() + (t0 + t) * ld, row);
    else std::memset(d, 0, row);
  }
  p1.xa_tail = tail;
}

at::Tensor bsr_mlp(const at::Tensor& x, const at::Tensor& packed1, const at::Tensor& col1, const at::Tensor& crow1,
                   const c10::optional<at::Tensor>& bias1, int64_t hidden, int64_t bh1, int64_t bw1, int64_t act1,
                   const at::Tensor& packed2, const at::Tensor& col2, const at::Tensor& crow2,
                   const c10::optional<at::Tensor>& bias2, int64_t out_features, int64_t in_features, int64_t bh2,
                   int64_t bw2, int64_t isa, int64_t group_tiles) {
  TORCH_CHECK(x.dim() == 2, kOp, "x must be 2-D [tokens, in_features], got ", x.sizes());
  auto unfused = [&] {
    at::Tensor h = call_bsr_linear(x, packed1, col1, crow1, bias1, hidden, in_features, bh1, bw1, act1, isa);
    return call_bsr_linear(h, packed2, col2, crow2, bias2, out_features, hidden, bh2, bw2, 0, isa);
  };
  // bsr_linear checks every argument (indices included) before it looks at the tokens: zero tokens
  // run the checks alone, so a bad weight fails here exactly as it would there.
  call_bsr_linear(x.narrow(0, 0, 0), packed1, col1, crow1, bias1, hidden, in_features, bh1, bw1, act1, isa);
  call_bsr_linear(x.new_empty({0, hidden}), packed2, col2, crow2, bias2, out_features, hidden, bh2, bw2, 0, isa);
  const BsrKernels* kern = kernels_for(isa);
  TORCH_CHECK(kern != nullptr, kOp, "no kernel for ISA level ", isa);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t esz = bf16 ? 2 : 4;
  const int TT = kern->token_tile((int)packed1.size(2), bf16);
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t T = xc.size(0);
  // Both layers on kernel A with the same token tile; x not aliasing in L1 (else: what bsr_linear does).
  if (T == 0 || hidden == 0 || out_features == 0 || packed1.size(2) < 16 || packed2.size(2) < 16 ||
      kern->token_tile((int)packed2.size(2), bf16) != TT || rows_alias_in_l1(xc.stride(0) * esz, TT))
    return unfused();

  at::Tensor pc1 = packed1.contiguous(), cc1 = col1.contiguous(), rc1 = crow1.contiguous();
  at::Tensor pc2 = packed2.contiguous(), cc2 = col2.contiguous(), rc2 = crow2.contiguous();
  at::Tensor y = at::empty({T, out_features}, xc.options());
  Mlp m;
  m.kern = kern;
  m.esz = esz;
  static thread_local ThreadScratch bias1_scratch("sparsevit_C::bsr_mlp"), bias2_scratch("sparsevit_C::bsr_mlp");
  m.p1 = layer_params(pc1, cc1, rc1, bias1, bias1_scratch, in_features, hidden, bh1, bw1, act1, bf16, TT);
  m.p2 = layer_params(pc2, cc2, rc2, bias2, bias2_scratch, hidden, out_features, bh2, bw2, 0, bf16, TT);
  const int64_t n_tiles = (T + TT - 1) / TT, nth = std::max<int64_t>(1, at::get_num_threads());
  m.ldh = odd_line_stride(hidden, esz);  // the hidden tile's rows never alias in L1
  m.group_tiles = pick_group_tiles(group_tiles, n_tiles, nth, TT, m.ldh, esz);
  const int64_t n_groups = (n_tiles + m.group_tiles - 1) / m.group_tiles;
  const int64_t workers = std::min(nth, n_groups);
  const size_t h_bytes = (size_t)(workers * m.group_tiles * TT * m.ldh * esz);
  const size_t tail_bytes = T % TT ? (size_t)(TT * xc.stride(0) * esz) : 0;
  static thread_local ThreadScratch scratch("sparsevit_C::bsr_mlp");
  char* ws = scratch.get(h_bytes + tail_bytes + 2 * (size_t)T + 64);
  m.hidden = ws;
  m.bad1 = ws + h_bytes + tail_bytes;
  std::memset(m.bad1, 0, 2 * (size_t)T);
  for (BsrParams* p : {&m.p1, &m.p2}) {
    p->T = T;
    p->n_tiles = n_tiles;
  }
  stage_x(m.p1, xc, ws + h_bytes, esz);
  m.p2.y = y.data_ptr();
  m.p2.ldy = out_features;
  m.p2.bad_tok = m.bad1 + T;
  run_owned_groups(m, n_groups, workers);
  const bool bad = std::find(m.bad1, m.bad1 + 2 * T, 1) != m.bad1 + 2 * T;
  return bad || unread_columns_nonfinite(xc, m.p1) ? unfused() : y;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def(
      "bsr_mlp(Tensor x, Tensor packed1, Tensor col_indices1, Tensor crow_indices1, Tensor? bias1, int hidden, "
      "int bh1, int bw1, int act1, Tensor packed2, Tensor col_indices2, Tensor crow_indices2, Tensor? bias2, "
      "int out_features, int in_features, int bh2, int bw2, int isa=-1, int group_tiles=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) { m.impl("bsr_mlp", &sparsevit_cpu::bsr_mlp); }
