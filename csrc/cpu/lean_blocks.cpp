// The lean block path's loop (sparsevit/runtime/modules.py, _lean_forward) as one call, for block
// sequences whose every step is one of sparsevit's compiled CPU ops: qkv and proj on the BSR kernel,
// the MLP as one fused bsr_mlp call or two BSR calls, the fused attention, and the residual
// write-backs with the next norm (residual_add_layernorm). The same ops run on the same arguments in
// the same order as the Python loop, through the dispatcher, so the result is bit-identical; what
// goes away is the Python between them (~13 op calls and views a block; DeiT-S batch 1 on 2 cores:
// 7.02 -> 6.74 ms a forward). sparsevit/runtime/block_program.py decides when it applies and packs
// the arguments; every op still checks its own.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace sparsevit_cpu {
namespace {

using OptT = c10::optional<at::Tensor>;

// Per block: tensors, ints and floats (the layout block_program.py writes).
constexpr int64_t kTensors = 24;  // qkv, proj, fc1, fc2: (packed, col, crow, bias); 2 x (write, weight, bias, read)
constexpr int64_t kInts = 27;     // heads, head dim, MLP kind (0 fused pair, 1 two calls); 4 x bsr direct args (6)
constexpr int64_t kFloats = 3;    // attention scale, eps of the attention write-back's norm, of the MLP's

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
using MlpFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                         int64_t, int64_t, int64_t, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptT&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, double, int64_t);
using AddNormFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                                     const OptT&, const OptT&, double);
using AddNormInplaceFn = at::Tensor(at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
                                    const OptT&, double);

// The ops' handles, found once; a call through one is a dispatch from C++ (no Python).
struct Ops {
  c10::TypedOperatorHandle<LinearFn> linear;
  c10::TypedOperatorHandle<MlpFn> mlp;
  c10::TypedOperatorHandle<AttentionFn> attention;
  c10::TypedOperatorHandle<AddNormFn> add_norm;
  c10::TypedOperatorHandle<AddNormInplaceFn> add_norm_;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      return Ops{d.findSchemaOrThrow("sparsevit_C::bsr_linear", "").typed<LinearFn>(),
                 d.findSchemaOrThrow("sparsevit_C::bsr_mlp", "").typed<MlpFn>(),
                 d.findSchemaOrThrow("sparsevit_C::attention_cpu", "").typed<AttentionFn>(),
                 d.findSchemaOrThrow("sparsevit_C::residual_add_layernorm", "").typed<AddNormFn>(),
                 d.findSchemaOrThrow("sparsevit_C::residual_add_layernorm_", "").typed<AddNormInplaceFn>()};
    }();
    return ops;
  }
};

const at::Tensor& need(const OptT& t, const char* what) {
  TORCH_CHECK(t.has_value(), "lean_vit_blocks: ", what, " is missing");
  return *t;
}

// bsr_linear of x with the layer at t[0..3] and its direct args d[0..5] (out, in, bh, bw, act, isa).
at::Tensor bsr(const Ops& ops, const at::Tensor& x, const OptT* t, const int64_t* d) {
  return ops.linear.call(x, need(t[0], "packed"), need(t[1], "col"), need(t[2], "crow"), t[3], d[0], d[1], d[2],
                         d[3], d[4], d[5]);
}

// Returns (x, y): x after every block but the last one's MLP write-back, y that MLP's output
// ([B, N, out]); the caller adds it (its write may be a channel subset). `normed` is the first
// block's normed input. x is not modified: the first write-back makes a new tensor.
std::tuple<at::Tensor, at::Tensor> lean_vit_blocks(const at::Tensor& x_in, const at::Tensor& normed_in,
                                                   const std::vector<OptT>& t_all, std::vector<int64_t> i_all,
                                                   std::vector<double> f_all) {
  const int64_t n = (int64_t)t_all.size() / kTensors;
  TORCH_CHECK(n > 0 && (int64_t)t_all.size() == n * kTensors && (int64_t)i_all.size() == n * kInts &&
                  (int64_t)f_all.size() == n * kFloats,
              "lean_vit_blocks: ", t_all.size(), " tensors, ", i_all.size(), " ints and ", f_all.size(),
              " floats do not describe whole blocks (", kTensors, ", ", kInts, ", ", kFloats, " each)");
  TORCH_CHECK(x_in.dim() == 3, "lean_vit_blocks: x must be [B, N, C], got ", x_in.sizes());
  const Ops& ops = Ops::get();
  const int64_t B = x_in.size(0), N = x_in.size(1), T = B * N;
  at::Tensor x = x_in, normed = normed_in, y;
  for (int64_t i = 0; i < n; ++i) {
    const OptT* t = t_all.data() + i * kTensors;
    const int64_t* k = i_all.data() + i * kInts;
    const double* f = f_all.data() + i * kFloats;
    const int64_t H = k[0], d = k[1], mlp_kind = k[2];
    TORCH_CHECK(mlp_kind == 0 || mlp_kind == 1, "lean_vit_blocks: unknown MLP kind ", mlp_kind);
    const at::Tensor qkv = bsr(ops, normed.reshape({T, -1}), t, k + 3).view({B, N, 3, H, d}).permute({2, 0, 3, 1, 4});
    const at::Tensor out = ops.attention.call(qkv.select(0, 0), qkv.select(0, 1), qkv.select(0, 2), c10::nullopt, f[0], -1);
    y = bsr(ops, out.transpose(1, 2).reshape({T, H * d}), t + 4, k + 9).view({B, N, -1});
    at::Tensor h;
    if (i == 0) {  // x is the caller's: a new residual stream
      std::tie(x, h) = ops.add_norm.call(x.contiguous(), y.contiguous(), t[16], t[17], t[18], t[19], f[1]);
    } else {
      h = ops.add_norm_.call(x, y.contiguous(), t[16], t[17], t[18], t[19], f[1]);
    }
    const at::Tensor h2 = h.reshape({T, -1});
    const at::Tensor m = mlp_kind == 0
        ? ops.mlp.call(h2, need(t[8], "packed"), need(t[9], "col"), need(t[10], "crow"), t[11], k[15], k[17], k[18],
                       k[19], need(t[12], "packed"), need(t[13], "col"), need(t[14], "crow"), t[15], k[21], k[16],
                       k[23], k[24], k[20], 0)
        : bsr(ops, bsr(ops, h2, t + 8, k + 15), t + 12, k + 21);
    y = m.view({B, N, -1});
    if (i + 1 < n) normed = ops.add_norm_.call(x, y.contiguous(), t[20], t[21], t[22], t[23], f[2]);
  }
  return {x, y};
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("lean_vit_blocks(Tensor x, Tensor normed, Tensor?[] tensors, int[] ints, float[] floats) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) { m.impl("lean_vit_blocks", &sparsevit_cpu::lean_vit_blocks); }
