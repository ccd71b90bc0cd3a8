// AVX-512 build of the CPU attention kernels (fp32 math; bf16 inputs widened while packing).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define ATTN_NS avx512
#define ATTN_ENTRY attn_kernels_avx512
#define ATTN_NAME "cpp_attention_avx512"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 0
#include "attention_cpu_impl.h"
#pragma GCC pop_options
