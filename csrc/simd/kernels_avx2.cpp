// The CPU kernels for x86-64 with AVX2 + FMA + F16C, chosen at run time when the
// CPU has them (csrc/cpu/dispatch.cpp).  The whole file is compiled for that target by
// the pragma below (the rest of the build stays baseline), so it comes before
// every include, then the feature macros the pragma does not set (avx2_features.h).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#include "target_independent_includes.h"  // before the pragma: see there
#pragma GCC target("avx,avx2,fma,f16c")
#include "avx2_features.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/kernels_impl.h"
#include "cpu/stream_floor_kernel.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_avx2, "avx2")
AMOS_FUSED_DEFINE_STREAM_FLOOR(stream_floor_avx2)
#else
#include "cpu/kernel_api.h"
const amos_fused::cpu::KernelTable& amos_fused::cpu::kernels_avx2() { return kernels_default(); }
#include "cpu/stream_floor_api.h"
amos_fused::cpu::StreamFloorFn amos_fused::cpu::stream_floor_avx2() { return stream_floor_default(); }
#endif
