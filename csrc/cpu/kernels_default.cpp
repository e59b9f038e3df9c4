// The CPU kernels for any x86-64 / other CPU (the compiler's baseline ISA).
// Its copies of the inline functions it shares with the SIMD builds (csrc/simd/)
// are the ones the linker keeps: setup.py links those builds last.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
#include "stream_floor_kernel.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_default, "default")
AMOS_FUSED_DEFINE_STREAM_FLOOR(stream_floor_default)
