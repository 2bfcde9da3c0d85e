// Stand-in for cuda_fp16.h on the host: IEEE binary16 with round-to-nearest-even conversions
// (the _rn conversions of CUDA; the plain ones round to nearest even as well).
#pragma once
#include "emulated_cuda.h"
#include "emulated_float16.h"
