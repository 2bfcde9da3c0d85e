// AVX2 + FMA + F16C kernels: 8 fp32 lanes (see cpu_avx512.cpp for how the target is switched on).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace linearpatch_cpu {
namespace {

struct Vec {
  static constexpr int W = 8;
  using T = __m256;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T zero() { return _mm256_setzero_ps(); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Lane stages 4, 2, 1 (as in cpu_avx512.cpp).
  static T inner(T v) {
    const T s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    const T s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const T s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
    v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return v;
  }
  static T load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, T v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // Values fit 16 bits, so the unsigned-saturating pack keeps them; it works per 128-bit half.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static T load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store_f16(uint16_t* p, T v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

#include "cpu_kernels_impl.h"

void rows_avx2(const RowArgs& a, int64_t begin, int64_t end) { rows_any(a, begin, end); }

}  // namespace
}  // namespace linearpatch_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace linearpatch_cpu {
const IsaKernels* avx2_kernels() {
  static const IsaKernels kernels{"avx2", 8, &rows_avx2};
  return &kernels;
}
}  // namespace linearpatch_cpu

#else  // not x86-64

namespace linearpatch_cpu {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace linearpatch_cpu

#endif
