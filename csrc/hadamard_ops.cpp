// The `linearpatch_cuda` operators, registered for the CUDA dispatch key through the libtorch
// stable ABI (compiled with TORCH_TARGET_VERSION = 2.10, so one binary loads in every torch >= 2.10).
//
//   linearpatch_cuda::hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor
//       y = x . H_d * scale along the last dim
//   linearpatch_cuda::hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor
//       y = x . H_d diag(s) H_d / d
//   linearpatch_cuda::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale,
//                                       Tensor norm_weight, float eps) -> (Tensor, Tensor)
//       h = (residual + update) . H_d diag(s) H_d / d,
//       normed = h * rsqrt(mean(h^2) + eps) * norm_weight     (norm_weight fp32; returns (h, normed))
//
// where `scale` is s as the kernels read it, prepared once per scale tensor by
// linearpatch_kernels/backends/cuda_backend.py (prepare_scale): for K = 1, s/d (permuted into
// row_kernel's register order up to d = 8192); for K > 1, s itself. A float32 vector of length d.
// norm_weight likewise (prepare_norm_weight): float32, in row_kernel's L0 order up to d = 4096.
//
// with d = x.size(-1) = K * 2**m, H_d = h_k (x) Sylvester(2**m) unnormalized, h_k the K x K
// symmetric +-1 factor as fp32 on x's device ([[1.]] when K == 1). These are the low-level kernels
// behind linearpatch::hadamard_transform / hadamard_patch / patch_add_rmsnorm
// (linearpatch_kernels/ops.py), which own validation, autograd and fake tensors; the checks here
// only guard against misuse.
//
// The one call without a stable C++ wrapper is the current CUDA stream, taken from the C shim
// (aoti_torch_get_current_cuda_stream, declared when USE_CUDA is defined).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "hadamard_launch.h"

namespace linearpatch_cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

DType dtype_of(const Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16 (float64 runs on the torch backend)");
  }
  return DType::kFloat32;  // unreachable
}

bool aligned16(const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// The kernels read and write whole 16-byte vectors: a dense tensor on a 16-byte boundary.
Tensor dense_aligned(const Tensor& t) {
  Tensor c = torch::stable::contiguous(t);
  if (!aligned16(c)) c = torch::stable::clone(c);
  return c;
}

int log2_exact(int64_t n) {
  int m = 0;
  while ((int64_t(1) << m) < n) ++m;
  return (int64_t(1) << m) == n ? m : -1;
}

// The row layout of x for h_k: d = K * 2**log2_n, checked against what the kernels are compiled for.
struct RowShape {
  DType dtype;
  int64_t d;
  int k;
  int log2_n;
};

RowShape check_rows(const char* op, const Tensor& x, const Tensor& h_k) {
  STD_TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const DType dtype = dtype_of(x, op);
  const int64_t d = x.size(x.dim() - 1);
  STD_TORCH_CHECK(d >= 1 && d <= kMaxD, op, ": last dim ", d, " is outside [1, ", kMaxD, "]");

  STD_TORCH_CHECK(h_k.is_cuda() && h_k.get_device_index() == x.get_device_index(), op,
                  ": h_k must be on x's device");
  STD_TORCH_CHECK(h_k.scalar_type() == ScalarType::Float && h_k.dim() == 2 && h_k.size(0) == h_k.size(1),
                  op, ": h_k must be a square float32 matrix");
  const int64_t k = h_k.size(0);
  STD_TORCH_CHECK(k == 1 || (k % 4 == 0 && k <= 256), op, ": K = ", k, " must be 1 or a multiple of 4 up to 256");
  STD_TORCH_CHECK(d % k == 0, op, ": last dim ", d, " is not a multiple of K = ", k);
  const int log2_n = log2_exact(d / k);
  STD_TORCH_CHECK(log2_n >= kMinLog2N, op, ": d / K = ", d / k, " must be a power of two >= ", 1 << kMinLog2N);
  return RowShape{dtype, d, int(k), log2_n};
}

// A float32 vector of length d on x's device (the patch scales, the norm weight), dense and aligned.
Tensor checked_vector(const char* op, const char* name, const Tensor& v, const Tensor& x, int64_t d) {
  STD_TORCH_CHECK(v.is_cuda() && v.get_device_index() == x.get_device_index(), op, ": ", name,
                  " must be on x's device");
  STD_TORCH_CHECK(v.scalar_type() == ScalarType::Float && v.dim() == 1 && v.size(0) == d, op, ": ", name,
                  " must be a float32 vector of length ", d);
  return dense_aligned(v);
}

void* current_stream(const Tensor& x) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(x.get_device_index(), &stream));
  return stream;
}

// `scale` == nullptr: the transform, times `transform_scale`; else the patch with scales `*scale`.
Tensor run(const char* op, const Tensor& x, const Tensor& h_k, const Tensor* scale, double transform_scale) {
  const RowShape shape = check_rows(op, x, h_k);
  Tensor scale_c = h_k;  // placeholder, replaced below for the patch
  if (scale != nullptr) scale_c = checked_vector(op, "scale", *scale, x, shape.d);

  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor xc = dense_aligned(x);
  const Tensor hc = dense_aligned(h_k);
  Tensor y = torch::stable::empty_like(xc);
  STD_TORCH_CHECK(y.is_contiguous() && aligned16(y), op, ": internal error: output is not dense and aligned");

  HadamardArgs args;
  args.x = xc.data_ptr();
  args.y = y.data_ptr();
  args.h_k = static_cast<const float*>(hc.data_ptr());
  args.scale = scale != nullptr ? static_cast<const float*>(scale_c.data_ptr()) : nullptr;
  args.rows = xc.numel() / shape.d;
  args.k = shape.k;
  args.log2_n = shape.log2_n;
  // P = H diag(s) H^T with orthonormal H = H_d / sqrt(d): both 1/sqrt(d) go into one 1/d.
  args.out_scale = scale != nullptr ? float(1.0 / double(shape.d)) : float(transform_scale);
  args.device = x.get_device_index();
  args.stream = current_stream(x);
  const std::string err = launch_hadamard(shape.dtype, args);
  STD_TORCH_CHECK(err.empty(), op, ": ", err);
  return y;
}

Tensor hadamard_transform_cuda(const Tensor& x, const Tensor& h_k, double scale) {
  return run("linearpatch_cuda::hadamard_transform", x, h_k, nullptr, scale);
}

Tensor hadamard_patch_cuda(const Tensor& x, const Tensor& h_k, const Tensor& scale) {
  return run("linearpatch_cuda::hadamard_patch", x, h_k, &scale, 1.0);
}

// The fused interface epilogue: one pass over residual and update, two outputs (h, normed).
std::tuple<Tensor, Tensor> patch_add_rmsnorm_cuda(const Tensor& residual, const Tensor& update, const Tensor& h_k,
                                                  const Tensor& scale, const Tensor& norm_weight, double eps) {
  const char* op = "linearpatch_cuda::patch_add_rmsnorm";
  const RowShape shape = check_rows(op, residual, h_k);
  STD_TORCH_CHECK(update.is_cuda() && update.get_device_index() == residual.get_device_index() &&
                      update.scalar_type() == residual.scalar_type(),
                  op, ": update must be on residual's device, with its dtype");
  bool same_shape = update.dim() == residual.dim();
  for (int64_t i = 0; same_shape && i < residual.dim(); ++i) same_shape = update.size(i) == residual.size(i);
  STD_TORCH_CHECK(same_shape, op, ": update must have residual's shape");
  STD_TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite non-negative number, got ", eps);
  const Tensor scale_c = checked_vector(op, "scale", scale, residual, shape.d);
  const Tensor weight_c = checked_vector(op, "norm_weight", norm_weight, residual, shape.d);

  torch::stable::accelerator::DeviceGuard guard(residual.get_device_index());
  const Tensor xc = dense_aligned(residual);
  const Tensor uc = dense_aligned(update);
  const Tensor hc = dense_aligned(h_k);
  Tensor h = torch::stable::empty_like(xc);
  Tensor normed = torch::stable::empty_like(xc);
  STD_TORCH_CHECK(h.is_contiguous() && aligned16(h) && normed.is_contiguous() && aligned16(normed), op,
                  ": internal error: outputs are not dense and aligned");

  HadamardArgs args;
  args.x = xc.data_ptr();
  args.y = h.data_ptr();
  args.h_k = static_cast<const float*>(hc.data_ptr());
  args.scale = static_cast<const float*>(scale_c.data_ptr());
  args.rows = xc.numel() / shape.d;
  args.k = shape.k;
  args.log2_n = shape.log2_n;
  args.out_scale = float(1.0 / double(shape.d));  // as in the patch
  args.device = residual.get_device_index();
  args.stream = current_stream(residual);
  args.update = uc.data_ptr();
  args.normed = normed.data_ptr();
  args.norm_weight = static_cast<const float*>(weight_c.data_ptr());
  args.eps = float(eps);
  const std::string err = launch_patch_add_rmsnorm(shape.dtype, args);
  STD_TORCH_CHECK(err.empty(), op, ": ", err);
  return std::make_tuple(h, normed);
}

}  // namespace
}  // namespace linearpatch_cuda

STABLE_TORCH_LIBRARY(linearpatch_cuda, m) {
  m.def("hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor");
  m.def("hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor");
  m.def(
      "patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale, Tensor norm_weight, float eps)"
      " -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(linearpatch_cuda, CUDA, m) {
  m.impl("hadamard_transform", TORCH_BOX(&linearpatch_cuda::hadamard_transform_cuda));
  m.impl("hadamard_patch", TORCH_BOX(&linearpatch_cuda::hadamard_patch_cuda));
  m.impl("patch_add_rmsnorm", TORCH_BOX(&linearpatch_cuda::patch_add_rmsnorm_cuda));
}
