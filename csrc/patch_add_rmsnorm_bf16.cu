// The fused interface epilogue for __nv_bfloat16 (one file per dtype so that they compile in parallel).
#include "hadamard_kernels.cuh"

namespace linearpatch_cuda {

std::string launch_patch_add_rmsnorm_bf16(const HadamardArgs& args) { return launch_typed<__nv_bfloat16, true>(args); }

}  // namespace linearpatch_cuda
