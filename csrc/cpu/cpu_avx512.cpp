// AVX-512 kernels: 16 fp32 lanes. Compiled for the avx512f target whatever the build's baseline
// (the binding selects them only where the CPU and the OS support AVX-512, see cpu_ops.cpp).
//
// Every standard header comes before the target switch, so that no inline library function is
// emitted here with AVX-512 instructions (the linker could pick that copy for the whole library);
// the kernels themselves live in an anonymous namespace, one private copy per instruction set.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12 reports its own _mm512_undefined_ps() (inside _mm512_shuffle_f32x4) as uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace linearpatch_cpu {
namespace {

struct Vec {
  static constexpr int W = 16;
  using T = __m512;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }

  // Lane stages 8, 4, 2, 1: lane i gets v[i] + v[i ^ s] where bit s of i is 0, v[i ^ s] - v[i]
  // where it is 1, i.e. v * (+1 | -1) + swapped(v): one permute and one fma per stage.
  static T inner(T v) {
    const T s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    const T s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const T s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const T s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    v = _mm512_fmadd_ps(v, s8, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_fmadd_ps(v, s4, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm512_fmadd_ps(v, s2, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_fmadd_ps(v, s1, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return v;
  }

  // bf16 is the upper half of an fp32: widen and shift. Back: round to nearest even on the 16
  // dropped bits (add 0x7fff plus the kept lsb), NaN as the canonical 0x7fc0 (as torch does).
  static T load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, T v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static T load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, T v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

#include "cpu_kernels_impl.h"

void rows_avx512(const RowArgs& a, int64_t begin, int64_t end) { rows_any(a, begin, end); }

}  // namespace
}  // namespace linearpatch_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace linearpatch_cpu {
const IsaKernels* avx512_kernels() {
  static const IsaKernels kernels{"avx512", 16, &rows_avx512};
  return &kernels;
}
}  // namespace linearpatch_cpu

#else  // not x86-64

namespace linearpatch_cpu {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace linearpatch_cpu

#endif
