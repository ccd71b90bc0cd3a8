// AVX2 + FMA build of the fine-grained sparse kernels (Haswell and later, Zen 1-3), bf16 widened to fp32.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FINE_NS avx2
#define FINE_ENTRY fine_kernels_avx2
#define FINE_NAME "cpp_fine_avx2"
#define SPV_AVX512 0
#define SPV_NATIVE_BF16 0
#include "sparse_fine_impl.h"
#pragma GCC pop_options
