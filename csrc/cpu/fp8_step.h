// The CPU step of the optimizers with block-scaled FP8 states: each algorithm's
// update handed to the block walk (fp8_kernel.h; Amos: fp8_amos_kernel.h).
#pragma once

#include <vector>

#include "fp8_amos_kernel.h"
#include "fp8_kernel.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, typename Low>
void fp8_typed(const Fp8Launch& L) {
  if (L.algorithm == Fp8Algorithm::kAmos) {
    if (L.amos->clip) amos_fp8_typed<scalar_t, true, Low>(L); else amos_fp8_typed<scalar_t, false, Low>(L);
    return;
  }
  if (L.algorithm == Fp8Algorithm::kLion) {
    const auto* coefs = static_cast<const LionCoef<double>*>(L.coef);
    TileCoefs<LionCoef, scalar_t> coef(coefs, coefs + L.bucket.num_tensors);
    fp8_blocks<scalar_t, 1, 0b0u, Low>(L, [&](int64_t t, int64_t, int64_t) {
      return [&c = coef[t]](auto& x, int64_t) {
        using V = typename std::decay_t<decltype(x)>::value_type;
        lion_update(x[0], x[1], x[2], c.template get<V>());
      };
    });
    return;
  }
  if (L.algorithm == Fp8Algorithm::kRAdam) {
    const auto* coefs = static_cast<const RAdamCoef<double>*>(L.coef);
    TileCoefs<RAdamCoef, scalar_t> coef(coefs, coefs + L.bucket.num_tensors);
    auto run = [&](auto l2) {
      fp8_blocks<scalar_t, 2, 0b10u, Low>(L, [&](int64_t t, int64_t, int64_t) {
        return [&c = coef[t]](auto& x, int64_t) {
          using V = typename std::decay_t<decltype(x)>::value_type;
          x[3] = radam_update<decltype(l2)::value>(x[0], x[1], x[2], x[3], c.template get<V>());  // sqrt(v) stored
        };
      });
    };
    if (L.l2) run(std::true_type{}); else run(std::false_type{});
    return;
  }
  const auto* coefs = static_cast<const AdamCoef<double>*>(L.coef);
  TileCoefs<AdamCoef, scalar_t> coef(coefs, coefs + L.bucket.num_tensors);
  auto run = [&](auto l2) {
    fp8_blocks<scalar_t, 2, 0b10u, Low>(L, [&](int64_t t, int64_t, int64_t) {
      return [&c = coef[t]](auto& x, int64_t) {
        using V = typename std::decay_t<decltype(x)>::value_type;
        x[3] = adam_update<false, decltype(l2)::value>(x[0], x[1], x[2], x[3], x[3], c.template get<V>());  // sqrt(v) stored
      };
    });
  };
  if (L.l2) run(std::true_type{}); else run(std::false_type{});
}

inline void fp8_kernel(const Fp8Launch& L) {
  dispatch_streams(L.bucket, "amos_fused_fp8", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "amos_fused: FP8 states are not kept for float64 params");
    } else {
      fp8_typed<scalar_t, decltype(low)>(L);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
