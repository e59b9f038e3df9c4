// x / d for x a square root (+0 or −0, in [2^-75, 2^64), +Inf or NaN: what
// sqrt gives for a float32) and d a divisor in [2^-40, 1] (sqrt(1 − β2^t)),
// rounded to nearest and bitwise the divide instruction's quotient, from the
// reciprocal y = RN(1/d) and no divide:
//   q = RN(x·y)  is within an ulp of x/d,
//   r = d·q − x  is exact (one FMA),
//   RN(q − r·y) = RN(x/d)
// (Markstein's theorem: P. Markstein, "Computation of elementary functions on the
// IBM RISC System/6000 processor", IBM J. Res. Dev. 34(1), 1990).  The theorem
// needs every value normal and no overflow: here q lies in [2^-75, 2^104] and r
// on a grid above 2^-123.  ±0 comes out as x/d's ±0 (r = +0, then −(+0) + (±0));
// +Inf and NaN lanes keep q = x·y, which is x/d there.  Three FMA-unit operations
// and a compare instead of a divide, whose unit is shared by the step's other
// divide and square root.  Checked against the divide instruction for every x in
// [2^-75, 2^64) (tests/test_root_division.py).
#pragma once

#include <immintrin.h>

namespace amos_fused {

// The divisor's range where divide_root holds.  (static: each SIMD build, whose
// instructions differ, keeps its own copy, as with the overloads below.)
static inline bool divides_roots_by_reciprocal(float d) { return d >= 0x1p-40f && d <= 1.0f; }

#if defined(CPU_CAPABILITY_AVX512)
inline __m512 divide_root(__m512 x, __m512 d, __m512 y) {
  const __m512 q = _mm512_mul_ps(x, y);
  const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(3.40282347e38f), _CMP_LE_OQ);  // (FLT_MAX)
  return _mm512_mask3_fnmadd_ps(_mm512_fmsub_ps(d, q, x), y, q, finite);
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
inline __m256 divide_root(__m256 x, __m256 d, __m256 y) {
  const __m256 q = _mm256_mul_ps(x, y);
  const __m256 quotient = _mm256_fnmadd_ps(_mm256_fmsub_ps(d, q, x), y, q);
  return _mm256_blendv_ps(q, quotient, _mm256_cmp_ps(x, _mm256_set1_ps(3.40282347e38f), _CMP_LE_OQ));
}
#endif

}  // namespace amos_fused
