// The float kernels (one file per dtype so that they compile in parallel).
#include "hadamard_kernels.cuh"

namespace linearpatch_cuda {

std::string launch_hadamard_f32(const HadamardArgs& args) { return launch_typed<float, false>(args); }

}  // namespace linearpatch_cuda
