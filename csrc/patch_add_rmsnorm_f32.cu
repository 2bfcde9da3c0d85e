// The fused interface epilogue for float (one file per dtype so that they compile in parallel).
#include "hadamard_kernels.cuh"

namespace linearpatch_cuda {

std::string launch_patch_add_rmsnorm_f32(const HadamardArgs& args) { return launch_typed<float, true>(args); }

}  // namespace linearpatch_cuda
