// The feature macros of a file compiled for AVX-512 (F, BW, VL, DQ) besides AVX2 +
// FMA + F16C by its own `#pragma GCC target`, which sets none of them: defined by
// hand so that at::vec selects its 512-bit code (float tiles of 16 lanes) and the
// kernels their AVX-512 paths.  Include right after the pragma, before anything else.
#pragma once

#include "avx2_features.h"
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
#define CPU_CAPABILITY_AVX512
