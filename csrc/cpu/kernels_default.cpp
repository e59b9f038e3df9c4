// The CPU kernels for any x86-64 / other CPU (the compiler's baseline ISA).
// Listed before the other instruction sets in setup.py, so the linker keeps
// this file's copies of inline functions shared with them.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
#include "stream_floor_kernel.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_default, "default")
AMOS_FUSED_DEFINE_STREAM_FLOOR(stream_floor_default)
