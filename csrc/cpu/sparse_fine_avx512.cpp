// AVX-512 (F/BW/VL/DQ) build of the fine-grained sparse kernels, bf16 widened to fp32 (Skylake-X, Ice Lake).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FINE_NS avx512
#define FINE_ENTRY fine_kernels_avx512
#define FINE_NAME "cpp_fine_avx512"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 0
#include "sparse_fine_impl.h"
#pragma GCC pop_options
