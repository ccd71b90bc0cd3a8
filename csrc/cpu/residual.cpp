// Residual-subset ops for P3B-style plans (a branch reads some residual channels, writes others).
//
// layernorm_gather: LayerNorm statistics over the full row, output only the gathered channels,
//   in one pass over the row (no full-width normalised tensor is materialised).
// residual_scatter_add: out = x; out[:, index] += y, row by row (copy and scatter fused).
//
// Both are memory-bound; each token row is handled by one thread, rows split across torch's pool.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

template <typename T>
void ln_gather_rows(const T* x, const float* w, const float* b, const int64_t* idx, T* y, int64_t rows,
                    int64_t D, int64_t K, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      // two-pass mean/variance in fp32 (rows are short and hot in cache; matches F.layer_norm)
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += to_f(xr[d]);
      const float mean = sum / static_cast<float>(D);
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < D; ++d) {
        const float c = to_f(xr[d]) - mean;
        sq += c * c;
      }
      const float rstd = 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
      T* yr = y + r * K;
      for (int64_t j = 0; j < K; ++j) {
        float v = (to_f(xr[idx[j]]) - mean) * rstd;
        if (w) v *= w[j];
        if (b) v += b[j];
        yr[j] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void scatter_add_rows(const T* x, const int64_t* idx, const T* y, T* out, int64_t rows, int64_t D, int64_t K) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* orow = out + r * D;
      std::memcpy(orow, xr, sizeof(T) * D);
      const T* yr = y + r * K;
      for (int64_t j = 0; j < K; ++j) orow[idx[j]] = static_cast<T>(to_f(orow[idx[j]]) + to_f(yr[j]));
    }
  });
}

void check_index(const at::Tensor& index, int64_t D, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.device().is_cpu(), op,
              ": index must be a 1-D int64 CPU tensor");
  if (index.numel() > 0) {
    TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < D, op,
                ": index out of range for last dim ", D);
  }
}

at::Tensor layernorm_gather(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& index, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "layernorm_gather: x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "layernorm_gather: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t D = x.size(-1), K = index.numel();
  check_index(index, D, "layernorm_gather");
  auto xc = x.contiguous();
  auto idx = index.contiguous();
  auto w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!w.defined() || w.numel() == K, "layernorm_gather: weight must have len(index) entries");
  TORCH_CHECK(!b.defined() || b.numel() == K, "layernorm_gather: bias must have len(index) entries");
  auto sizes = x.sizes().vec();
  sizes.back() = K;
  auto y = at::empty(sizes, x.options());
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    ln_gather_rows<float>(xc.data_ptr<float>(), wp, bp, idx.data_ptr<int64_t>(), y.data_ptr<float>(), rows, D, K,
                          static_cast<float>(eps));
  } else {
    ln_gather_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), wp, bp, idx.data_ptr<int64_t>(),
                                  y.data_ptr<c10::BFloat16>(), rows, D, K, static_cast<float>(eps));
  }
  return y;
}

at::Tensor residual_scatter_add(const at::Tensor& x, const at::Tensor& index, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "residual_scatter_add: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "residual_scatter_add: x and y dtypes differ (", x.scalar_type(),
              " vs ", y.scalar_type(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "residual_scatter_add: float32 or bfloat16 only, got ", x.scalar_type());
  const int64_t D = x.size(-1), K = index.numel();
  check_index(index, D, "residual_scatter_add");
  TORCH_CHECK(y.size(-1) == K && y.numel() / std::max<int64_t>(K, 1) == x.numel() / std::max<int64_t>(D, 1),
              "residual_scatter_add: y does not match x and index");
  auto xc = x.contiguous(), yc = y.contiguous(), idx = index.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  if (x.scalar_type() == at::kFloat) {
    scatter_add_rows<float>(xc.data_ptr<float>(), idx.data_ptr<int64_t>(), yc.data_ptr<float>(),
                            out.data_ptr<float>(), rows, D, K);
  } else {
    scatter_add_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), idx.data_ptr<int64_t>(),
                                    yc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, D, K);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("layernorm_gather(Tensor x, Tensor? weight, Tensor? bias, Tensor index, float eps) -> Tensor");
  m.def("residual_scatter_add(Tensor x, Tensor index, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) {
  m.impl("layernorm_gather", &layernorm_gather);
  m.impl("residual_scatter_add", &residual_scatter_add);
}
