// Host-side helpers shared by the BSR ops (bsr_linear.cpp, bsr_mlp.cpp): how the kernels want the
// bias and the activations laid out. The micro-kernels themselves are in bsr_kernel_impl.h.
#pragma once

#include <ATen/ATen.h>

#include <cstring>

#include "bsr_params.h"
#include "thread_scratch.h"

namespace sparsevit_cpu {

// The bias as the kernels read it: fp32, laid out per packed block row of `p` (nbr, bh, BHP, out),
// zero in the padded rows. When every block row is full and unpadded (bh is a packed height dividing
// out) and the bias is contiguous fp32, that is the bias itself: no copy. Otherwise a copy in
// `scratch` (an at::zeros per call was 48 allocations and fills in a batch-1 DeiT-S forward), valid
// until its next use.
inline const float* kernel_bias(const at::Tensor& bias, const BsrParams& p, ThreadScratch& scratch) {
  const int64_t nbr = p.nbr, bh = p.bh, BHP = p.BHP, out = p.out;
  if (bias.scalar_type() == at::kFloat && bias.is_contiguous() && BHP == bh && out == nbr * bh)
    return bias.data_ptr<float>();
  float* bp = (float*)scratch.get((size_t)nbr * BHP * sizeof(float));
  std::memset(bp, 0, (size_t)nbr * BHP * sizeof(float));
  at::Tensor owned;  // a float copy only for dtypes other than fp32 / bf16
  const at::Tensor& b = bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kBFloat16
                            ? bias : (owned = bias.to(at::kFloat));
  const int64_t stride = b.stride(0);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t i = 0; i < bh && r * bh + i < out; ++i) {
      const int64_t o = (r * bh + i) * stride;
      bp[r * BHP + i] = b.scalar_type() == at::kFloat ? b.data_ptr<float>()[o]
                                                      : (float)b.data_ptr<at::BFloat16>()[o];
    }
  return bp;
}

// Whether kernel A's rows of a TT-token tile, `ld_bytes` apart, alias in L1 (indexed by address bits
// 6..11): when more rows of a tile than L1 ways fall into one set (a 12 KiB stride puts all 16 rows of
// a 16-token tile in one set) they evict each other within every block.
inline bool rows_alias_in_l1(int64_t ld_bytes, int64_t TT) {
  if (ld_bytes % 64 != 0) return false;
  int64_t g = 64, a = (ld_bytes / 64) % 64;
  while (a) { const int64_t t = g % a; g = a; a = t; }  // gcd(lines mod 64, 64)
  return (TT + 64 / g - 1) / (64 / g) > 12;  // more rows per set than L1 ways (12 on Zen 4/5)
}

// A row stride of at least `elems` elements that never aliases: whole cache lines, an odd number of them.
inline int64_t odd_line_stride(int64_t elems, int64_t esz) {
  const int64_t line = 64 / esz;
  int64_t ld = (elems + line - 1) / line * line;
  if ((ld / line) % 2 == 0) ld += line;
  return ld;
}

}  // namespace sparsevit_cpu
