// Stochastic rounding of bfloat16 params in the CUDA kernels (the semantics and
// the hash are csrc/stochastic_round.h's, used as they are): the kernels that
// write θ round its float32 value to a bfloat16 value with the random bits of
// (tensor key, step, element index) just before the store, and telemetry sums the
// rounded value.  A compile-time variant of each such kernel (ROUND = true, only
// instantiated for bfloat16 storage); without it ParamRounding<false> is the
// identity and reads nothing.
// Per tensor the table holds a RoundKey: key, step and the hash's per-tensor part
// for pair_hi = 0, so an element costs one lowbias32 (pair indices ≥ 2^32
// recompute the per-tensor part from key and step, read from the table again).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "../stochastic_round.h"

namespace amos_fused::cuda {

// One tensor's stochastic rounding at this step, as the device table holds it.
struct RoundKey {
  uint64_t key;
  uint32_t step;
  uint32_t base;  // round_base(key, step, 0)
};
static_assert(sizeof(RoundKey) == 16, "RoundKey: 16 bytes per tensor");

inline RoundKey round_key(const StochasticRound& r) { return {r.key, r.step, round_base(r.key, r.step, 0)}; }

// Off: θ is stored as computed (round to nearest by the store's conversion).
template <bool ROUND>
struct ParamRounding {
  __device__ __forceinline__ ParamRounding(const RoundKey*, int64_t) {}
  template <typename Op>
  __device__ __forceinline__ Op operator()(Op x, int64_t) const {
    return x;
  }
};

// On: x (θ of element e of the tensor, float32) rounded to a bfloat16 value.
template <>
struct ParamRounding<true> {
  const RoundKey* entry;
  uint32_t base;

  __device__ __forceinline__ ParamRounding(const RoundKey* table, int64_t tensor)
      : entry(table + tensor), base(table[tensor].base) {}

  __device__ __forceinline__ float operator()(float x, int64_t e) const {
    const uint64_t pair = static_cast<uint64_t>(e) >> 1;
    const uint32_t half = (static_cast<uint32_t>(e) & 1u) << 4;  // element_bits: the odd element's high half
    const uint32_t hi = static_cast<uint32_t>(pair >> 32);
    const uint32_t b = hi == 0 ? base : round_base(entry->key, entry->step, hi);
    return round_to_bfloat16(x, round_bits(b, static_cast<uint32_t>(pair)) >> half);
  }
};

// Host side: calls f(std::true_type) when the params are bfloat16 and `rounds`,
// else f(std::false_type), so the ROUND variants exist for bfloat16 only.
template <typename scalar_t, typename F>
void with_rounding(const char* op, bool rounds, const F& f) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (rounds) {
      f(std::true_type{});
      return;
    }
  } else {
    TORCH_CHECK(!rounds, op, ": stochastic rounding applies to bfloat16 params only");
  }
  f(std::false_type{});
}

}  // namespace amos_fused::cuda
