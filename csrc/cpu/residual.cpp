// Residual-subset ops for P3B-style plans (a branch reads some residual channels, writes others).
//
// layernorm_gather: LayerNorm statistics over the full row, output only the gathered channels,
//   in one pass over the row (no full-width normalised tensor is materialised).
// residual_scatter_add: out = x; out[:, index] += y, row by row (copy and scatter fused).
// residual_add_layernorm: the residual add (full or scattered) and the next LayerNorm (full or
//   gathered) in one pass over each row.
//
// Both are memory-bound; each token row is handled by one thread, rows split across torch's pool.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

// Row kernels, compiled for AVX-512, AVX2 and a baseline; the loader picks the best the CPU has
// (GCC function multi-versioning). `omp simd` (enabled by -fopenmp-simd, no OpenMP runtime) lets the
// compiler reassociate the sums into vector lanes and use vector gathers/scatters for the index
// loops, which is safe because indices are checked to be strictly increasing (no duplicates).
__attribute__((target_clones("avx512f", "avx2", "default")))
float row_sum(const float* r, int64_t D) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += r[d];
  return sum;
}

// ln[d] = (r[d] - mean) * rstd * w[d] + b[d] for the read channels; two-pass variance (no cancellation).
__attribute__((target_clones("avx512f", "avx2", "default")))
void norm_row(const float* r, int64_t D, float sum, const int64_t* idx, const float* w, const float* b, int64_t K,
              float eps, float* out) {
  const float mean = sum / static_cast<float>(D);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) {
    const float c = r[d] - mean;
    sq += c * c;
  }
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
  if (idx == nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = (r[d] - mean) * rstd * w[d] + b[d];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) out[j] = (r[idx[j]] - mean) * rstd * w[j] + b[j];
  }
}

void ln_gather_row(const float* xr, int64_t D, const int64_t* idx, const float* w, const float* b, int64_t K,
                   float eps, float* out) {
  norm_row(xr, D, row_sum(xr, D), idx, w, b, K, eps, out);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void scatter_add_row(float* orow, const int64_t* idx, const float* yr, int64_t K) {
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) orow[idx[j]] += yr[j];
}

// bf16 <-> fp32 on the raw bits (bf16 is the top half of an fp32), so the loops vectorise;
// narrowing rounds to nearest even like c10::BFloat16 and keeps NaNs NaN.
__attribute__((target_clones("avx512f", "avx2", "default")))
void widen(const c10::BFloat16* src, int64_t n, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void narrow(const float* src, int64_t n, c10::BFloat16* dst) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    // NaN stays a (quiet) NaN: rounding could carry a NaN's payload into the exponent or sign
    d[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>((u >> 16) | 0x40u) : rounded;
  }
}

void ln_gather_rows(const at::Tensor& x, const float* w, const float* b, const int64_t* idx, at::Tensor& y,
                    int64_t rows, int64_t D, int64_t K, float eps) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> xbuf(bf16 ? D : 0), ybuf(bf16 ? K : 0);  // bf16 rows are widened once per row
    for (int64_t r = r0; r < r1; ++r) {
      if (bf16) {
        widen(x.data_ptr<c10::BFloat16>() + r * D, D, xbuf.data());
        ln_gather_row(xbuf.data(), D, idx, w, b, K, eps, ybuf.data());
        narrow(ybuf.data(), K, y.data_ptr<c10::BFloat16>() + r * K);
      } else {
        ln_gather_row(x.data_ptr<float>() + r * D, D, idx, w, b, K, eps, y.data_ptr<float>() + r * K);
      }
    }
  });
}

// out = x (unless out is x: in place); out[:, idx] += y
void scatter_add_rows(const at::Tensor& x, const int64_t* idx, const at::Tensor& y, at::Tensor& out, int64_t rows,
                      int64_t D, int64_t K) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool inplace = x.data_ptr() == out.data_ptr();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> obuf(bf16 ? D : 0), ybuf(bf16 ? K : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (bf16) {
        widen(x.data_ptr<c10::BFloat16>() + r * D, D, obuf.data());
        widen(y.data_ptr<c10::BFloat16>() + r * K, K, ybuf.data());
        scatter_add_row(obuf.data(), idx, ybuf.data(), K);
        narrow(obuf.data(), D, out.data_ptr<c10::BFloat16>() + r * D);
      } else {
        float* orow = out.data_ptr<float>() + r * D;
        if (!inplace) std::memcpy(orow, x.data_ptr<float>() + r * D, sizeof(float) * D);
        scatter_add_row(orow, idx, y.data_ptr<float>() + r * K, K);
      }
    }
  });
}

void check_index(const at::Tensor& index, int64_t D, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.device().is_cpu() &&
                  index.is_contiguous(), op, ": index must be a contiguous 1-D int64 CPU tensor");
  // a plain loop: a bad index would otherwise write out of bounds
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < D, op, ": index ", p[j], " out of range for last dim ", D);
    TORCH_CHECK(j == 0 || p[j] > p[j - 1], op, ": index must be strictly increasing (sorted, no duplicates)");
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
  // missing affine parameters become ones/zeros so the row kernel has no branches
  auto w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::ones({K}, x.options().dtype(at::kFloat));
  auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({K}, x.options().dtype(at::kFloat));
  TORCH_CHECK(w.numel() == K, "layernorm_gather: weight must have len(index) entries");
  TORCH_CHECK(b.numel() == K, "layernorm_gather: bias must have len(index) entries");
  auto sizes = x.sizes().vec();
  sizes.back() = K;
  auto y = at::empty(sizes, x.options());
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  ln_gather_rows(xc, w.data_ptr<float>(), b.data_ptr<float>(), idx.data_ptr<int64_t>(), y, rows, D, K,
                 static_cast<float>(eps));
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
  scatter_add_rows(xc, idx.data_ptr<int64_t>(), yc, out, rows, D, K);
  return out;
}

void residual_scatter_add_(at::Tensor& x, const at::Tensor& index, const at::Tensor& y) {
  TORCH_CHECK(x.is_contiguous(), "residual_scatter_add_: x must be contiguous to be updated in place");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "residual_scatter_add_: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "residual_scatter_add_: x and y dtypes differ");
  const int64_t D = x.size(-1), K = index.numel();
  check_index(index, D, "residual_scatter_add_");
  TORCH_CHECK(y.size(-1) == K && y.numel() / std::max<int64_t>(K, 1) == x.numel() / std::max<int64_t>(D, 1),
              "residual_scatter_add_: y does not match x and index");
  auto yc = y.contiguous();
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "residual_scatter_add_: float32 or bfloat16 only");
  scatter_add_rows(x, index.data_ptr<int64_t>(), yc, x, rows, D, K);
}


// ---- residual add + LayerNorm in one pass over each row -------------------------------------------
// out = x; out[:, write] += y (all channels when write is absent); ln = LayerNorm(out)[:, read]
// (all channels when read is absent), statistics over the full row in fp32. What a block does when
// its branch output goes back into the residual stream and the next op is the next branch's norm:
// the row is read once from memory instead of twice (add, then norm).

// o = x + y over the row, returning the row's sum (o may be x: in place).
__attribute__((target_clones("avx512f", "avx2", "default")))
float add_row_sum(float* o, const float* x, const float* y, int64_t D) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) {
    const float v = x[d] + y[d];
    o[d] = v;
    sum += v;
  }
  return sum;
}


struct AddNormArgs {
  const int64_t* widx;  // channels the branch writes (nullptr: all D)
  int64_t Kw;           // y's width
  const int64_t* ridx;  // channels the next branch reads (nullptr: all D)
  int64_t Kr;           // ln's width
  const float* w;
  const float* b;
  float eps;
};

// fp32 row: out row = x row + y (scattered), then the norm of the updated row.
void add_norm_row_f32(const float* xr, const float* yr, float* orow, float* lrow, int64_t D, const AddNormArgs& a) {
  float sum;
  if (a.widx == nullptr) {
    sum = add_row_sum(orow, xr, yr, D);
  } else {
    if (orow != xr) std::memcpy(orow, xr, sizeof(float) * D);
    scatter_add_row(orow, a.widx, yr, a.Kw);
    sum = row_sum(orow, D);
  }
  norm_row(orow, D, sum, a.ridx, a.w, a.b, a.Kr, a.eps, lrow);
}

// bf16 full-width add in one loop: o = round_bf16(x + y) stored as bf16 (orow) and as its exact fp32
// value (obuf, what the norm reads); returns the row's sum. Rounding as in `narrow`.
__attribute__((target_clones("avx512f", "avx2", "default")))
float add_round_bf16_row(const c10::BFloat16* xr, const c10::BFloat16* yr, float* obuf, c10::BFloat16* orow,
                         int64_t D) {
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xr);
  const uint16_t* ys = reinterpret_cast<const uint16_t*>(yr);
  uint16_t* os = reinterpret_cast<uint16_t*>(orow);
  uint32_t* ob = reinterpret_cast<uint32_t*>(obuf);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) {
    const uint32_t xu = static_cast<uint32_t>(xs[d]) << 16, yu = static_cast<uint32_t>(ys[d]) << 16;
    float xf, yf;
    std::memcpy(&xf, &xu, 4);
    std::memcpy(&yf, &yu, 4);
    const float v = xf + yf;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t h = (u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : rounded;
    os[d] = static_cast<uint16_t>(h);
    const uint32_t back = (h & 0xFFFFu) << 16;
    ob[d] = back;
    float bf;
    std::memcpy(&bf, &back, 4);
    sum += bf;
  }
  return sum;
}

// bf16 row: widened to fp32, added, rounded to bf16 (the residual stream's values), normed from those.
void add_norm_row_bf16(const c10::BFloat16* xr, const c10::BFloat16* yr, c10::BFloat16* orow, c10::BFloat16* lrow,
                       int64_t D, const AddNormArgs& a, float* obuf, float* ybuf, float* lbuf) {
  float sum;
  if (a.widx == nullptr) {
    sum = add_round_bf16_row(xr, yr, obuf, orow, D);
  } else {
    widen(xr, D, obuf);
    widen(yr, a.Kw, ybuf);
    scatter_add_row(obuf, a.widx, ybuf, a.Kw);
    narrow(obuf, D, orow);
    widen(orow, D, obuf);  // the norm sees the rounded residual, as the unfused add-then-norm does
    sum = row_sum(obuf, D);
  }
  norm_row(obuf, D, sum, a.ridx, a.w, a.b, a.Kr, a.eps, lbuf);
  narrow(lbuf, a.Kr, lrow);
}

#if defined(__x86_64__)
// AVX-512 bf16 row for the common case (full-width write and read: a plain pre-norm block). The
// generic row above runs the same math through target_clones loops that GCC vectorises at 256 bits
// with a blend-heavy rounding, which left the fused kernel no faster than ATen's bf16 add + norm;
// here each 16-channel step is a handful of 512-bit integer/float ops. Same results as the generic
// row up to the order of the fp32 sums (the residual itself is bit-identical: one rounding of x + y).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive on _mm512_undefined_*
#pragma GCC diagnostic ignored "-Wuninitialized"  // same, through _mm512_reduce_add_ps
#define SPV_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

SPV_AVX512_TARGET static inline __m512 widen16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The rows `ahead` rows on into the cache: inside a model x and y come from memory (the branch in
// between evicted the residual stream), and a row's three passes leave the loads of the next row
// too far apart for the hardware prefetcher (measured in DeiT-S bf16: the fused kernel took 1.5x the
// time of ATen's streaming add + norm without this).
SPV_AVX512_TARGET static inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  _mm_prefetch(p + bytes - 1, _MM_HINT_T0);
}

// fp32 -> bf16 bits, round to nearest even, NaN kept a quiet NaN (as `narrow`), in 32-bit lanes.
SPV_AVX512_TARGET static inline __m512i round_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
}

SPV_AVX512_TARGET static inline __mmask16 lanes_left(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
}

// R rows' four accumulators each, zeroed; and one row's four summed (the chains' two-level tree).
template <int R>
SPV_AVX512_TARGET static inline void zero_chains(__m512 (&acc)[R][4]) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
}

SPV_AVX512_TARGET static inline __m512 sum_chains(const __m512 (&acc)[4]) {
  return _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
}

// 1 / sqrt(var + eps) of the D floats at each of the R rows r[i], broadcast; two-pass variance around
// mv[i] (as norm_row), four independent chains a row (one chain of D / 16 dependent FMAs was the row's
// critical path); R rows at once so that one row's reductions overlap the other's.
template <int R>
SPV_AVX512_TARGET static inline void rows_rstd(const float* const* r, int64_t D, const __m512* mv, float eps,
                                               __m512* rstd) {
  __m512 sq[R][4];
  zero_chains<R>(sq);
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(r[i] + d + 16 * j), mv[i]);
        sq[i][j] = _mm512_fmadd_ps(c, c, sq[i][j]);
      }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = lanes_left(D - d);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 c = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, r[i] + d), mv[i]);
      sq[i][0] = _mm512_fmadd_ps(c, c, sq[i][0]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const float var = _mm512_reduce_add_ps(sum_chains(sq[i])) / static_cast<float>(D);
    rstd[i] = _mm512_set1_ps(1.f / std::sqrt(var + eps));
  }
}

// (r - mean) * rstd * w + b for the 16 channels at d (lanes m).
SPV_AVX512_TARGET static inline __m512 norm16(const float* r, __mmask16 m, __m512 mv, __m512 rstd,
                                              const AddNormArgs& a, int64_t d) {
  const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, r), mv), rstd);
  return _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, a.w + d), _mm512_maskz_loadu_ps(m, a.b + d));
}

// R consecutive rows: orow = bf16(x + y); lrow = bf16(LayerNorm(orow)) over all D channels, the
// norm over the rounded residual kept in fp32 in obuf (R rows of Dp = D rounded up to 16 floats,
// 64-byte aligned). Four sum chains a row and R rows at once, as the fp32 rows below: one row at a
// time with one chain was latency-bound (1576 x 384 at 2 threads: 0.148 ms against fp32's 0.08).
template <int R>
SPV_AVX512_TARGET static void add_norm_rows_bf16(const c10::BFloat16* xr, const c10::BFloat16* yr,
                                                 c10::BFloat16* orow, c10::BFloat16* lrow, int64_t D,
                                                 const AddNormArgs& a, float* obuf, int64_t ahead) {
  if (ahead > 0) {
    prefetch_row(xr + ahead * D, R * D * 2);
    prefetch_row(yr + ahead * D, R * D * 2);
  }
  const int64_t Dp = (D + 15) / 16 * 16;
  __m512 acc[R][4];
  zero_chains<R>(acc);
  for (int64_t d = 0; d < D; d += 64) {  // add, round (the stored residual), keep its fp32 value
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t c = d + 16 * j;
        if (c >= D) break;
        const __mmask16 m = lanes_left(D - c);
        const int64_t k = i * D + c;
        const __m512i r = round_bf16_bits(_mm512_add_ps(widen16(xr + k, m), widen16(yr + k, m)));
        _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(orow + k), m, _mm512_cvtepi32_epi16(r));
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));  // zero past D (inputs were)
        _mm512_store_ps(obuf + i * Dp + c, v);
        acc[i][j] = _mm512_add_ps(acc[i][j], v);
      }
  }
  __m512 mv[R], rstd[R];
  const float* rows[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    mv[i] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_chains(acc[i])) / static_cast<float>(D));
    rows[i] = obuf + i * Dp;
  }
  rows_rstd<R>(rows, D, mv, a.eps, rstd);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = lanes_left(D - d);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(lrow + i * D + d), m,
                               _mm512_cvtepi32_epi16(round_bf16_bits(norm16(rows[i] + d, m, mv[i], rstd[i], a, d))));
  }
}

// Rows [r0, r1) of the bf16 full-width case, two at a time; obuf holds two rows (see above).
SPV_AVX512_TARGET void add_norm_rows_bf16_full_avx512(const c10::BFloat16* x, const c10::BFloat16* y,
                                                      c10::BFloat16* out, c10::BFloat16* ln, int64_t r0, int64_t r1,
                                                      int64_t D, const AddNormArgs& a, float* obuf) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2)
    add_norm_rows_bf16<2>(x + r * D, y + r * D, out + r * D, ln + r * D, D, a, obuf,
                          std::min<int64_t>(4, r1 - 2 - r));
  if (r < r1) add_norm_rows_bf16<1>(x + r * D, y + r * D, out + r * D, ln + r * D, D, a, obuf, 0);
}

// fp32 full-width rows: o = x + y (o may be x), ln = LayerNorm(o), R consecutive rows at once (their
// dependent chains interleave: sums, the two reductions, the square root). The generic row's sum and
// variance loops are single dependent chains of adds (GCC keeps one accumulator without -ffast-math):
// 1576 x 384 at 2 threads took ~0.12 ms where the memory traffic takes ~0.03.
template <int R>
SPV_AVX512_TARGET static void add_norm_rows_f32(const float* xr, const float* yr, float* orow, float* lrow,
                                                int64_t D, const AddNormArgs& a, int64_t ahead) {
  if (ahead > 0) {
    prefetch_row(xr + ahead * D, R * D * 4);
    prefetch_row(yr + ahead * D, R * D * 4);
  }
  __m512 acc[R][4];
  zero_chains<R>(acc);
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t k = i * D + d + 16 * j;
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(yr + k));
        _mm512_storeu_ps(orow + k, v);
        acc[i][j] = _mm512_add_ps(acc[i][j], v);
      }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = lanes_left(D - d);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t k = i * D + d;
      const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, xr + k), _mm512_maskz_loadu_ps(m, yr + k));
      _mm512_mask_storeu_ps(orow + k, m, v);
      acc[i][0] = _mm512_add_ps(acc[i][0], v);
    }
  }
  __m512 mv[R], rstd[R];
  const float* rows[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    mv[i] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_chains(acc[i])) / static_cast<float>(D));
    rows[i] = orow + i * D;
  }
  rows_rstd<R>(rows, D, mv, a.eps, rstd);
  for (d = 0; d < D; d += 16) {
    const __mmask16 m = lanes_left(D - d);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      _mm512_mask_storeu_ps(lrow + i * D + d, m, norm16(orow + i * D + d, m, mv[i], rstd[i], a, d));
  }
}

// Rows [r0, r1) of the fp32 full-width case, two at a time.
SPV_AVX512_TARGET void add_norm_rows_f32_full_avx512(const float* x, const float* y, float* out, float* ln, int64_t r0,
                                                     int64_t r1, int64_t D, const AddNormArgs& a) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2)
    add_norm_rows_f32<2>(x + r * D, y + r * D, out + r * D, ln + r * D, D, a, std::min<int64_t>(4, r1 - 2 - r));
  if (r < r1) add_norm_rows_f32<1>(x + r * D, y + r * D, out + r * D, ln + r * D, D, a, 0);
}

bool cpu_has_avx512bw_vl() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
#else
bool cpu_has_avx512bw_vl() { return false; }
void add_norm_rows_bf16_full_avx512(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, c10::BFloat16*,
                                    int64_t, int64_t, int64_t, const AddNormArgs&, float*) {}
void add_norm_rows_f32_full_avx512(const float*, const float*, float*, float*, int64_t, int64_t, int64_t,
                                   const AddNormArgs&) {}
#endif

void add_norm_rows(const at::Tensor& x, const at::Tensor& y, at::Tensor& out, at::Tensor& ln, int64_t rows,
                   int64_t D, const AddNormArgs& a) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool full_fast = a.widx == nullptr && a.ridx == nullptr && cpu_has_avx512bw_vl();
  const bool bf16_fast = bf16 && full_fast, f32_fast = !bf16 && full_fast;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    if (f32_fast) {
      add_norm_rows_f32_full_avx512(x.data_ptr<float>(), y.data_ptr<float>(), out.data_ptr<float>(),
                                    ln.data_ptr<float>(), r0, r1, D, a);
      return;
    }
    // obuf: the fp32 residual rows (two for the AVX-512 rows), whole 16-float vectors, 64-byte aligned
    const int64_t Dp = (D + 15) / 16 * 16;
    std::vector<float> obuf(bf16 ? 2 * Dp + 16 : 0), ybuf(bf16 ? a.Kw : 0), lbuf(bf16 ? a.Kr : 0);
    float* oaligned = obuf.data() + (bf16 ? (16 - (reinterpret_cast<uintptr_t>(obuf.data()) / 4) % 16) % 16 : 0);
    if (bf16_fast) {
      add_norm_rows_bf16_full_avx512(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                                     out.data_ptr<c10::BFloat16>(), ln.data_ptr<c10::BFloat16>(), r0, r1, D, a,
                                     oaligned);
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (bf16) {
        add_norm_row_bf16(x.data_ptr<c10::BFloat16>() + r * D, y.data_ptr<c10::BFloat16>() + r * a.Kw,
                          out.data_ptr<c10::BFloat16>() + r * D, ln.data_ptr<c10::BFloat16>() + r * a.Kr, D, a,
                          oaligned, ybuf.data(), lbuf.data());
      } else {
        add_norm_row_f32(x.data_ptr<float>() + r * D, y.data_ptr<float>() + r * a.Kw, out.data_ptr<float>() + r * D,
                         ln.data_ptr<float>() + r * a.Kr, D, a);
      }
    }
  });
}

// The K fp32 values of a norm's weight or bias: the tensor itself when it is contiguous fp32 (kept
// alive in `keep`), else converted into `buf` (`fill` everywhere when absent).
const float* norm_param_f32(const c10::optional<at::Tensor>& t, float fill, int64_t K, at::Tensor& keep, float* buf) {
  if (t.has_value() && t->scalar_type() == at::kFloat) {
    keep = t->contiguous();
    return keep.data_ptr<float>();
  }
  if (!t.has_value()) {
    std::fill(buf, buf + K, fill);
  } else if (t->scalar_type() == at::kBFloat16 && t->is_contiguous()) {
    const c10::BFloat16* p = t->data_ptr<c10::BFloat16>();
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(p[k]);
  } else {
    keep = t->to(at::kFloat).contiguous();
    return keep.data_ptr<float>();
  }
  return buf;
}

// Checks shared by both variants; returns ln (allocated) and fills `a` (w/b kept alive by the caller).
at::Tensor add_norm_prepare(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& write,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& read, double eps, at::Tensor& w, at::Tensor& b,
                            AddNormArgs& a) {
  const char* op = "residual_add_layernorm";
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x and y dtypes differ (", x.scalar_type(), " vs ",
              y.scalar_type(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 only, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, ": x and y must be contiguous");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D > 0, op, ": empty last dim");
  a.widx = nullptr, a.Kw = D, a.ridx = nullptr, a.Kr = D;
  if (write.has_value()) {
    check_index(*write, D, op);
    a.widx = write->data_ptr<int64_t>(), a.Kw = write->numel();
  }
  if (read.has_value()) {
    check_index(*read, D, op);
    a.ridx = read->data_ptr<int64_t>(), a.Kr = read->numel();
  }
  TORCH_CHECK(y.size(-1) == a.Kw && y.numel() / std::max<int64_t>(a.Kw, 1) == x.numel() / D, op,
              ": y ", y.sizes(), " does not match x ", x.sizes(), " and the write index");
  for (const auto* t : {&weight, &bias}) {
    TORCH_CHECK(!t->has_value() || (*t)->numel() == a.Kr, op, ": weight and bias must have one entry per read channel");
    TORCH_CHECK(!t->has_value() || (*t)->device().is_cpu(), op, ": weight and bias must be on the CPU");
  }
  // The kernels read fp32 weight and bias. Others are converted into a per-thread buffer, not a new
  // tensor: two allocations a call were ~8 us of each bf16 call (23 calls a DeiT-S forward).
  static thread_local std::vector<float> wb;
  wb.resize(2 * a.Kr);
  a.w = norm_param_f32(weight, 1.f, a.Kr, w, wb.data());
  a.b = norm_param_f32(bias, 0.f, a.Kr, b, wb.data() + a.Kr);
  a.eps = static_cast<float>(eps);
  auto sizes = x.sizes().vec();
  sizes.back() = a.Kr;
  return at::empty(sizes, x.options());
}

std::tuple<at::Tensor, at::Tensor> residual_add_layernorm(const at::Tensor& x, const at::Tensor& y,
                                                         const c10::optional<at::Tensor>& write,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const c10::optional<at::Tensor>& read, double eps) {
  auto xc = x.contiguous(), yc = y.contiguous();
  at::Tensor w, b;
  AddNormArgs a;
  auto ln = add_norm_prepare(xc, yc, write, weight, bias, read, eps, w, b, a);
  auto out = at::empty_like(xc);
  add_norm_rows(xc, yc, out, ln, xc.numel() / xc.size(-1), xc.size(-1), a);
  return {out, ln};
}

at::Tensor residual_add_layernorm_(at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& write,
                                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& read, double eps) {
  TORCH_CHECK(x.is_contiguous(), "residual_add_layernorm_: x must be contiguous to be updated in place");
  auto yc = y.contiguous();
  at::Tensor w, b;
  AddNormArgs a;
  auto ln = add_norm_prepare(x, yc, write, weight, bias, read, eps, w, b, a);
  add_norm_rows(x, yc, x, ln, x.numel() / x.size(-1), x.size(-1), a);
  return ln;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsevit_C, m) {
  m.def("layernorm_gather(Tensor x, Tensor? weight, Tensor? bias, Tensor index, float eps) -> Tensor");
  m.def("residual_scatter_add(Tensor x, Tensor index, Tensor y) -> Tensor");
  m.def("residual_scatter_add_(Tensor(a!) x, Tensor index, Tensor y) -> ()");
  m.def("residual_add_layernorm(Tensor x, Tensor y, Tensor? write, Tensor? weight, Tensor? bias, Tensor? read, "
        "float eps) -> (Tensor, Tensor)");
  m.def("residual_add_layernorm_(Tensor(a!) x, Tensor y, Tensor? write, Tensor? weight, Tensor? bias, Tensor? read, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsevit_C, CPU, m) {
  m.impl("layernorm_gather", &layernorm_gather);
  m.impl("residual_scatter_add", &residual_scatter_add);
  m.impl("residual_scatter_add_", &residual_scatter_add_);
  m.impl("residual_add_layernorm", &residual_add_layernorm);
  m.impl("residual_add_layernorm_", &residual_add_layernorm_);
}
