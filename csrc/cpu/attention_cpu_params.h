// Plain-data interface between the torch-facing op (attention_cpu.cpp) and the ISA-specific kernels
// (attention_cpu_avx512.cpp, attention_cpu_avx2.cpp). Free of torch / STL includes and of inline
// functions, like bsr_params.h (the ISA files include it under `#pragma GCC target(...)`).
#pragma once
#include <stdint.h>

namespace sparsevit_cpu {

// out[b,h,i,:] = softmax_j(scale * q[b,h,i,:] . k[b,h,j,:] + bias[b,h,i,j]) @ v[b,h,:,:], fp32 softmax.
// One work item is (b, h, query rows [i0, i1)): K^T, V and the queries of its blocks packed (fp32, or
// bf16 pairs for vdpbf16ps), then per query_block queries the keys are walked in blocks of key_block:
// scores with keys in the vector lanes, an online softmax (running max and sum per query), and P @ V
// with head channels in the lanes into an fp32 accumulator rescaled as the max grows. A thread's
// scratch holds two packed heads: while one runs, the head it will likely take next is packed.
struct AttnParams {
  const void* q;            // [B, H, N, Dqk], last dim contiguous, strides below in elements
  const void* k;            // [B, H, N, Dqk]
  const void* v;            // [B, H, N, Dv]
  int64_t sq[3], sk[3], sv[3];  // strides of dims b, h, n
  const void* bias;         // broadcast view of [B, H, N, N] with unit stride along j, or nullptr
  int64_t sb[3];            // strides of dims b, h, i (0 where broadcast)
  int bias_bf16;            // bias dtype: 0 fp32, 1 bf16
  void* out;                // [B, H, N, Dv], dtype of q, unit stride along Dv
  int64_t so[3];            // its strides of dims b, h, n (memory order [B, N, H, Dv]: see attention_cpu.cpp)
  int64_t B, H, N, Dqk, Dv;
  int64_t Np, Dvp;          // N and Dv rounded up to the vector width
  float scale;
  int bf16;                 // q/k/v/out dtype: 0 fp32, 1 bf16
  int64_t next_head_stride;  // > 0: a whole-head work item of head (b, h) packs head b*H + h + this
                             // (the head its thread most likely takes next) as it runs; 0: no guess
};

struct AttnKernels {
  const char* name;
  int width;      // fp32 lanes per vector (scratch rounding)
  int key_block;    // keys per online-softmax block (a multiple of width)
  int query_block;  // queries per register block: work items should start at multiples of it
  int64_t (*scratch_floats)(const AttnParams* p);  // scratch one work item needs, in floats
  // Rows [i0, i1) of head (b, h); scratch: scratch_floats(p) floats, 64-byte aligned, the same for
  // every item one thread runs in one call, its first 64 bytes zeroed before the thread's first item
  // (they say which head the previous item packed ahead).
  void (*run)(const AttnParams* p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch);
};

const AttnKernels* attn_kernels_avx512bf16();
const AttnKernels* attn_kernels_avx512();
const AttnKernels* attn_kernels_avx2();

}  // namespace sparsevit_cpu
