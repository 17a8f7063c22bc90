// Thin fp32 vector types for the CPU kernels, one struct per instruction set, same interface:
//   W                      lanes per vector
//   reg                    the register type
//   load(p), store(p, a)   unaligned W-float load / store
//   set1(x)                broadcast
//   fmadd(a, b, c)         a * b + c
//   max(a, b)              lane-wise max
//   any_gt(a, x)           true when some lane of a is > x (strict: ties never count)
//   hmax(a)                the largest lane of a (no NaN lanes)
//   eq_mask(a, x)          bit l set iff lane l of a == x
//
// Each struct lives inside a `#pragma GCC target` region, so its functions carry that ISA's target
// attribute and inline only into code compiled for the same target: the kernel passes of
// cpu/isa.h, which see the struct of their ISA as `V`. Nothing here runs unless isa::chosen()
// picked that ISA. Plain C++ `Portable` is the fallback on every architecture; it is written as
// W = 8 scalar loops so that the baseline compiler (SSE2 on x86-64, NEON on aarch64) can
// vectorise it.
//
// fexp(x): a scalar float exp written so that loops calling it auto-vectorise (entropy, linear
// cross-entropy and sampling call it in their kernel passes).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define FQGAN_X86 1
#include <immintrin.h>
#else
#define FQGAN_X86 0
#endif

namespace fqgan::cpu::simd {

// exp(x) for x <= ~88, ~2 ulp (Cephes expf polynomial), never subnormal: y * 2^n with y in
// [0.7, 1.42] is formed with n clamped to >= -125 (so the product is >= 0.7 * 2^-125, a normal
// float) and results for n < -125 (x below about -86.6) are then zeroed with an integer mask. A
// subnormal result, even one masked away afterwards, costs a microcode assist per element on Intel
// cores (see cpu/fpstate.h), and exp of very negative arguments is the common case in peaked
// softmaxes. Integer masking because float compares/clamps would keep GCC from vectorising loops
// that store (it will not if-convert them under the default -ftrapping-math). Callers pass
// x = a - max or a - lse <= ~0; x = -inf gives 0 (the out-of-range float -> int conversion yields
// INT_MIN on x86-64 and aarch64, which the mask drops).
__attribute__((always_inline)) inline float fexp(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  const int32_t keep = -static_cast<int32_t>(ni >= -125);
  ni = ni < -125 ? -125 : ni;
  const int32_t bits = (ni + 127) << 23;
  float scale, v;
  std::memcpy(&scale, &bits, sizeof(scale));
  v = y * scale;
  int32_t vb;
  std::memcpy(&vb, &v, sizeof(vb));
  vb &= keep;
  std::memcpy(&v, &vb, sizeof(v));
  return v;
}

struct Portable {
  static constexpr int W = 8;
  struct reg {
    float v[W];
  };
  static inline reg load(const float* p) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l];
    return r;
  }
  static inline void store(float* p, const reg& a) {
    for (int l = 0; l < W; ++l) p[l] = a.v[l];
  }
  static inline reg set1(float x) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = x;
    return r;
  }
  static inline reg fmadd(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static inline reg max(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l];
    return r;
  }
  static inline bool any_gt(const reg& a, float x) {
    bool any = false;
    for (int l = 0; l < W; ++l) any |= a.v[l] > x;
    return any;
  }
  static inline float hmax(const reg& a) {
    float m = a.v[0];
    for (int l = 1; l < W; ++l) m = a.v[l] > m ? a.v[l] : m;
    return m;
  }
  static inline uint32_t eq_mask(const reg& a, float x) {
    uint32_t bits = 0;
    for (int l = 0; l < W; ++l) bits |= static_cast<uint32_t>(a.v[l] == x) << l;
    return bits;
  }
};

#if FQGAN_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Avx2 {
  static constexpr int W = 8;
  using reg = __m256;
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline bool any_gt(reg a, float x) {
    // Ordered, non-signalling compare: NaN lanes never count as greater.
    return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(x), _CMP_GT_OQ)) != 0;
  }
  static inline float hmax(reg a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static inline uint32_t eq_mask(reg a, float x) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(x), _CMP_EQ_OQ)));
  }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
struct Avx512 {
  static constexpr int W = 16;
  using reg = __m512;
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  // The masked form: GCC 12's _mm512_max_ps trips -Wuninitialized on its own _mm512_undefined_ps().
  static inline reg max(reg a, reg b) { return _mm512_mask_max_ps(a, static_cast<__mmask16>(0xFFFF), a, b); }
  static inline bool any_gt(reg a, float x) {
    return _mm512_cmp_ps_mask(a, _mm512_set1_ps(x), _CMP_GT_OQ) != 0;
  }
  // Zero-masked extracts: GCC 12's _mm512_reduce_max_ps and even _mm512_castps512_ps256 trip
  // -Wmaybe-uninitialized on their own _mm256_undefined_pd().
  static inline float hmax(reg a) {
    const __m256 h = _mm256_max_ps(_mm512_maskz_extractf32x8_ps(0xFF, a, 0), _mm512_maskz_extractf32x8_ps(0xFF, a, 1));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static inline uint32_t eq_mask(reg a, float x) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(a, _mm512_set1_ps(x), _CMP_EQ_OQ));
  }
};
#pragma GCC pop_options

#endif  // FQGAN_X86

}  // namespace fqgan::cpu::simd
