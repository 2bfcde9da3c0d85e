// The entry point of the emulated kernels: fills HadamardArgs as the op binding
// (../hadamard_ops.cpp) does and calls the real launchers of ../hadamard_launch.h.
#include <cstdint>
#include <string>

#include "hadamard_launch.h"

extern "C" const char* emu_last_diagnostic();
extern "C" void emu_clear_diagnostic();
extern "C" int emu_device_ordinal();

namespace {
std::string message;
}

extern "C" {

// op: 0 = hadamard_transform (scale == nullptr, out_scale = transform scale), 1 = hadamard_patch
// (out_scale = 1/d; `scale` prepared as cuda_backend.prepare_scale makes it), 2 = patch_add_rmsnorm. dtype: 0 fp32, 1 fp16, 2 bf16. Returns nullptr on
// success, else what the launcher said, followed by the emulator's diagnostic when it has one.
const char* emu_launch(int op, int dtype, const void* x, void* y, const float* h_k, const float* scale,
                       int64_t rows, int k, int log2_n, double transform_scale, const void* update, void* normed,
                       const float* norm_weight, double eps) {
  using namespace linearpatch_cuda;
  emu_clear_diagnostic();
  HadamardArgs args;
  args.x = x;
  args.y = y;
  args.h_k = h_k;
  args.scale = op == 0 ? nullptr : scale;
  args.rows = rows;
  args.k = k;
  args.log2_n = log2_n;
  const double d = double(int64_t(k) << log2_n);
  // P = H diag(s) H^T with orthonormal H = H_d / sqrt(d): both 1/sqrt(d) go into one 1/d.
  args.out_scale = op == 0 ? float(transform_scale) : float(1.0 / d);
  args.device = emu_device_ordinal();  // the op binding passes the tensor's device
  args.stream = nullptr;
  if (op == 2) {
    args.update = update;
    args.normed = normed;
    args.norm_weight = norm_weight;
    args.eps = float(eps);
  }
  const DType type = dtype == 0 ? DType::kFloat32 : dtype == 1 ? DType::kFloat16 : DType::kBFloat16;
  const std::string err = op == 2 ? launch_patch_add_rmsnorm(type, args) : launch_hadamard(type, args);
  const std::string why = emu_last_diagnostic();
  if (err.empty() && why.empty()) return nullptr;
  message = err.empty() ? "the launcher reported success, but: " + why : why.empty() ? err : err + ": " + why;
  return message.c_str();
}

}  // extern "C"
