// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ) besides AVX2 + FMA + F16C,
// chosen at run time when the CPU has them (csrc/cpu/dispatch.cpp).  As in
// kernels_avx2.cpp, the pragma compiles this file alone for that target.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#include "target_independent_includes.h"  // before the pragma: see there
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "avx512_features.h"
#define CPU_CAPABILITY AVX512
#include "cpu/kernels_impl.h"
#include "cpu/stream_floor_kernel.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_avx512, "avx512")
AMOS_FUSED_DEFINE_STREAM_FLOOR(stream_floor_avx512)
#else
#include "cpu/kernel_api.h"
const amos_fused::cpu::KernelTable& amos_fused::cpu::kernels_avx512() { return kernels_default(); }
#include "cpu/stream_floor_api.h"
amos_fused::cpu::StreamFloorFn amos_fused::cpu::stream_floor_avx512() { return stream_floor_default(); }
#endif
