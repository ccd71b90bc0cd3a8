// AVX-512 + AVX512_BF16 build of the CPU attention kernels: bf16 inputs run Q.K and P.V on
// vdpbf16ps (fp32 accumulation, fp32 softmax); fp32 inputs run the same code as the AVX-512 build.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define ATTN_NS avx512bf16
#define ATTN_ENTRY attn_kernels_avx512bf16
#define ATTN_NAME "cpp_attention_avx512_bf16"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 1
#include "attention_cpu_impl.h"
#pragma GCC pop_options
