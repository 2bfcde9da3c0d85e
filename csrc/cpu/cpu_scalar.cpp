// Portable kernels, one fp32 lane: every CPU, and every row too short for a vector (N = d / K
// below the vector width, e.g. d = 12 or 24). Compiled for the build's baseline.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

#include "cpu_kernels.h"

namespace linearpatch_cpu {
namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 <-> binary32, round to nearest even (what the vector conversions do).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: mant * 2**-24, exact in fp32
    const float v = float(mant) * 5.9604644775390625e-8f;
    return float_of(bits_of(v) | sign);
  }
  if (exp == 31) return float_of(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t x = bits_of(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (x >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to infinity
  const uint32_t exp = x >> 23;
  if (exp < 113) {  // below 2**-14: a subnormal half, q = |f| / 2**-24 rounded to nearest even
    const uint32_t mant = (x & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - exp;  // |f| = mant * 2**(exp - 150)
    if (exp == 0 || shift > 24) return sign;
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return sign | uint16_t(q);
  }
  uint32_t q = ((exp - 112) << 10) | ((x >> 13) & 0x3ff);
  const uint32_t rem = x & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) ++q;  // a carry moves into the exponent, as it should
  return sign | uint16_t(q);
}

inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t b = bits_of(f);
  return uint16_t((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

struct Vec {
  static constexpr int W = 1;
  using T = float;
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set1(float f) { return f; }
  static T zero() { return 0.f; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static float hsum(T v) { return v; }
  static T inner(T v) { return v; }
  static T load_bf16(const uint16_t* p) { return float_of(uint32_t(*p) << 16); }
  static void store_bf16(uint16_t* p, T v) { *p = float_to_bf16(v); }
  static T load_f16(const uint16_t* p) { return half_to_float(*p); }
  static void store_f16(uint16_t* p, T v) { *p = float_to_half(v); }
};

#include "cpu_kernels_impl.h"

void rows_scalar(const RowArgs& a, int64_t begin, int64_t end) { rows_any(a, begin, end); }

}  // namespace

const IsaKernels* scalar_kernels() {
  static const IsaKernels kernels{"scalar", 1, &rows_scalar};
  return &kernels;
}
}  // namespace linearpatch_cpu
