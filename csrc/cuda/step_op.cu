// The CUDA kernel of the step op.
#include <torch/library.h>

#include "step_launch.h"

TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) { m.impl("step", &amos_fused::run_step<amos_fused::cuda::Backend>); }
