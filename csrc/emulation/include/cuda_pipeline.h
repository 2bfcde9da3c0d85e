// Stand-in for cuda_pipeline.h: the __pipeline_* primitives are in emulated_cuda.h.
#pragma once
#include "emulated_cuda.h"
