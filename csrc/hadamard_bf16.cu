// The __nv_bfloat16 kernels (one file per dtype so that they compile in parallel).
#include "hadamard_kernels.cuh"

namespace linearpatch_cuda {

std::string launch_hadamard_bf16(const HadamardArgs& args) { return launch_typed<__nv_bfloat16, false>(args); }

}  // namespace linearpatch_cuda
