// Host interface between the stable-ABI op binding (hadamard_ops.cpp, compiled by the host
// compiler against torch's stable headers) and the CUDA kernels (hadamard_*.cu and
// patch_add_rmsnorm_*.cu, compiled by nvcc without any torch header). Only raw pointers and plain
// integers cross it.
#pragma once

#include <cstdint>
#include <string>

namespace linearpatch_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct HadamardArgs {
  const void* x;        // (rows, d) contiguous, 16-byte aligned, dtype `dtype`
  void* y;              // (rows, d) contiguous, 16-byte aligned, dtype `dtype`
  const float* h_k;     // (K, K) fp32, symmetric +-1; unused when K == 1
  // (d,) fp32 patch scales as prepared by cuda_backend.prepare_scale, 16-byte aligned, or nullptr for
  // hadamard_transform: K = 1, s/d in row_kernel's register order up to N = 8192, in column order from
  // 16384 (row_kernel.cuh); K > 1, s itself.
  const float* scale;
  int64_t rows;
  int k;                // d = k * 2**log2_n
  int log2_n;
  float out_scale;      // multiplies the result: `scale` for the transform, 1/d for the patch when K > 1
  int device;           // current CUDA device (set by the caller)
  void* stream;         // cudaStream_t to launch on
  // The fused epilogue only (launch_patch_add_rmsnorm); x is the residual there, y receives h.
  const void* update = nullptr;        // (rows, d) like x, added to x
  void* normed = nullptr;              // (rows, d) like y: h * rsqrt(mean(h^2) + eps) * norm_weight
  // (d,) fp32, 16-byte aligned, as cuda_backend.prepare_norm_weight makes it: K = 1 up to N = 4096 in
  // row_kernel's L0 register order, otherwise in column order.
  const float* norm_weight = nullptr;
  float eps = 0.f;
};

// Largest hidden size the kernels are compiled for, and the smallest power-of-two factor
// (16-byte vectors never straddle two rows of the K x N view).
constexpr int kMaxD = 32768;
constexpr int kMinLog2N = 3;

// Launch y = x . H_d . out_scale (scale == nullptr) or y = x . H_d diag(scale) H_d . out_scale
// on `stream`. Return an empty string on success, else a message naming what failed.
// One definition per dtype, each in its own .cu file so that they compile in parallel.
std::string launch_hadamard_f32(const HadamardArgs& args);
std::string launch_hadamard_f16(const HadamardArgs& args);
std::string launch_hadamard_bf16(const HadamardArgs& args);

inline std::string launch_hadamard(DType dtype, const HadamardArgs& args) {
  switch (dtype) {
    case DType::kFloat32: return launch_hadamard_f32(args);
    case DType::kFloat16: return launch_hadamard_f16(args);
    case DType::kBFloat16: return launch_hadamard_bf16(args);
  }
  return "unknown dtype";
}

// Launch the fused interface epilogue on `stream`: y = h = (x + update) . H_d diag(scale) H_d . out_scale
// (out_scale = 1/d) and normed = h * rsqrt(mean(h^2) + eps) * norm_weight, both from the fp32 h.
std::string launch_patch_add_rmsnorm_f32(const HadamardArgs& args);
std::string launch_patch_add_rmsnorm_f16(const HadamardArgs& args);
std::string launch_patch_add_rmsnorm_bf16(const HadamardArgs& args);

inline std::string launch_patch_add_rmsnorm(DType dtype, const HadamardArgs& args) {
  switch (dtype) {
    case DType::kFloat32: return launch_patch_add_rmsnorm_f32(args);
    case DType::kFloat16: return launch_patch_add_rmsnorm_f16(args);
    case DType::kBFloat16: return launch_patch_add_rmsnorm_bf16(args);
  }
  return "unknown dtype";
}

}  // namespace linearpatch_cuda
