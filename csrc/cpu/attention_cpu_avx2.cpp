// AVX2 + FMA build of the CPU attention kernels (fp32 math; bf16 inputs widened while packing).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ATTN_NS avx2
#define ATTN_ENTRY attn_kernels_avx2
#define ATTN_NAME "cpp_attention_avx2"
#define SPV_AVX512 0
#define SPV_NATIVE_BF16 0
#include "attention_cpu_impl.h"
#pragma GCC pop_options
