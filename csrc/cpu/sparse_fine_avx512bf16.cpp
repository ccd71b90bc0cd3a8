// AVX-512 + AVX512_BF16 (vdpbf16ps) build of the fine-grained sparse kernels (Zen 4/5, Sapphire Rapids).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define FINE_NS avx512bf16
#define FINE_ENTRY fine_kernels_avx512bf16
#define FINE_NAME "cpp_fine_avx512_bf16"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 1
#include "sparse_fine_impl.h"
#pragma GCC pop_options
