// Stand-in for the CUDA runtime header when the kernels are compiled by the host compiler.
#pragma once
#include "emulated_cuda.h"
