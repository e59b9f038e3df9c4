// The AVX-512 kernels again, with AVX512_BF16 (Zen 4 and later, Cooper Lake,
// Sapphire Rapids and later): bfloat16 params and states are rounded to nearest
// by vcvtne2ps2bf16, one instruction for 32 values where the AVX-512 kernels
// spend about 16 (csrc/cpu/bucket_loop.h: bf16_lanes_plain).  The same bits as every
// other instruction set; chosen at run time when the CPU has it (csrc/cpu/dispatch.cpp).
// (GCC 10 and later know the target.)
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#include "target_independent_includes.h"  // before the pragma: see there
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include "avx512_features.h"
#define AMOS_FUSED_AVX512_BF16 1
#define CPU_CAPABILITY AVX512_BF16
#include "cpu/kernels_impl.h"

AMOS_FUSED_DEFINE_KERNEL_TABLE(kernels_avx512_bf16, "avx512_bf16")
#else
#include "cpu/kernel_api.h"
const amos_fused::cpu::KernelTable& amos_fused::cpu::kernels_avx512_bf16() { return kernels_default(); }
#endif
