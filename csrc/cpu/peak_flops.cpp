// sparsevit_C::peak_gflops -- the machine's arithmetic peak, measured with register-resident loops.
//
// Kernel efficiency ("kept work at N% of peak") needs an honest denominator. A large GEMM through
// MKL or oneDNN is a lower bound only (MKL takes no AVX-512 path on AMD), so this op runs the
// instruction itself: 16 independent accumulators (enough to cover FMA latency x FMA pipes on any
// current core) updated by `vfmadd231ps zmm` (fp32) or `vdpbf16ps zmm` (bf16) in a loop that
// touches no memory, on `threads` threads at once, and returns the sustained rate in GFLOP/s:
//   fp32: 2 flops per lane per FMA;   bf16: 4 flops per fp32 lane per vdpbf16ps (two pair-products).
// Returns 0 where the instruction is missing (no AVX-512, or bf16 without AVX512_BF16).
//
//   peak_gflops(str dtype="float32", int threads=0 (all of torch's), float seconds=0.2) -> float
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <time.h>
#include <vector>

namespace sparsevit_cpu {
namespace {

constexpr int kAcc = 16;         // independent accumulator chains
constexpr int64_t kInner = 4096;  // loop trips between clock reads

// The loops are written in assembly: compilers keep an array of 16 accumulators in memory when
// anything makes it opaque, which would measure the load/store ports instead of the FMA pipes.
#define SPV_REP16(OP, A, B)                                                                          \
  OP " " A ", " B ", %%zmm16\n\t" OP " " A ", " B ", %%zmm17\n\t" OP " " A ", " B ", %%zmm18\n\t"        \
  OP " " A ", " B ", %%zmm19\n\t" OP " " A ", " B ", %%zmm20\n\t" OP " " A ", " B ", %%zmm21\n\t"        \
  OP " " A ", " B ", %%zmm22\n\t" OP " " A ", " B ", %%zmm23\n\t" OP " " A ", " B ", %%zmm24\n\t"        \
  OP " " A ", " B ", %%zmm25\n\t" OP " " A ", " B ", %%zmm26\n\t" OP " " A ", " B ", %%zmm27\n\t"        \
  OP " " A ", " B ", %%zmm28\n\t" OP " " A ", " B ", %%zmm29\n\t" OP " " A ", " B ", %%zmm30\n\t"        \
  OP " " A ", " B ", %%zmm31\n\t"
#define SPV_ZMM_CLOBBERS                                                                             \
  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", \
      "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "xmm0", "xmm1"

// Each returns the flops done. Accumulators start at zero and multiply tiny constants, so values
// stay finite (denormal-free: 1e-3 * 1e-3 products accumulate to at most reps * 1e-6 * 16).
__attribute__((target("avx512f"))) double fma_loop_avx512(int64_t reps) {
  const float a = 1e-3f;
  __asm__ volatile(
      SPV_REP16("vpxord", "%%zmm0", "%%zmm0")
      "vbroadcastss %1, %%zmm0\n\t"
      "vmovaps %%zmm0, %%zmm1\n\t"
      "1:\n\t" SPV_REP16("vfmadd231ps", "%%zmm0", "%%zmm1")
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(reps)
      : "m"(a)
      : SPV_ZMM_CLOBBERS, "cc");
  return 0.0;
}

__attribute__((target("avx512f,avx512bf16"))) double dpbf16_loop(int64_t reps) {
  const int32_t a = 0x3a833a83;  // a bf16 pair of ~1e-3
  __asm__ volatile(
      SPV_REP16("vpxord", "%%zmm0", "%%zmm0")
      "vpbroadcastd %1, %%zmm0\n\t"
      "vmovaps %%zmm0, %%zmm1\n\t"
      "1:\n\t" SPV_REP16("vdpbf16ps", "%%zmm0", "%%zmm1")
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(reps)
      : "m"(a)
      : SPV_ZMM_CLOBBERS, "cc");
  return 0.0;
}

typedef double (*loop_fn)(int64_t);
struct PeakLoop {
  loop_fn fn;
  double flops_per_rep;  // 16 instructions x lanes x flops per lane
};

PeakLoop pick_loop(const std::string& dtype) {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (dtype == "bfloat16")
    return (avx512 && __builtin_cpu_supports("avx512bf16")) ? PeakLoop{dpbf16_loop, 16.0 * 16 * 4} : PeakLoop{};
  TORCH_CHECK(dtype == "float32", "sparsevit_C::peak_gflops: dtype must be 'float32' or 'bfloat16', got '",
              dtype, "'");
  return avx512 ? PeakLoop{fma_loop_avx512, 16.0 * 16 * 2} : PeakLoop{};
}

// CPU time this thread has run: on a shared machine a wall clock would count the time the thread
// waited for a core, and report the load instead of the peak.
double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Every thread runs its loop for `seconds` of its own CPU time (after a short warm-up that lets the
// core reach its vector clock); the peak is the sum of the per-thread rates, i.e. what `threads`
// cores deliver when each has its core to itself.
double peak_gflops(const std::string& dtype, int64_t threads, double seconds) {
  TORCH_CHECK(seconds > 0 && seconds <= 10, "sparsevit_C::peak_gflops: seconds must be in (0, 10]");
  const PeakLoop loop = pick_loop(dtype);
  if (!loop.fn) return 0.0;
  const int64_t nth = threads > 0 ? threads : at::get_num_threads();
  std::vector<double> rate(nth, 0.0);
  const int old_threads = at::get_num_threads();
  at::set_num_threads((int)nth);
  at::parallel_for(0, nth, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double warm_end = thread_seconds() + 0.02;
      while (thread_seconds() < warm_end) loop.fn(kInner);
      double flops = 0.0;
      const double t0 = thread_seconds();
      double t1 = t0;
      do {
        loop.fn(kInner);
        flops += loop.flops_per_rep * kInner;
        t1 = thread_seconds();
      } while (t1 - t0 < seconds);
      rate[i] = flops / (t1 - t0) / 1e9;
    }
  });
  at::set_num_threads(old_threads);
  double total = 0.0;
  for (double r : rate) total += r;
  return total;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("peak_gflops(str dtype='float32', int threads=0, float seconds=0.2) -> float",
        &sparsevit_cpu::peak_gflops);
}
