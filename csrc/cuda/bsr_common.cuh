// Small device helpers shared by sparsevit's CUDA kernels: dtype conversions and GELU epilogues.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparsevit {

enum Activation : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The two GELU forms of nn.GELU (approximate="none" / "tanh"), evaluated in fp32.
__device__ __forceinline__ float apply_activation(float v, int act) {
  if (act == kActGelu) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  if (act == kActGeluTanh) return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  return v;
}

}  // namespace sparsevit
