// NEON kernels for 64-bit ARM: 4 fp32 lanes. NEON and fp16 conversions are part of the AArch64
// baseline, so no target switch is needed and the binding always selects them there.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>

#include "cpu_kernels.h"

#if defined(__aarch64__) || defined(_M_ARM64)
#include <arm_neon.h>

namespace linearpatch_cpu {
namespace {

struct Vec {
  static constexpr int W = 4;
  using T = float32x4_t;
  static T load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, T v) { vst1q_f32(p, v); }
  static T set1(float f) { return vdupq_n_f32(f); }
  static T zero() { return vdupq_n_f32(0.f); }
  static T add(T a, T b) { return vaddq_f32(a, b); }
  static T sub(T a, T b) { return vsubq_f32(a, b); }
  static T mul(T a, T b) { return vmulq_f32(a, b); }
  static T fma(T a, T b, T c) { return vfmaq_f32(c, a, b); }
  static float hsum(T v) { return vaddvq_f32(v); }
  // Lane stages 2, 1 (as in cpu_avx512.cpp): swapped(v) + v * (+1 | -1).
  static T inner(T v) {
    const float s2v[4] = {1, 1, -1, -1}, s1v[4] = {1, -1, 1, -1};
    v = vfmaq_f32(vextq_f32(v, v, 2), v, vld1q_f32(s2v));
    v = vfmaq_f32(vrev64q_f32(v), v, vld1q_f32(s1v));
    return v;
  }
  static T load_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static void store_bf16(uint16_t* p, T v) {
    const uint32x4_t b = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(b, vdupq_n_u32(0x7fff)), lsb), 16);
    r = vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7fc0));  // v == v is false for NaN
    vst1_u16(p, vmovn_u32(r));
  }
  static T load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static void store_f16(uint16_t* p, T v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
};

#include "cpu_kernels_impl.h"

void rows_neon(const RowArgs& a, int64_t begin, int64_t end) { rows_any(a, begin, end); }

}  // namespace

const IsaKernels* neon_kernels() {
  static const IsaKernels kernels{"neon", 4, &rows_neon};
  return &kernels;
}
}  // namespace linearpatch_cpu

#else

namespace linearpatch_cpu {
const IsaKernels* neon_kernels() { return nullptr; }
}  // namespace linearpatch_cpu

#endif
