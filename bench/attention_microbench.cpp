// Kernel-only timing of the CPU attention micro-kernels (csrc/cpu/attention_cpu_impl.h, AVX-512 +
// BF16 build) on DeiT-S shapes (and pruned heads / head dims): one thread, thread CPU time, no torch,
// no op overhead. q, k, v are read in place from a [B, N, 3, H, D] qkv buffer and out written as
// [B, N, H, Dv], as the model hands them to sparsevit_C::attention_cpu; heads run in order with the
// next head packed ahead (next_head_stride 1, what the op does at one thread). GF/s counts the useful
// FLOPs, 4 B H N^2 D (no padding); compare with torch.ops.sparsevit_C.peak_gflops(dtype, 1, 0.3).
//
//   g++ -O3 -std=c++17 -fno-math-errno -Icsrc/cpu -o /tmp/attn_micro bench/attention_microbench.cpp
//   /tmp/attn_micro [rounds=15] [case]   # case: run only that row (0-based, fp32 rows first)
//
// A/B in one process against another commit's kernels (AttnParams must be the same in both):
//   mkdir -p /tmp/attn_base && for f in attention_cpu_impl.h sparse_fine_simd.h; do
//     git show main:csrc/cpu/$f > /tmp/attn_base/$f; done && : > /tmp/attn_base/attention_cpu_params.h
//   g++ ... -DATTN_BASE_DIR=/tmp/attn_base -o /tmp/attn_ab bench/attention_microbench.cpp
// Each case then times both builds in alternating rounds: base / new ratios of the medians and of the
// fastest calls, and the largest difference between their outputs. On a shared host single runs
// move by a few percent: only differences seen in every run mean anything.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <algorithm>
#include <random>
#include <vector>

#include "attention_cpu_avx512bf16.cpp"  // the kernels exactly as the extension builds them

#ifdef ATTN_BASE_DIR
#define ATTN_STR2(x) #x
#define ATTN_STR(x) ATTN_STR2(x)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#undef ATTN_NS
#undef ATTN_ENTRY
#undef ATTN_NAME
#define ATTN_NS base_avx512bf16
#define ATTN_ENTRY attn_kernels_base
#define ATTN_NAME "base"
#include ATTN_STR(ATTN_BASE_DIR/attention_cpu_impl.h)
#pragma GCC pop_options
#endif

using namespace sparsevit_cpu;

static double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

struct Case {
  int B, H, N, D, bf16;
  std::vector<float> qkv32, out32;
  std::vector<uint16_t> qkv16, out16;
  AttnParams p;
};

static void build(Case& c, std::mt19937& g) {
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D, n = B * N * 3 * H * D;
  std::normal_distribution<float> nd(0.f, 1.f);
  c.qkv32.resize(n);
  for (auto& x : c.qkv32) x = nd(g);
  if (c.bf16) {
    c.qkv16.resize(n);
    for (int64_t i = 0; i < n; ++i) c.qkv16[i] = to_bf16(c.qkv32[i]);
    c.out16.assign(B * N * H * D, 0);
  } else {
    c.out32.assign(B * N * H * D, 0.f);
  }
  AttnParams& p = c.p;
  memset(&p, 0, sizeof p);
  const int64_t es = c.bf16 ? 2 : 4;
  const char* base = c.bf16 ? (const char*)c.qkv16.data() : (const char*)c.qkv32.data();
  p.q = base;
  p.k = base + H * D * es;
  p.v = base + 2 * H * D * es;
  const int64_t s[3] = {N * 3 * H * D, D, 3 * H * D};
  for (int d = 0; d < 3; ++d) p.sq[d] = p.sk[d] = p.sv[d] = s[d];
  p.out = c.bf16 ? (void*)c.out16.data() : (void*)c.out32.data();
  p.so[0] = N * H * D, p.so[1] = D, p.so[2] = H * D;
  p.B = B, p.H = H, p.N = N, p.Dqk = D, p.Dv = D;
  p.Np = (N + 15) / 16 * 16, p.Dvp = (D + 15) / 16 * 16;
  p.scale = 1.f / sqrtf((float)D);
  p.bf16 = c.bf16;
  p.next_head_stride = 1;
}

// One call of the op at one thread: every head in order, the next one packed ahead.
static double call(const AttnKernels* k, const AttnParams& p, std::vector<float>& scratch) {
  const int64_t need = k->scratch_floats(&p) + 16;
  if ((int64_t)scratch.size() < need) scratch.resize(need);
  float* s = scratch.data();
  s += (16 - ((uintptr_t)s / 4) % 16) % 16;
  memset(s, 0, 64);
  const double t0 = thread_seconds();
  for (int64_t hd = 0; hd < p.B * p.H; ++hd) k->run(&p, hd / p.H, hd % p.H, 0, p.N, s);
  return thread_seconds() - t0;
}

static std::vector<float> output(const Case& c) {
  if (!c.bf16) return c.out32;
  std::vector<float> o(c.out16.size());
  for (size_t i = 0; i < o.size(); ++i) o[i] = from_bf16(c.out16[i]);
  return o;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 15;
  const int only = argc > 2 ? atoi(argv[2]) : -1;  // run only case `only` (0-based, fp32 cases first)
  std::mt19937 g(7);
  const int shapes[][4] = {{8, 6, 197, 64}, {1, 6, 197, 64}, {8, 3, 197, 64}, {8, 6, 197, 48},
                           {8, 6, 197, 40}, {8, 6, 197, 24}, {8, 6, 197, 16}, {8, 6, 50, 64},
                           {64, 3, 49, 32}};  // last: Swin-T stage 1 windows (7 x 7 tokens, head dim 32)
  const AttnKernels* cur = attn_kernels_avx512bf16();
#ifdef ATTN_BASE_DIR
  const AttnKernels* base = attn_kernels_base();
#endif
  std::vector<float> scratch;
  printf("%-6s %-18s %9s %8s", "dtype", "B,H,N,D", "new_ms", "GF/s");
#ifdef ATTN_BASE_DIR
  printf(" %9s %8s %8s %9s", "base_ms", "base/new", "(min)", "max|diff|");
#endif
  printf("\n");
  int index = -1;
  for (int bf16 = 0; bf16 < 2; ++bf16)
    for (const auto& sh : shapes) {
      if (++index != only && only >= 0) continue;
      Case c{sh[0], sh[1], sh[2], sh[3], bf16};
      build(c, g);
      std::vector<double> tn, tb;
      call(cur, c.p, scratch);  // warm-up
#ifdef ATTN_BASE_DIR
      call(base, c.p, scratch);
      const std::vector<float> ob = output(c);
#endif
      for (int r = 0; r < rounds; ++r) {
        tn.push_back(call(cur, c.p, scratch));
#ifdef ATTN_BASE_DIR
        tb.push_back(call(base, c.p, scratch));
#endif
      }
      call(cur, c.p, scratch);
      const std::vector<float> on = output(c);
      const double flops = 4.0 * c.B * c.H * c.N * c.N * c.D, mn = median(tn);
      printf("%-6s %3d,%d,%3d,%-8d %9.3f %8.1f", bf16 ? "bf16" : "fp32", c.B, c.H, c.N, c.D, mn * 1e3, flops / mn / 1e9);
#ifdef ATTN_BASE_DIR
      double diff = 0;
      for (size_t i = 0; i < on.size(); ++i) diff = std::max(diff, (double)fabsf(on[i] - ob[i]));
      const double min_ratio = *std::min_element(tb.begin(), tb.end()) / *std::min_element(tn.begin(), tn.end());
      printf(" %9.3f %8.3f %8.3f %9.2e", median(tb) * 1e3, median(tb) / mn, min_ratio, diff);
#endif
      printf("\n");
    }
  return 0;
}
