// sparsevit_C::attention_cpu -- softmax(q k^T * scale + bias) v for pruned heads, on CPU.
//
// q/k [B, H, N, Dqk], v [B, H, N, Dv] (Dqk != Dv allowed, any head count and head dims), optional
// additive bias broadcastable to [B, H, N, N] (rel-pos bias, Swin masks), fp32 or bf16 in, same dtype
// out, fp32 math. This file checks arguments, allocates per-thread scratch before the parallel
// region and splits work over (b, h, query chunks); the micro-kernels are in attention_cpu_impl.h.
//
// Ops registered here:
//   attention_cpu(q, k, v, bias?, scale, isa=-1) -> out [B, H, N, Dv] (a view of [B, N, H, Dv] memory)
//       isa: -1 auto, 0 avx2, 1 avx512 (bf16 widened to fp32), 2 avx512 + AVX512_BF16 (vdpbf16ps for bf16)
//   attention_cpu_isa(isa=-1) -> str     kernel name that `isa` resolves to ("" = none)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "attention_cpu_params.h"

namespace sparsevit_cpu {
namespace {

const AttnKernels* select_attn_kernels(int64_t isa) {
  static const int best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
    return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 0 : -2;
  }();
  if (isa < 0) isa = best;
  if (isa > best || isa < 0) return nullptr;
  if (isa == 2) return attn_kernels_avx512bf16();
  return isa == 1 ? attn_kernels_avx512() : attn_kernels_avx2();
}

std::string attention_cpu_isa(int64_t isa) {
  const AttnKernels* k = select_attn_kernels(isa);
  return k ? std::string(k->name) : std::string();
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const c10::optional<at::Tensor>& bias_in, double scale, int64_t isa) {
  const char* op = "sparsevit_C::attention_cpu: ";
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(), op,
              "q, k, v must be on CPU");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, op, "q, k, v must be 4-D [B, H, N, D], got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  const bool bf16 = q_in.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q_in.scalar_type() == at::kFloat, op, "supports float32 and bfloat16, got ", q_in.scalar_type());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), op,
              "q, k, v must share one dtype");
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(2) == N && k_in.size(3) == D, op,
              "k must be ", q_in.sizes(), " (self-attention), got ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == B && v_in.size(1) == H && v_in.size(2) == N, op, "v must be [", B, ", ", H, ", ",
              N, ", Dv], got ", v_in.sizes());
  const AttnKernels* kern = select_attn_kernels(isa);
  TORCH_CHECK(kern != nullptr, op, "this CPU lacks ISA level ", isa, " (AVX2+FMA is the minimum)");
  at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  // Stored [B, N, H, Dv] and returned as its [B, H, N, Dv] view: the caller's next step,
  // out.transpose(1, 2).reshape(B, N, H * Dv), is then a view instead of a copy of the output.
  at::Tensor out = at::empty({B, N, H, Dv}, q.options()).permute({0, 2, 1, 3});
  if (out.numel() == 0) return out;

  AttnParams p;
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat || bias_in->scalar_type() == at::kBFloat16, op,
                "bias must be float32 or bfloat16, got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() <= 4, op, "bias must broadcast to [B, H, N, N], got ", bias_in->sizes());
    bias = bias_in->expand({B, H, N, N});  // raises if not broadcastable
    if (N > 1 && bias.stride(3) != 1) bias = bias.contiguous();
    p.bias = bias.data_ptr();
    for (int d = 0; d < 3; ++d) p.sb[d] = bias.stride(d);
    p.bias_bf16 = bias.scalar_type() == at::kBFloat16 ? 1 : 0;
  } else {
    p.bias = nullptr;
    p.sb[0] = p.sb[1] = p.sb[2] = 0;
    p.bias_bf16 = 0;
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.sq[d] = q.stride(d);
    p.sk[d] = k.stride(d);
    p.sv[d] = v.stride(d);
  }
  p.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) p.so[d] = out.stride(d);
  p.B = B; p.H = H; p.N = N; p.Dqk = D; p.Dv = Dv;
  const int64_t Wd = kern->width;
  p.Np = (N + Wd - 1) / Wd * Wd;
  p.Dvp = (Dv + Wd - 1) / Wd * Wd;
  p.scale = (float)scale;
  p.bf16 = bf16 ? 1 : 0;

  // Work items: (b, h, query chunk of whole query blocks). Heads are split only as far as it takes
  // to give every thread the same number of items (batch 1, 3 heads, 2 threads: 2 chunks per head);
  // each chunk re-packs its head's K and V, O(N*D) next to O(N*N*D).
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t heads = B * H, qb = kern->query_block, n_qblocks = (N + qb - 1) / qb;
  int64_t chunks = 1;
  while ((heads * chunks) % nth != 0 && chunks < n_qblocks) ++chunks;
  const int64_t n_items = heads * chunks;
  // Items are taken in order from a shared counter, so a thread's next head is about nth heads on
  // (exactly so at one thread), and a thread packs that head while it runs this one (a wrong guess
  // costs that packing, never a wrong result); with split heads the next item is often the same
  // head: no guess.
  p.next_head_stride = chunks == 1 ? nth : 0;
  const int64_t per_thread = (kern->scratch_floats(&p) + 15) / 16 * 16;
  // Kept per calling thread and grown on demand: a fresh tensor per call was one allocation per
  // block in a batch-1 forward.
  static thread_local std::vector<float> scratch;
  const size_t need = (size_t)(nth * per_thread + 16);
  if (scratch.size() < need) scratch.resize(need);
  float* base = scratch.data();
  base += (16 - ((uintptr_t)base / 4) % 16) % 16;  // 64-byte align
  for (int64_t t = 0; t < nth; ++t) memset(base + t * per_thread, 0, 64);  // no head packed yet (AttnKernels::run)
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nth, n_items), 1, [&](int64_t b0, int64_t e0) {
    float* mine = base + (int64_t)at::get_thread_num() * per_thread;
    for (int64_t t = b0; t < e0; ++t) {
      for (int64_t it = next.fetch_add(1); it < n_items; it = next.fetch_add(1)) {
        const int64_t head = it / chunks, c = it % chunks;
        const int64_t i0 = std::min(N, n_qblocks * c / chunks * qb), i1 = std::min(N, n_qblocks * (c + 1) / chunks * qb);
        if (i0 < i1) kern->run(&p, head / H, head % H, i0, i1, mine);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, int isa=-1) -> Tensor");
  m.def("attention_cpu_isa(int isa=-1) -> str", &sparsevit_cpu::attention_cpu_isa);
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) { m.impl("attention_cpu", &sparsevit_cpu::attention_cpu); }
