// Block-sparse linear on tensor cores: y = act(x @ W^T + b), W [out, in] stored as BSR.
//
// Layout (sparsevit.formats.BlockSparseWeight): values [nnz, BH, BW] row-major tiles of W (zero-padded
// at the ragged edge), col_indices int32 [nnz], crow_indices int32 [out/BH + 1].
//
// One thread block (4 warps) per (block row r of W, tile of BM tokens). It walks only row r's nonzero
// tiles: for each, the BM x BW slice of x and the BH x BW tile of W are staged in shared memory and
// multiplied with WMMA 16x16x16 (fp16/bf16 in, fp32 accumulate; mma.sync underneath on sm_80/87/90).
// The BM x BH fp32 result goes through shared memory once more so the epilogue (bias, GELU, cast)
// writes coalesced rows. BH, BW in {16, 32, 64}; BM in {32, 64} picked from the token count so that
// small batches still fill the GPU (the grid's fast axis is the block row: "split-N").
//
// Registered as torch.ops.sparsevit_C.bsr_linear_cuda(x, values, col_indices, crow_indices,
// out_features, bias, activation:int 0 none / 1 gelu / 2 gelu_tanh).
// Only light headers: <ATen/ATen.h> demands C++20 in recent torch and <ATen/cuda/CUDAContext.h>
// pulls cuBLAS/cuSPARSE headers that a bare toolkit may lack.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>

#include "bsr_common.cuh"

namespace sparsevit {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;   // halves: keeps WMMA ldm a multiple of 16 bytes and spreads smem banks
constexpr int kCPad = 4;  // floats

template <typename T, int BM, int BH, int BW>
__global__ void __launch_bounds__(kThreads)
bsr_linear_wmma_kernel(const T* __restrict__ x, const T* __restrict__ values, const int* __restrict__ col_idx,
                       const int* __restrict__ crow, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                       int K, int act, bool x_vec16) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int FM = BM / 16, FN = BH / 16, FRAGS = FM * FN;
  constexpr int PER_WARP = (FRAGS + kWarps - 1) / kWarps;
  constexpr int XLD = BW + kPad, CLD = BH + kCPad;
  constexpr int VEC = 8;  // 8 x 16-bit = 16 bytes

  __shared__ __align__(128) T xs[BM * XLD];
  __shared__ __align__(128) T ws[BH * XLD];
  __shared__ __align__(128) float cs[BM * CLD];

  const int r = blockIdx.x;
  const int m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32;
  const int start = crow[r], end = crow[r + 1];

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[PER_WARP];
#pragma unroll
  for (int i = 0; i < PER_WARP; ++i) wmma::fill_fragment(acc[i], 0.0f);

  for (int j = start; j < end; ++j) {
    const int k0 = col_idx[j] * BW;
    // x[m0:m0+BM, k0:k0+BW] -> xs, zero outside M x K.
    for (int e = threadIdx.x; e < BM * (BW / VEC); e += kThreads) {
      const int row = e / (BW / VEC), kc = (e % (BW / VEC)) * VEC;
      const int m = m0 + row, k = k0 + kc;
      T* dst = xs + row * XLD + kc;
      if (x_vec16 && m < M && k + VEC <= K) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(x + (int64_t)m * K + k);
      } else {
#pragma unroll
        for (int t = 0; t < VEC; ++t)
          dst[t] = (m < M && k + t < K) ? x[(int64_t)m * K + k + t] : from_float<T>(0.0f);
      }
    }
    // The W tile is contiguous and 16-byte aligned (torch allocations are): always vector loads.
    const T* wsrc = values + (int64_t)j * (BH * BW);
    for (int e = threadIdx.x; e < BH * (BW / VEC); e += kThreads) {
      const int row = e / (BW / VEC), kc = (e % (BW / VEC)) * VEC;
      *reinterpret_cast<uint4*>(ws + row * XLD + kc) = *reinterpret_cast<const uint4*>(wsrc + row * BW + kc);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BW / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < PER_WARP; ++i) {
        const int f = warp + i * kWarps;
        if (f < FRAGS) {
          const int fm = f / FN, fn = f % FN;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          // B = W^T (K x N): element (k, n) is ws[n][k], i.e. column-major with ld XLD.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(a, xs + fm * 16 * XLD + kk * 16, XLD);
          wmma::load_matrix_sync(b, ws + fn * 16 * XLD + kk * 16, XLD);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < PER_WARP; ++i) {
    const int f = warp + i * kWarps;
    if (f < FRAGS) {
      const int fm = f / FN, fn = f % FN;
      wmma::store_matrix_sync(cs + fm * 16 * CLD + fn * 16, acc[i], CLD, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BH; e += kThreads) {
    const int row = e / BH, col = e % BH;
    const int m = m0 + row, n = r * BH + col;
    if (m < M && n < N) {
      float v = cs[row * CLD + col];
      if (bias != nullptr) v += to_float<T>(bias[n]);
      y[(int64_t)m * N + n] = from_float<T>(apply_activation(v, act));
    }
  }
#else
  __trap();  // tensor-core bf16/fp16 WMMA path needs sm_80+; the host refuses older GPUs first
#endif
}

template <typename T, int BM, int BH, int BW>
void launch_bm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col, const at::Tensor& crow,
               const c10::optional<at::Tensor>& bias, at::Tensor& y, int M, int N, int K, int act, cudaStream_t stream) {
  const int n_block_rows = static_cast<int>(crow.numel()) - 1;
  const dim3 grid(n_block_rows, (M + BM - 1) / BM);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const bool x_vec16 = (K % 8 == 0) && (reinterpret_cast<std::uintptr_t>(xp) % 16 == 0);
  const T* bp = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  bsr_linear_wmma_kernel<T, BM, BH, BW><<<grid, kThreads, 0, stream>>>(
      xp, reinterpret_cast<const T*>(values.data_ptr()), col.data_ptr<int>(), crow.data_ptr<int>(), bp,
      reinterpret_cast<T*>(y.data_ptr()), M, N, K, act, x_vec16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BH, int BW>
void launch_block(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col, const at::Tensor& crow,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y, int M, int N, int K, int act,
                  cudaStream_t stream, int sm_count) {
  const int n_block_rows = static_cast<int>(crow.numel()) - 1;
  // Fewer than ~2 waves of 64-token tiles: halve the tile so small batches fill the SMs.
  const bool small = static_cast<int64_t>(n_block_rows) * ((M + 63) / 64) < 2 * sm_count;
  if (small) launch_bm<T, 32, BH, BW>(x, values, col, crow, bias, y, M, N, K, act, stream);
  else launch_bm<T, 64, BH, BW>(x, values, col, crow, bias, y, M, N, K, act, stream);
}

template <typename T>
void dispatch_block(int bh, int bw, const at::Tensor& x, const at::Tensor& values, const at::Tensor& col,
                    const at::Tensor& crow, const c10::optional<at::Tensor>& bias, at::Tensor& y, int M, int N, int K,
                    int act, cudaStream_t stream, int sm_count) {
#define SPARSEVIT_BLOCK_CASE(H, W)                                                              \
  if (bh == H && bw == W) {                                                                     \
    launch_block<T, H, W>(x, values, col, crow, bias, y, M, N, K, act, stream, sm_count);       \
    return;                                                                                     \
  }
  SPARSEVIT_BLOCK_CASE(16, 16) SPARSEVIT_BLOCK_CASE(16, 32) SPARSEVIT_BLOCK_CASE(16, 64)
  SPARSEVIT_BLOCK_CASE(32, 16) SPARSEVIT_BLOCK_CASE(32, 32) SPARSEVIT_BLOCK_CASE(32, 64)
  SPARSEVIT_BLOCK_CASE(64, 16) SPARSEVIT_BLOCK_CASE(64, 32) SPARSEVIT_BLOCK_CASE(64, 64)
#undef SPARSEVIT_BLOCK_CASE
  TORCH_CHECK(false, "bsr_linear_cuda: block ", bh, "x", bw, " unsupported (each side in {16, 32, 64})");
}

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_indices,
                           const at::Tensor& crow_indices, int64_t out_features, const c10::optional<at::Tensor>& bias,
                           int64_t activation) {
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && col_indices.is_cuda() && crow_indices.is_cuda(),
              "bsr_linear_cuda: all tensors must be on CUDA");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "bsr_linear_cuda: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "bsr_linear_cuda: values dtype ", values.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(values.dim() == 3, "bsr_linear_cuda: values must be [nnz, bh, bw]");
  TORCH_CHECK(col_indices.scalar_type() == at::kInt && crow_indices.scalar_type() == at::kInt,
              "bsr_linear_cuda: col/crow indices must be int32");
  TORCH_CHECK(activation >= 0 && activation <= 2, "bsr_linear_cuda: activation must be 0, 1 or 2");
  const c10::cuda::CUDAGuard guard(x.device());
  int dev = x.get_device(), major = 0, minor = 0, sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
  TORCH_CHECK(major >= 8, "bsr_linear_cuda: needs sm_80 or newer (tensor-core bf16/fp16), got sm_", major, minor);

  const int64_t K = x.size(-1);
  const int64_t N = out_features;
  const int bh = static_cast<int>(values.size(1)), bw = static_cast<int>(values.size(2));
  TORCH_CHECK((crow_indices.numel() - 1) * bh >= N, "bsr_linear_cuda: crow_indices has too few block rows for ",
              N, " outputs");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX, "bsr_linear_cuda: sizes must fit in int32");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bsr_linear_cuda: bias has ", bias->numel(), " elements, expected ", N);
    b = bias->to(x.scalar_type()).contiguous();
  }
  if (M > 0 && N > 0) {
    const at::Tensor vals = values.contiguous();
    const at::Tensor col = col_indices.contiguous(), crow = crow_indices.contiguous();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
    if (x.scalar_type() == at::kHalf)
      dispatch_block<__half>(bh, bw, x2, vals, col, crow, b, y, (int)M, (int)N, (int)K, (int)activation, stream, sm);
    else
      dispatch_block<__nv_bfloat16>(bh, bw, x2, vals, col, crow, b, y, (int)M, (int)N, (int)K, (int)activation,
                                    stream, sm);
  }
  return y.view(out_shape);
}

}  // namespace
}  // namespace sparsevit

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("bsr_linear_cuda(Tensor x, Tensor values, Tensor col_indices, Tensor crow_indices, int out_features, "
        "Tensor? bias, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsevit_C, CUDA, m) { m.impl("bsr_linear_cuda", &sparsevit::bsr_linear_cuda); }
