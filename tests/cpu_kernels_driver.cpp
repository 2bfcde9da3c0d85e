// Checks every vector instruction set compiled for this architecture against the scalar kernels,
// without torch: the kernels of csrc/cpu/ behind their raw-pointer interface (cpu_kernels.h). The
// scalar kernels are checked against fp64 references by tests/test_cpu_backend.py; this driver
// carries that check to the instruction sets the test machine cannot run natively, e.g. NEON
// cross-compiled and run under qemu (tests/test_cpu_kernels_cross.py).
//
// Output: one line per (isa, op, dtype, d) with the relative Frobenius error against scalar, then
// "checked N cases, worst fp32 E32, worst half E16" and exit status 0, or 1 on the first failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu_kernels.h"

using namespace linearpatch_cpu;

namespace {

bool cpu_supports(const char* isa) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return false;
#else
  return std::strcmp(isa, "neon") == 0;
#endif
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float to_float(DType t, const void* p, int64_t i) {
  if (t == DType::kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == DType::kBFloat16) return from_bits(uint32_t(h) << 16);
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) return (sign ? -1.f : 1.f) * float(mant) * 5.9604644775390625e-8f;
  return from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

// Random inputs of each dtype, all finite: fp32 values; bf16 the upper halves of fp32 values;
// fp16 normal halves with exponents around 1.
void fill(DType t, std::vector<uint8_t>& buf, int64_t n, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> bits(0, 1023), exp(12, 17), sign(0, 1);
  if (t == DType::kFloat32) {
    buf.resize(size_t(n) * 4);
    for (int64_t i = 0; i < n; ++i) reinterpret_cast<float*>(buf.data())[i] = normal(gen);
    return;
  }
  buf.resize(size_t(n) * 2);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    if (t == DType::kBFloat16) {
      const float f = normal(gen);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      h = uint16_t(u >> 16);
    } else {
      h = uint16_t((sign(gen) << 15) | (exp(gen) << 10) | bits(gen));
    }
    reinterpret_cast<uint16_t*>(buf.data())[i] = h;
  }
}

struct Case {
  int k;
  int log2_n;
};

}  // namespace

int main() {
  const IsaKernels* scalar = scalar_kernels();
  const IsaKernels* candidates[] = {avx512_kernels(), avx2_kernels(), neon_kernels()};
  // K = 1: no hi pass, hi passes of 1, 2, 3 stages, 3 + 3; K > 1: N below, at and above a vector.
  const Case cases[] = {{1, 0}, {1, 2}, {1, 6}, {1, 7}, {1, 8}, {1, 9}, {1, 12}, {12, 0}, {12, 3}, {36, 3}, {36, 4}, {20, 8}};
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  const char* dtype_names[] = {"fp32", "bf16", "fp16"};
  const Op ops[] = {Op::kTransform, Op::kPatch, Op::kEpilogue};
  const char* op_names[] = {"transform", "patch", "epilogue"};
  std::mt19937 gen(7);
  int checked = 0, ran = 0;
  double worst32 = 0, worst16 = 0;
  for (const IsaKernels* isa : candidates) {
    if (isa == nullptr || !cpu_supports(isa->name)) continue;
    ++ran;
    for (const Case& c : cases) {
      const int64_t n = int64_t(1) << c.log2_n, d = c.k * n, rows = 5;
      if (n < isa->width) continue;  // the binding gives such rows to a narrower set
      // A symmetric +-1 matrix stands in for H_K: the kernels apply whatever K x K matrix they get.
      std::vector<float> h(size_t(c.k) * c.k, 1.f);
      std::uniform_int_distribution<int> coin(0, 1);
      for (int i = 0; i < c.k; ++i)
        for (int j = 0; j <= i; ++j) h[size_t(i) * c.k + j] = h[size_t(j) * c.k + i] = coin(gen) ? 1.f : -1.f;
      std::vector<float> scale(static_cast<size_t>(d)), weight(static_cast<size_t>(d));
      std::uniform_real_distribution<float> uni(0.5f, 1.5f);
      for (int64_t i = 0; i < d; ++i) {
        scale[size_t(i)] = uni(gen) / float(d);
        weight[size_t(i)] = uni(gen);
      }
      for (int t = 0; t < 3; ++t) {
        std::vector<uint8_t> x, u;
        fill(dtypes[t], x, rows * d, gen);
        fill(dtypes[t], u, rows * d, gen);
        const size_t bytes = size_t(rows * d) * (t == 0 ? 4 : 2);
        for (int o = 0; o < 3; ++o) {
          std::vector<uint8_t> y_ref(bytes), n_ref(bytes), y(bytes), nrm(bytes);
          RowArgs a{};
          a.op = ops[o];
          a.dtype = dtypes[t];
          a.x = x.data();
          a.x_stride = d;
          a.update = u.data();
          a.u_stride = d;
          a.h_k = h.data();
          a.scale = scale.data();
          a.weight = weight.data();
          a.out_scale = 0.5f;
          a.eps = 1e-5f;
          a.k = c.k;
          a.log2_n = c.log2_n;
          a.d = d;
          a.prefetch = true;  // the path of large inputs (the op asks for it from 4 MiB of input)
          a.y = y_ref.data();
          a.normed = n_ref.data();
          scalar->rows(a, 0, rows);
          a.y = y.data();
          a.normed = nrm.data();
          isa->rows(a, 0, rows);
          double err = 0, norm = 0;
          for (int64_t i = 0; i < rows * d; ++i) {
            const double r = to_float(dtypes[t], y_ref.data(), i), v = to_float(dtypes[t], y.data(), i);
            err += (v - r) * (v - r);
            norm += r * r;
            if (ops[o] == Op::kEpilogue) {
              const double rn = to_float(dtypes[t], n_ref.data(), i), vn = to_float(dtypes[t], nrm.data(), i);
              err += (vn - rn) * (vn - rn);
              norm += rn * rn;
            }
          }
          const double rel = norm > 0 ? std::sqrt(err / norm) : std::sqrt(err);
          const double tol = t == 0 ? 1e-5 : 1e-2;
          std::printf("%s %s %s d=%lld (K=%d): %.2e\n", isa->name, op_names[o], dtype_names[t], (long long)d, c.k, rel);
          if (!(rel <= tol)) {
            std::printf("FAILED: %s %s %s d=%lld: relative error %.3e vs scalar exceeds %.0e\n", isa->name, op_names[o],
                        dtype_names[t], (long long)d, rel, tol);
            return 1;
          }
          (t == 0 ? worst32 : worst16) = std::fmax(t == 0 ? worst32 : worst16, rel);
          ++checked;
        }
      }
    }
  }
  std::printf("checked %d cases on %d vector instruction sets, worst fp32 %.2e, worst half %.2e\n", checked, ran,
              worst32, worst16);
  return ran > 0 ? 0 : 1;
}
