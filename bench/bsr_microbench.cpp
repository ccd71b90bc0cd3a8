// Kernel-only timing of the block-sparse kernels (csrc/cpu/bsr_kernel_impl.h, AVX-512 + BF16 build)
// on DeiT-S shapes, 32x32 blocks: one thread, thread CPU time, no torch, no Python, no op overhead.
// Each configuration reports its kept work (2 x kept block area x tokens) as % of the best
// register-only FMA / vdpbf16ps probe seen so far in the run (the clock moves with the other
// core's load, so the best probe and the best call are compared), plus a checksum of y that
// must not change between two builds of the kernels meant to compute the same thing.
//
//   g++ -O3 -std=c++17 -fno-math-errno -Icsrc/cpu -o /tmp/bsr_micro bench/bsr_microbench.cpp
//   /tmp/bsr_micro [sparsity=0.7]          # hot caches: the same call repeated
//   FLUSH=1 /tmp/bsr_micro                 # 64 MiB written before every call: cold caches
//
// To compare a change, build the binary from a copy of csrc/cpu with and without it (-I that copy)
// and run the two alternately a few times; on the shared development host single runs vary by a few
// percent, so only differences seen in every round mean anything.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <algorithm>
#include <random>
#include <vector>

#include "bsr_avx512bf16.cpp"  // the kernels exactly as the extension builds them

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")  // the peak probe

// GF/s of 16 independent register-only chains (the same loop as torch.ops.sparsevit_C.peak_gflops).
static double peak_gflops(int bf16) {
  timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  const long n = 200000;
  for (long i = 0; i < n; ++i) {
#define F(op, r) op " %%zmm31, %%zmm30, %%zmm" #r "\n"
#define CHAINS(op) F(op, 0) F(op, 1) F(op, 2) F(op, 3) F(op, 4) F(op, 5) F(op, 6) F(op, 7) F(op, 8) F(op, 9) \
    F(op, 10) F(op, 11) F(op, 12) F(op, 13) F(op, 14) F(op, 15)
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
    "xmm12", "xmm13", "xmm14", "xmm15"
    if (bf16) __asm__ volatile(CHAINS("vdpbf16ps")::: CLOBBERS);
    else __asm__ volatile(CHAINS("vfmadd231ps")::: CLOBBERS);
  }
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  return (double)n * 16 * (bf16 ? 64 : 32) / s / 1e9;
}
#pragma GCC pop_options

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

// Random data under a random block mask, laid out as bsr_linear.cpp hands it to the kernels
// (x read in place, rows padded with zeros up to whole token tiles instead of a tail copy).
struct Case {
  std::vector<int32_t> crow, col;
  std::vector<float> bias;
  std::vector<char> bad;
  void *w = nullptr, *x = nullptr, *y = nullptr;
  BsrParams p;
  ~Case() { free(w), free(x), free(y); }
};

static void build(Case& c, int in, int out, int T, int bf16, double sparsity, std::mt19937& g) {
  const int bs = 32, nbr = (out + bs - 1) / bs, nbc = (in + bs - 1) / bs, n = nbr * nbc;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g);
  std::vector<char> keep(n, 0);
  for (int i = 0; i < std::max(1, (int)llround((1 - sparsity) * n)); ++i) keep[order[i]] = 1;
  c.crow.assign(1, 0);
  for (int r = 0; r < nbr; ++r) {
    for (int k = 0; k < nbc; ++k)
      if (keep[r * nbc + k]) c.col.push_back(k);
    c.crow.push_back((int32_t)c.col.size());
  }
  const int TT = avx512bf16::token_tile(bs, bf16), n_tiles = (T + TT - 1) / TT;
  const size_t esz = bf16 ? 2 : 4, nw = c.col.size() * bs * bs, nx = (size_t)n_tiles * TT * in;
  c.w = aligned_alloc(64, (nw * esz + 63) / 64 * 64);
  c.x = aligned_alloc(64, (nx * esz + 63) / 64 * 64);
  c.y = aligned_alloc(64, ((size_t)T * out * esz + 63) / 64 * 64);
  std::uniform_real_distribution<float> u(-1, 1);
  for (size_t i = 0; i < nw; ++i) bf16 ? (void)(((uint16_t*)c.w)[i] = to_bf16(u(g))) : (void)(((float*)c.w)[i] = u(g));
  for (size_t i = 0; i < nx; ++i) {
    const float v = i < (size_t)T * in ? u(g) : 0.f;
    bf16 ? (void)(((uint16_t*)c.x)[i] = to_bf16(v)) : (void)(((float*)c.x)[i] = v);
  }
  c.bias.resize(nbr * bs);
  for (float& b : c.bias) b = u(g);
  c.bad.assign(T, 0);
  BsrParams& p = c.p;
  memset(&p, 0, sizeof p);
  p.x = p.xa = c.x;
  p.ldx = p.lda = in;
  p.y = c.y;
  p.ldy = out;
  p.wpack = c.w;
  p.col = c.col.data();
  p.crow = c.crow.data();
  p.bias_pad = c.bias.data();
  p.T = T, p.in = in, p.out = out, p.nbr = nbr, p.nbc = nbc;
  p.bh = p.bw = p.BHP = p.KP = bs;
  p.TT = TT, p.bf16 = bf16, p.n_tiles = n_tiles;
  p.bad_tok = c.bad.data();
}

static double checksum(const BsrParams& p) {
  double s = 0;
  for (int64_t i = 0; i < p.T * p.out; ++i) {
    float v;
    if (p.bf16) {
      const uint32_t u = (uint32_t)((const uint16_t*)p.y)[i] << 16;
      memcpy(&v, &u, 4);
    } else {
      v = ((const float*)p.y)[i];
    }
    s += v * (1 + i % 7);
  }
  return s;
}

static void run(int in, int out, int T, int bf16, double sparsity, bool flush) {
  static double best_peak[2];
  static std::vector<float> junk(16 << 20);
  std::mt19937 g(1);
  Case c;
  build(c, in, out, T, bf16, sparsity, g);
  best_peak[bf16] = std::max(best_peak[bf16], peak_gflops(bf16));
  std::vector<double> t;
  for (int rep = 0; rep < (T > 1000 ? 15 : 80); ++rep) {
    if (flush)
      for (size_t i = 0; i < junk.size(); i += 16) junk[i] += 1.f;
    const double t0 = thread_seconds();
    avx512bf16::compute(&c.p, 0, c.p.nbr, 0, c.p.n_tiles);
    t.push_back(thread_seconds() - t0);
  }
  best_peak[bf16] = std::max(best_peak[bf16], peak_gflops(bf16));
  std::sort(t.begin(), t.end());
  const double gf = 2.0 * c.col.size() * 1024.0 * T / 1e9, pk = best_peak[bf16];
  printf("%s %4d->%4d T=%4d: %5.1f%% (med %5.1f%%) of %.0f GF/s  chk %.6g\n", bf16 ? "bf16" : "fp32", in, out, T,
         100 * gf / t[0] / pk, 100 * gf / t[t.size() / 2] / pk, pk, checksum(c.p));
}

int main(int argc, char** argv) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) {
    fprintf(stderr, "this benchmark needs AVX-512 BF16 (Zen 4/5, Cooper / Sapphire Lake)\n");
    return 1;
  }
  const double sparsity = argc > 1 ? atof(argv[1]) : 0.7;
  const bool flush = getenv("FLUSH") != nullptr;
  // DeiT-S qkv, proj, fc1, fc2 and the 50%-sliced qkv / fc1 / fc2 (770 columns: a partial last block
  // column, counted as whole blocks, so those lines read a few % high).
  const int shapes[][2] = {{384, 1152}, {384, 384}, {384, 1536}, {1536, 384}, {384, 576}, {384, 770}, {770, 384}};
  for (int bf16 = 0; bf16 < 2; ++bf16)
    for (const auto& s : shapes)
      for (int T : {1576, 197}) run(s[0], s[1], T, bf16, sparsity, flush);
  return 0;
}
