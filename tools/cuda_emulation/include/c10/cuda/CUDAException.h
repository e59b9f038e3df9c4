// Emulation stand-in (tools/cuda_emulation): launches are plain calls.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
