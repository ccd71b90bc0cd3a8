// Vector wrappers and fp32 math (exp, erf, tanh, GELU, 32-bit transposes) shared by the CPU kernels:
// fine-grained sparse linear, block-sparse linear (bsr_kernel_impl.h) and attention.
//
// Included *inside* an ISA-specific anonymous namespace, after <immintrin.h>, <stdint.h> and
// <string.h>, by a file compiled under `#pragma GCC target(...)` that defines
//   SPV_AVX512       1: 16-wide zmm, 0: 8-wide ymm (AVX2 + FMA).
// It has no include guard on purpose (one copy per ISA namespace) and no includes of its own.

#if SPV_AVX512
typedef __m512 vf;
typedef __m512i vi;
enum { W = 16 };
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vi vloadi(const void* p) { return _mm512_loadu_si512(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vstorei(void* p, vi v) { _mm512_storeu_si512(p, v); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vi vset1i(int32_t a) { return _mm512_set1_epi32(a); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vrcp_approx(vf a) { return _mm512_rcp14_ps(a); }  // 2^-14 relative
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi vcvti(vf a) { return _mm512_cvtps_epi32(a); }
static inline vf vcasti(vi a) { return _mm512_castsi512_ps(a); }
static inline vi vcastf(vf a) { return _mm512_castps_si512(a); }
static inline vi vaddi(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vslli16(vi a) { return _mm512_slli_epi32(a, 16); }
static inline vi vslli23(vi a) { return _mm512_slli_epi32(a, 23); }
static inline vi vandi(vi a, vi b) { return _mm512_and_si512(a, b); }
static inline vi vxori(vi a, vi b) { return _mm512_xor_si512(a, b); }
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
#else
typedef __m256 vf;
typedef __m256i vi;
enum { W = 8 };
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vi vloadi(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vstorei(void* p, vi v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vi vset1i(int32_t a) { return _mm256_set1_epi32(a); }
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vrcp_approx(vf a) { return _mm256_rcp_ps(a); }  // 1.5 * 2^-12 relative
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi vcvti(vf a) { return _mm256_cvtps_epi32(a); }
static inline vf vcasti(vi a) { return _mm256_castsi256_ps(a); }
static inline vi vcastf(vf a) { return _mm256_castps_si256(a); }
static inline vi vaddi(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi vslli16(vi a) { return _mm256_slli_epi32(a, 16); }
static inline vi vslli23(vi a) { return _mm256_slli_epi32(a, 23); }
static inline vi vandi(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi vxori(vi a, vi b) { return _mm256_xor_si256(a, b); }
static inline float vhsum(vf a) {
  float t[W];
  vstore(t, a);
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += t[i];
  return s;
}
static inline float vhmax(vf a) {
  float t[W];
  vstore(t, a);
  float m = t[0];
  for (int i = 1; i < W; ++i) m = t[i] > m ? t[i] : m;
  return m;
}
#endif

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// exp(x) with a degree-6 polynomial after range reduction by ln 2 (about 1 ulp; NaN stays NaN
// because min/max return the second operand, x, when it is NaN).
static inline vf vexp(vf x) {
  x = vmin(vset1(88.3f), vmax(vset1(-87.0f), x));
  vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf q = vset1(1.9875691500e-4f);
  q = vfma(q, r, vset1(1.3981999507e-3f));
  q = vfma(q, r, vset1(8.3334519073e-3f));
  q = vfma(q, r, vset1(4.1665795894e-2f));
  q = vfma(q, r, vset1(1.6666665459e-1f));
  q = vfma(q, r, vset1(5.0000001201e-1f));
  q = vfma(q, vmul(r, r), vadd(r, vset1(1.0f)));
  vi e = vslli23(vaddi(vcvti(n), vset1i(127)));
  return vmul(q, vcasti(e));
}

// 1 / d for finite d >= 1: the approximate reciprocal refined by one Newton step (relative error
// ~2^-24 from rcp14, ~2^-22 from AVX2's rcp), a few cycles where a division occupies the divider
// for many (the GELU epilogue of an MLP Linear is otherwise a visible share of the layer).
static inline vf vrecip_ge1(vf d) {
  vf r = vrcp_approx(d);
  return vfma(r, vfma(vsub(vzero(), d), r, vset1(1.0f)), r);
}

static inline vf verf(vf x) {  // Abramowitz-Stegun 7.1.26 (the formula ATen's vectorised erf uses)
  vi sign = vandi(vcastf(x), vset1i((int32_t)0x80000000u));
  // |x| clamped to 4 (erf(4) rounds to 1.0f, as does the formula): no infinity reaches the
  // reciprocal and no denormal the product below; min keeps a NaN (its second operand).
  vf a = vmin(vset1(4.0f), vcasti(vxori(vcastf(x), sign)));
  vf t = vrecip_ge1(vfma(vset1(0.3275911f), a, vset1(1.0f)));
  vf r = vset1(1.061405429f);
  r = vfma(r, t, vset1(-1.453152027f));
  r = vfma(r, t, vset1(1.421413741f));
  r = vfma(r, t, vset1(-0.284496736f));
  r = vfma(r, t, vset1(0.254829592f));
  r = vmul(r, t);
  vf y = vsub(vset1(1.0f), vmul(r, vexp(vsub(vzero(), vmul(a, a)))));
  return vcasti(vxori(vcastf(y), sign));
}

static inline vf vtanh(vf u) {  // sign(u) * (1 - 2 / (exp(2|u|) + 1))
  // On |u|, so that the saturated tails are exactly +-1 (the small term vanishes when subtracted
  // from 1, whatever the reciprocal's last bits) and GELU's negative tail exactly -0. |u| is clamped
  // to 10 (tanh(10) rounds to 1.0f; tanh(9) does not quite): exp stays below 4.9e8; min keeps a NaN.
  vi sign = vandi(vcastf(u), vset1i((int32_t)0x80000000u));
  vf a = vmin(vset1(10.0f), vcasti(vxori(vcastf(u), sign)));
  vf t = vsub(vset1(1.0f), vmul(vset1(2.0f), vrecip_ge1(vadd(vexp(vadd(a, a)), vset1(1.0f)))));
  return vcasti(vxori(vcastf(t), sign));
}

// act: 0 identity, 1 GELU (erf form, nn.GELU()), 2 GELU (tanh form).
static inline vf vact(vf v, int act) {
  if (act == 1) {
    vf e = verf(vmul(v, vset1(0.70710678118654752f)));
    return vmul(vmul(v, vset1(0.5f)), vadd(e, vset1(1.0f)));
  }
  if (act == 2) {
    vf v3 = vmul(vmul(v, v), v);
    vf u = vmul(vset1(0.79788456080286536f), vfma(vset1(0.044715f), v3, v));
    return vmul(vmul(v, vset1(0.5f)), vadd(vtanh(u), vset1(1.0f)));
  }
  return v;
}

#if SPV_AVX512
// In-register transpose of a 16x16 block of 32-bit words: r[i][j] -> r[j][i].
static inline void transpose16(vf r[16]) {
  vf t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + j]: rows 4k..4k+3 at column 4*lane + j
    u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    vf even_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), odd_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    vf even_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), odd_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(even_a, even_b, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xDD);
  }
}
#endif

// Stores n (<= W) fp32 lanes of v at y + off (fp32, or bf16 rounded to nearest even).
static inline void store_lanes(void* y, int64_t off, vf v, int n, int bf16) {
  if (!bf16) {
    float* dst = (float*)y + off;
    if (n == W) { vstore(dst, v); return; }
#if SPV_AVX512
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << n) - 1u), v);
#else
    float tmp[W];
    vstore(tmp, v);
    for (int l = 0; l < n; ++l) dst[l] = tmp[l];
#endif
    return;
  }
  uint16_t* dst = (uint16_t*)y + off;
#if SPV_AVX512 && SPV_NATIVE_BF16
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (n == W) _mm256_storeu_si256((__m256i*)dst, h);
  else _mm256_mask_storeu_epi16(dst, (__mmask16)((1u << n) - 1u), h);
#else
  float tmp[W];
  vstore(tmp, v);
  for (int l = 0; l < n; ++l) dst[l] = f32_to_bf16(tmp[l]);
#endif
}
