// Stochastic rounding of float32 results to bfloat16 params (torchao's
// bf16_stochastic_round): add a random 16-bit integer to the float32 bit pattern
// and drop the low 16 bits, so E[rounded] = the exact value and updates smaller
// than half a bfloat16 ulp are not lost on average.
//
// The random bits are a counter-based hash of (tensor key, step, element index),
// never a stateful generator: the same on every backend and for any thread count.
// One copy per language: here (CPU and CUDA), amos_fused/stochastic_round.py
// (reference), amos_fused/triton_kernels/common.py (Triton).
//   key     = seed << 32 | the param's index in the optimizer (set by Python)
//   pair    = element >> 1            (elements 2k and 2k + 1 share one hash word)
//   base    = h(key_lo ^ h(key_hi ^ h(step ^ h(pair >> 32))))
//   word    = h(base ^ (pair & 0xffffffff))
//   bits    = word & 0xffff for an even element, word >> 16 for an odd one
//   rounded = bits_of(x) + bits, low 16 bits cleared (NaN kept as is)
// with h = lowbias32 (C. Wellons' integer hash, a bijection of 32-bit words) and
// `element` the element's index in the param's memory order.  A rounding needs
// 16 random bits, so one 32-bit word serves two elements (half a hash each).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AF_HOST_DEVICE inline
#endif

namespace amos_fused {

AF_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The part of the hash shared by the elements of one tensor at one step whose
// pair indices have the same high word.
AF_HOST_DEVICE uint32_t round_base(uint64_t key, uint32_t step, uint32_t pair_hi) {
  return lowbias32(static_cast<uint32_t>(key) ^
                   lowbias32(static_cast<uint32_t>(key >> 32) ^ lowbias32(step ^ lowbias32(pair_hi))));
}

// The hash word of a pair of elements.
AF_HOST_DEVICE uint32_t round_bits(uint32_t base, uint32_t pair_lo) { return lowbias32(base ^ pair_lo); }

// Element `element`'s 16 random bits: its half of its pair's word.
AF_HOST_DEVICE uint32_t element_bits(uint32_t word, uint64_t element) {
  return (element & 1u) ? word >> 16 : word & 0xffffu;
}

// x rounded to a bfloat16 value with the random `bits` (still a float, exactly
// representable in bfloat16); NaN is returned unchanged.
AF_HOST_DEVICE float round_to_bfloat16(float x, uint32_t bits) {
  if (x != x) return x;
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u = (u + (bits & 0xffffu)) & 0xffff0000u;
  float y;
  std::memcpy(&y, &u, sizeof(y));
  return y;
}

// One tensor's stochastic rounding at this step.
struct StochasticRound {
  uint64_t key;
  uint32_t step;
};

}  // namespace amos_fused
