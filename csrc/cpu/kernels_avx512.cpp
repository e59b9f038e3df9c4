// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ) besides AVX2 + FMA + F16C,
// chosen at run time when the CPU has them (cpu/dispatch.cpp).  As in
// kernels_avx2.cpp, the pragma compiles this file alone for that target, and the
// feature macros it does not set are defined by hand so that at::vec selects its
// 512-bit code: float tiles of 16 lanes.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
// GCC 12's AVX-512 headers build vectors from _mm512_undefined_*(), which its
// -Wmaybe-uninitialized reports at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#include "stream_floor_kernel.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_avx512, "avx512")
AMOS_FUSED_DEFINE_STREAM_FLOOR(stream_floor_avx512)
#else
#include "kernel_api.h"
const amos_fused::cpu::KernelTable& amos_fused::cpu::kernels_avx512() { return kernels_default(); }
#include "stream_floor_api.h"
amos_fused::cpu::StreamFloorFn amos_fused::cpu::stream_floor_avx512() { return stream_floor_default(); }
#endif
