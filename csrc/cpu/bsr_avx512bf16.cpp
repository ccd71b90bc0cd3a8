// AVX-512 + AVX512_BF16 (vdpbf16ps) build of the block-sparse kernels (Zen 4/5, Cooper/Sapphire Lake).
// Chosen at run time by bsr_linear.cpp; see bsr_kernel_impl.h for why no torch header is included.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define SPV_NS avx512bf16
#define SPV_ENTRY bsr_kernels_avx512bf16
#define SPV_NAME "cpp_bsr_avx512_bf16"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 1
#include "bsr_kernel_impl.h"
#pragma GCC pop_options
