// SIMD overloads of the helpers that csrc/step_math.h calls, so the per-element
// math there runs unchanged on at::vec::Vectorized values.  Include this header
// instead of step_math.h in CPU kernel code: the overloads must be declared
// before the templates in step_math.h are defined.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace amos_fused {

template <typename S>
inline at::vec::Vectorized<S> af_sqrt(const at::vec::Vectorized<S>& x) { return x.sqrt(); }

// at::vec::maximum propagates NaN like torch.maximum.
template <typename S>
inline at::vec::Vectorized<S> af_max(const at::vec::Vectorized<S>& a,
                                     const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}

// NaN stays NaN, like torch.clamp.
template <typename S>
inline at::vec::Vectorized<S> af_clamp(const at::vec::Vectorized<S>& x,
                                       const at::vec::Vectorized<S>& lo,
                                       const at::vec::Vectorized<S>& hi) {
  return at::vec::minimum(at::vec::maximum(x, lo), hi);
}

// torch.sign's (x > 0) − (x < 0): sign(±0) = sign(NaN) = +0.
template <typename S>
inline at::vec::Vectorized<S> af_sign(const at::vec::Vectorized<S>& x) {
  using V = at::vec::Vectorized<S>;
  const V zero(S(0)), one(S(1));
  return V::blendv(zero, one, zero < x) - V::blendv(zero, one, x < zero);
}

// The same for float lanes in fewer instructions: ±1 with x's sign where x is
// ordered and not ±0, else +0.
#if defined(CPU_CAPABILITY_AVX512)
inline at::vec::Vectorized<float> af_sign(const at::vec::Vectorized<float>& x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 nonzero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  // (bits & sign) | bits(1.0), where nonzero
  return _mm512_castsi512_ps(_mm512_maskz_ternarylogic_epi32(
      nonzero, bits, _mm512_set1_epi32(INT32_MIN), _mm512_set1_epi32(0x3f800000), 0xea));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> af_sign(const at::vec::Vectorized<float>& x) {
  const __m256 nonzero = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_OQ);
  const __m256 sign = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN)));
  return _mm256_and_ps(_mm256_or_ps(sign, _mm256_set1_ps(1.0f)), nonzero);
}
#endif

// a·b + c rounded once, lane by lane, as the scalar af_fma rounds it.  at::vec::fmadd
// is a true FMA only where the ISA has one (AVX2/AVX512 builds); the baseline
// build's fmadd is a·b + c, so it goes lane by lane through std::fma there.
template <typename S>
inline at::vec::Vectorized<S> af_fma(const at::vec::Vectorized<S>& a,
                                     const at::vec::Vectorized<S>& b,
                                     const at::vec::Vectorized<S>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  using V = at::vec::Vectorized<S>;
  S x[V::size()], y[V::size()], z[V::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t k = 0; k < V::size(); ++k) x[k] = std::fma(x[k], y[k], z[k]);
  return V::loadu(x);
#endif
}

}  // namespace amos_fused

#include "../step_math.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include "root_division.h"

namespace amos_fused {

// A root divisor of float lanes (AfRootDivisor in step_math.h): d and
// y = RN(1/d), for root_division.h.  (A template over the capability's vector
// type: each SIMD build has its own.)
template <typename V>
struct AfVecRootDivisor {
  V d, y;
  bool by_reciprocal = false;
  AfVecRootDivisor() = default;
  AfVecRootDivisor(const V& divisor) : d(divisor) {  // implicit, as the plain T it stands for
#if defined(CPU_CAPABILITY_AVX512)
    const float s = _mm512_cvtss_f32(divisor);  // (every lane holds d)
#else
    const float s = _mm256_cvtss_f32(divisor);
#endif
    y = V(1.0f / s);
    by_reciprocal = divides_roots_by_reciprocal(s);
  }
};

template <>
struct AfRootDivisorOf<at::vec::Vectorized<float>> {
  using type = AfVecRootDivisor<at::vec::Vectorized<float>>;
};

// x / d, x a square root: rounded as the divide instruction rounds it.
inline at::vec::Vectorized<float> operator/(const at::vec::Vectorized<float>& x,
                                            const AfVecRootDivisor<at::vec::Vectorized<float>>& d) {
  if (__builtin_expect(!d.by_reciprocal, 0)) return x / d.d;  // (rare: the reciprocal's path is laid out inline)
  return divide_root(x, d.d, d.y);
}

}  // namespace amos_fused
#endif
