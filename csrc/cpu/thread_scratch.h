// Scratch memory for the CPU ops, kept per calling thread and grown on demand.
//
// Why not a fresh tensor per call: the packed activations and hidden tiles are several MB, and a
// fresh allocation is touched for the first time on every call. Those page faults (~15 ms for 19 MB
// in a VM) cost more than the sparse product itself at high sparsity, and at batch 1 even the
// allocator's small calls add up over the 48 Linears of a forward.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdlib>

namespace sparsevit_cpu {

class ThreadScratch {
 public:
  explicit ThreadScratch(const char* op) : op_(op) {}
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() { std::free(ptr_); }

  // At least n bytes, 64-byte aligned; valid until the next get() on this object. Contents are not
  // kept when it grows.
  char* get(size_t n) {
    if (n > bytes_) {
      std::free(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
      if (posix_memalign(&ptr_, 64, n) != 0) ptr_ = nullptr;
      TORCH_CHECK(ptr_ != nullptr, op_, ": cannot allocate ", n, " bytes of scratch");
      bytes_ = n;
    }
    return static_cast<char*>(ptr_);
  }

 private:
  const char* op_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace sparsevit_cpu
