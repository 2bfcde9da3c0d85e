// Stand-in for cuda_bf16.h on the host: bfloat16 with round-to-nearest-even conversions.
#pragma once
#include "cuda_fp16.h"
