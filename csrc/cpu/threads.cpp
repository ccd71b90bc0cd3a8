// Pinning torch's intra-op worker threads (the ones at::parallel_for runs every sparsevit CPU op
// on, besides the calling thread) to one CPU each.
//
// Why: the OpenMP workers spin at the barrier that ends each parallel region and fall asleep after a
// few ms idle. When a forward starts after an idle gap (a server between requests), the kernel's
// wake-up placement often puts the woken worker on the CPU of the thread that woke it; the two then
// share one CPU, the one that waits spins through its time slice, and a forward pays milliseconds
// until the load balancer separates them (measured on a 2-CPU VM: a 2-block ViT forward 0.55 ms back
// to back, 13.7 ms after a 50 ms sleep; 2.3 ms with the worker pinned). OpenVINO and DeepSparse pin
// their own threads by default for the same reason. Python decides when and where
// (sparsevit/runtime/threads.py); this file only reaches each thread of the team. The calling
// thread is left alone: it is the user's, and pinning it too gained nothing.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sched.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <mutex>
#include <vector>

namespace sparsevit_cpu {
namespace {

// Runs one task per intra-op thread; task i > 0 pins the worker that runs it to cpus[i - 1].
// Returns, per thread number i, the OS thread id (out[2i]) and the CPU it was pinned to (out[2i+1],
// -1 for the calling thread), so the caller can check that every thread was reached once.
std::vector<int64_t> pin_intraop_workers(std::vector<int64_t> cpus) {
  const int64_t n = at::get_num_threads();
  TORCH_CHECK((int64_t)cpus.size() == n - 1, "pin_intraop_workers: ", n, " intra-op threads have ", n - 1,
              " workers, got ", cpus.size(), " CPUs");
  TORCH_CHECK(!at::in_parallel_region(), "pin_intraop_workers: called inside a parallel region");
  for (int64_t c : cpus) TORCH_CHECK(c >= 0 && c < CPU_SETSIZE, "pin_intraop_workers: CPU ", c, " out of range");
  std::vector<int64_t> out(2 * n, -1);
  std::mutex lock;
  std::vector<std::string> errors;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    const int tid = at::get_thread_num();
    if (b != tid || e != b + 1 || tid >= n) {  // one task per thread is what makes the pinning exact
      std::lock_guard<std::mutex> g(lock);
      errors.push_back("thread " + std::to_string(tid) + " ran tasks [" + std::to_string(b) + ", " +
                       std::to_string(e) + ")");
      return;
    }
    out[2 * tid] = (int64_t)syscall(SYS_gettid);
    if (tid == 0) return;
    const int cpu = (int)cpus[tid - 1];
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) == 0) {
      out[2 * tid + 1] = cpu;
    } else {
      std::lock_guard<std::mutex> g(lock);
      errors.push_back("sched_setaffinity(CPU " + std::to_string(cpu) + ") failed on thread " + std::to_string(tid));
    }
  });
  TORCH_CHECK(errors.empty(), "pin_intraop_workers: ", errors.front());
  return out;
}

}  // namespace
}  // namespace sparsevit_cpu

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("pin_intraop_workers(int[] cpus) -> int[]", &sparsevit_cpu::pin_intraop_workers);
}
