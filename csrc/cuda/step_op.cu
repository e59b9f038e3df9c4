// The CUDA kernels of the step op and of the capturable step op.
#include <torch/library.h>

#include "step_launch.h"

TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) {
  m.impl("step", &amos_fused::run_step<amos_fused::cuda::Backend>);
  m.impl("step_capturable", &amos_fused::run_capturable_step<amos_fused::cuda::Backend>);
}
