// Interface between the stable-ABI binding (cpu_ops.cpp) and the CPU kernels (one translation unit
// per instruction set: cpu_avx512.cpp, cpu_avx2.cpp, cpu_neon.cpp, cpu_scalar.cpp). No torch header
// crosses it: raw pointers, strides and sizes only.
//
// One row x of d = K * N elements (N = 2**log2_n) is the K x N matrix X (row-major), and
// x . H_d = vec(H_K X H_N) for the symmetric H_d = H_K (x) H_N (linearpatch_kernels/hadamard.py).
// Every op reads its input row once from memory, works on one fp32 copy of the row in the core's
// cache (d <= 8192 fits L1; larger rows L2) and writes each output once:
//   transform:  y = x . H_d * out_scale
//   patch:      y = x . H_d diag(s / d) H_d                      (s / d prepared once per call)
//   epilogue:   h = (x + u) . H_d diag(s / d) H_d,  n = h * rsqrt(mean(h^2) + eps) * w
#pragma once

#include <cstdint>

namespace linearpatch_cpu {

enum class DType { kFloat32, kFloat16, kBFloat16 };
enum class Op { kTransform, kPatch, kEpilogue };

struct RowArgs {
  Op op;
  DType dtype;
  const void* x;          // rows of d elements, each row contiguous; row r at x + r * x_stride
  int64_t x_stride;       // in elements
  const void* update;     // epilogue: like x, added to it
  int64_t u_stride;
  void* y;                // (rows, d) contiguous: the result (the epilogue's h)
  void* normed;           // epilogue: (rows, d) contiguous
  const float* h_k;       // (K, K) fp32 +-1, symmetric; unused when K == 1
  const float* scale;     // (d,) fp32: s / d (patch, epilogue)
  const float* weight;    // (d,) fp32 norm weight (epilogue)
  float out_scale;        // transform only
  float eps;              // epilogue only
  int k;
  int log2_n;
  int64_t d;
  bool prefetch;          // prefetch each next row's input during the row (for inputs out of cache)
};

// Runs rows [begin, end) of `args` on the calling thread.
using RowsFn = void (*)(const RowArgs& args, int64_t begin, int64_t end);

struct IsaKernels {
  const char* name;  // "avx512", "avx2", "neon", "scalar"
  int width;         // fp32 lanes per vector; the kernels need N = d / K >= width
  RowsFn rows;
};

// The kernels of each instruction set, or nullptr where that file is not compiled for this
// architecture. Whether the running CPU supports them is the binding's question (cpu_ops.cpp).
const IsaKernels* avx512_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels* neon_kernels();
const IsaKernels* scalar_kernels();

}  // namespace linearpatch_cpu
