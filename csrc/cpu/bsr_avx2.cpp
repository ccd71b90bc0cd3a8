// AVX2 + FMA build of the block-sparse kernels (Haswell and later, Zen 1-3), bf16 widened to fp32.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SPV_NS avx2
#define SPV_ENTRY bsr_kernels_avx2
#define SPV_NAME "cpp_bsr_avx2"
#define SPV_AVX512 0
#define SPV_NATIVE_BF16 0
#include "bsr_kernel_impl.h"
#pragma GCC pop_options
