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
static inline vi vori(vi a, vi b) { return _mm512_or_si512(a, b); }
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
static inline vi vori(vi a, vi b) { return _mm256_or_si256(a, b); }
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

// 2^t for t <= 0 (the softmax's shifted scores, GELU's Gaussian), NaN kept; exactly 0 for t = -inf
// (masked keys). 2^t = 2^floor(t) * 2^f with f = t - floor(t) in [0, 1): a minimax polynomial of 2^f
// (relative-error fits; degree 6: about 1 ulp, for GELU; degree 5: about 1.5-2 ulp; degree 3: 1e-4,
// below bf16's rounding). On AVX-512 vreduceps gives f and vscalefps applies 2^floor(t) straight
// from t, one op each, and need no clamp: vreduceps gives 0 for -inf and for large |t| (already
// integers), and vscalefps of a finite p by -inf or by t < -150 is 0 (tests/test_cpu_attention.py's
// far-below-the-max case checks it on every ISA level).
template <int DEG>
static inline vf vexp2(vf t) {
#if SPV_AVX512
  const vf f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  t = vmax(vset1(-127.f), t);  // floor(t) = -127 gives a zero exponent field below: 0
  const vf n = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), f = vsub(t, n);
#endif
  vf p;
  if (DEG >= 6) {
    p = vfma(vset1(2.161263e-4f), f, vset1(1.2467921e-3f));
    p = vfma(p, f, vset1(9.675444e-3f));
    p = vfma(p, f, vset1(5.5485282e-2f));
    p = vfma(p, f, vset1(2.4022931e-1f));
    p = vfma(p, f, vset1(6.9314706e-1f));
  } else if (DEG >= 5) {
    p = vfma(vset1(1.867130515165627e-3f), f, vset1(9.017028845846653e-3f));
    p = vfma(p, f, vset1(5.579991266131401e-2f));
    p = vfma(p, f, vset1(2.4016444385051727e-1f));
    p = vfma(p, f, vset1(6.931512951850891e-1f));
  } else {
    p = vfma(vset1(7.7067069709301e-2f), f, vset1(2.2764495015144348e-1f));
    p = vfma(p, f, vset1(6.951168179512024e-1f));
  }
  p = vfma(p, f, vset1(1.0f));
#if SPV_AVX512
  return _mm512_scalef_ps(p, t);  // p * 2^floor(t)
#else
  return vmul(p, vcasti(vslli23(vaddi(vcvti(n), vset1i(127)))));
#endif
}

// 1 / d for finite d >= 1: the approximate reciprocal refined by Newton steps, a few cycles where a
// division occupies the divider for many (the GELU epilogue of an MLP Linear is otherwise a visible
// share of the layer). One step takes rcp14's 2^-14 to ~2^-24; AVX2's rcp (1.5 * 2^-12) needs two,
// or erf's error near 0 grows by a tenth.
static inline vf vrecip_ge1(vf d) {
  vf r = vrcp_approx(d);
  const vf neg_d = vsub(vzero(), d);
  r = vfma(r, vfma(neg_d, r, vset1(1.0f)), r);
#if !SPV_AVX512
  r = vfma(r, vfma(neg_d, r, vset1(1.0f)), r);
#endif
  return r;
}

static inline vi vsign_bits(vf x) { return vandi(vcastf(x), vset1i((int32_t)0x80000000u)); }
static inline vf vxor_sign(vf x, vi sign) { return vcasti(vxori(vcastf(x), sign)); }

// 0.5 v (1 + s) for s in [-1, 1] (erf or tanh, carrying v's sign) as one fused op, h + h s: one
// rounding where add-then-multiply has two. GELU(v) = v Phi(v) has v's sign, so v's sign bit is
// set on the result: h + h (-1) is +0 where the negative tail must be -0 (as v * 0 is).
static inline vf vhalf_x_one_plus(vf v, vi sign, vf s) {
  const vf h = vmul(v, vset1(0.5f));
  return vcasti(vori(vcastf(vfma(h, s, h)), sign));
}

// GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 (the formula ATen's
// and oneDNN's vectorised GELUs use; a rational x P(x^2) / Q(x^2) without the Gaussian costs fewer
// ops but, evaluated in fp32, leaves ~1.5e-7 absolute error on Phi near 0.5 and so 2-3x this form's
// error on the negative tail x Phi(x); see bench/gelu_accuracy.py). The 1/sqrt 2 is folded into the
// constants (a = |x|, not |x|/sqrt 2), exp(-a^2/2) is 2^(-a^2 log2(e)/2) by vexp2 (reduce + scalef
// on AVX-512), 1 - r e and the final 0.5 x (1 + erf) are one fused op each.
static inline vf vgelu_erf(vf v) {
  const vi sign = vsign_bits(v);
  // |x| clamped to 4 sqrt 2 (erf(4) rounds to 1.0f, as does the formula): no denormal reaches the
  // product below and the negative tail is exactly -0; min keeps a NaN (its second operand).
  const vf a = vmin(vset1(5.65685424949238f), vxor_sign(v, sign));
  const vf t = vrecip_ge1(vfma(vset1(0.3275911f * 0.70710678118654752f), a, vset1(1.0f)));
  vf r = vset1(1.061405429f);
  r = vfma(r, t, vset1(-1.453152027f));
  r = vfma(r, t, vset1(1.421413741f));
  r = vfma(r, t, vset1(-0.284496736f));
  r = vfma(r, t, vset1(0.254829592f));
  r = vmul(r, t);
  const vf gauss = vexp2<6>(vmul(a, vmul(a, vset1(-0.72134752044448170f))));  // -log2(e) / 2
  const vf erf_abs = vfma(vsub(vzero(), r), gauss, vset1(1.0f));
  return vhalf_x_one_plus(v, sign, vxor_sign(erf_abs, sign));
}

// GELU, tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). tanh on |u| as
// 1 - 2 e / (1 + e) with e = exp(-2|u|) = 2^(-2 log2(e) |u|) in (0, 1]. |u| is clamped to 10
// (tanh(10) rounds to 1.0f, and so does 1 - 2e/(1+e) there): e stays above 2e-9, away from the
// underflow and denormal results that made the unclamped form's epilogue ~1.5x slower on a DeiT-S
// fc1 (bench/gelu_epilogue.py, large pre-activations); the saturated tails
// are exactly +-1 and GELU's negative tail exactly -0; min keeps a NaN (its second operand).
static inline vf vgelu_tanh(vf v) {
  const vf u = vmul(vset1(0.79788456080286536f), vfma(vset1(0.044715f), vmul(vmul(v, v), v), v));
  const vi sign = vsign_bits(u);
  const vf a = vmin(vset1(10.0f), vxor_sign(u, sign));
  const vf e = vexp2<6>(vmul(a, vset1(-2.8853900817779268f)));  // -2 log2(e)
  const vf th = vfma(vmul(vset1(-2.0f), e), vrecip_ge1(vadd(e, vset1(1.0f))), vset1(1.0f));
  return vhalf_x_one_plus(v, sign, vxor_sign(th, sign));  // u has v's sign
}

// act: 0 identity, 1 GELU (erf form, nn.GELU()), 2 GELU (tanh form).
static inline vf vact(vf v, int act) {
  if (act == 1) return vgelu_erf(v);
  if (act == 2) return vgelu_tanh(v);
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
