// The fused interface epilogue for __half (one file per dtype so that they compile in parallel).
#include "hadamard_kernels.cuh"

namespace linearpatch_cuda {

std::string launch_patch_add_rmsnorm_f16(const HadamardArgs& args) { return launch_typed<__half, true>(args); }

}  // namespace linearpatch_cuda
