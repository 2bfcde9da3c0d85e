// fast-hadamard-transform's CUDA kernels as torch.ops.fht.*: the comparison package of the GPU run,
// registered with the dispatcher instead of a pybind module.
//
// The project (Dao-AILab/fast-hadamard-transform) binds its kernels through pybind11, so its library is
// tied to the CPython it was built for; the GPU machine runs Python 3.12, the machine that builds the
// bundle 3.11. This file holds no Python at all: scripts/gpu_bundle.py compiles it with the project's
// kernel files (csrc/fast_hadamard_transform*.cu, not its .cpp) against torch 2.11.0's headers into a
// plain library that torch.ops.load_library loads under any Python of that torch.
//
// Ops (each: x . H_unnormalized(d) . scale along the last dim, any leading shape, fp32/fp16/bf16):
//   fht::hadamard_transform(Tensor x, float scale)      d a multiple of 8, at most 32768
//   fht::hadamard_transform_12N / _20N / _28N           d = K x 2^m: a multiple of 4K, at most 1024 K
// No padding: a size the kernels do not take is an error (the comparison runs at their sizes only).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "fast_hadamard_transform.h"

// The kernels' host-side launchers, instantiated for float, at::Half and at::BFloat16 in the .cu.
template <typename input_t> void fast_hadamard_transform_cuda(HadamardParamsBase &params, cudaStream_t stream);
template <typename input_t> void fast_hadamard_transform_12N_cuda(HadamardParamsBase &params, cudaStream_t stream);
template <typename input_t> void fast_hadamard_transform_20N_cuda(HadamardParamsBase &params, cudaStream_t stream);
template <typename input_t> void fast_hadamard_transform_28N_cuda(HadamardParamsBase &params, cudaStream_t stream);

namespace {

// The parameter block names the log2 of the power-of-two part log_N in some releases and log_dim in
// others: set whichever member exists (the int overload is preferred when both would compile).
template <typename P>
auto set_log2_size(P &p, int value, int) -> decltype(p.log_N = value, void()) { p.log_N = value; }
template <typename P>
auto set_log2_size(P &p, int value, long) -> decltype(p.log_dim = value, void()) { p.log_dim = value; }

using Launcher = void (*)(HadamardParamsBase &, cudaStream_t);

struct Family {
  const char *name;
  int64_t k;         // d = k x 2^m
  int64_t multiple;  // d must be a multiple of this (the kernels' vector width times k)
  int64_t max_dim;
  Launcher fp32, fp16, bf16;
};

at::Tensor transform(const at::Tensor &x_in, double scale, const Family &f) {
  TORCH_CHECK(x_in.is_cuda(), f.name, ": x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 1, f.name, ": x needs a last dimension");
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(d % f.multiple == 0 && d <= f.max_dim, f.name, ": the last dimension must be a multiple of ",
              f.multiple, " and at most ", f.max_dim, ", got ", d);
  at::Tensor x = x_in.reshape({-1, d});
  if (x.stride(-1) != 1) x = x.contiguous();
  at::Tensor out = at::empty({x.size(0), d}, x.options());
  if (x.size(0) == 0) return out.view(x_in.sizes());

  HadamardParamsBase params;
  std::memset(&params, 0, sizeof(params));
  params.batch = static_cast<int>(x.size(0));
  params.dim = static_cast<int>(d);
  set_log2_size(params, static_cast<int>(std::ceil(std::log2(static_cast<double>(d / f.k)))), 0);
  params.x_ptr = x.data_ptr();
  params.out_ptr = out.data_ptr();
  params.x_batch_stride = x.stride(0);  // in elements
  params.out_batch_stride = out.stride(0);
  params.scale = static_cast<float>(scale);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  switch (x.scalar_type()) {
    case at::kFloat: f.fp32(params, stream); break;
    case at::kHalf: f.fp16(params, stream); break;
    case at::kBFloat16: f.bf16(params, stream); break;
    default: TORCH_CHECK(false, f.name, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return out.view(x_in.sizes());
}

#define FHT_FAMILY(NAME, LAUNCHER, K, MULTIPLE, MAX)                                              \
  const Family NAME{#NAME, K, MULTIPLE, MAX, &LAUNCHER<float>, &LAUNCHER<at::Half>, &LAUNCHER<at::BFloat16>}

FHT_FAMILY(hadamard_transform, fast_hadamard_transform_cuda, 1, 8, 32768);
FHT_FAMILY(hadamard_transform_12N, fast_hadamard_transform_12N_cuda, 12, 4 * 12, 12 * 1024);
FHT_FAMILY(hadamard_transform_20N, fast_hadamard_transform_20N_cuda, 20, 4 * 20, 20 * 1024);
FHT_FAMILY(hadamard_transform_28N, fast_hadamard_transform_28N_cuda, 28, 4 * 28, 28 * 1024);

at::Tensor t1(const at::Tensor &x, double s) { return transform(x, s, hadamard_transform); }
at::Tensor t12(const at::Tensor &x, double s) { return transform(x, s, hadamard_transform_12N); }
at::Tensor t20(const at::Tensor &x, double s) { return transform(x, s, hadamard_transform_20N); }
at::Tensor t28(const at::Tensor &x, double s) { return transform(x, s, hadamard_transform_28N); }

}  // namespace

TORCH_LIBRARY(fht, m) {
  m.def("hadamard_transform(Tensor x, float scale=1.0) -> Tensor");
  m.def("hadamard_transform_12N(Tensor x, float scale=1.0) -> Tensor");
  m.def("hadamard_transform_20N(Tensor x, float scale=1.0) -> Tensor");
  m.def("hadamard_transform_28N(Tensor x, float scale=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fht, CUDA, m) {
  m.impl("hadamard_transform", &t1);
  m.impl("hadamard_transform_12N", &t12);
  m.impl("hadamard_transform_20N", &t20);
  m.impl("hadamard_transform_28N", &t28);
}
