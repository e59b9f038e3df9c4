// The CPU kernels of every algorithm: only how each walks its streams; the math
// is in csrc/step_math.h.  Included once per instruction set by
// cpu/kernels_<isa>.cpp, which defines CPU_CAPABILITY (and its flags) first.
#pragma once

#include <ATen/Dispatch.h>

#include "amos_kernel.h"
#include "bucket_loop.h"
#include "norm_scaled_kernel.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, bool AMSGRAD, bool L2>
void adam_typed(const AdamLaunch& L) {
  for_each_segment(L.bucket, [&](int64_t t, int64_t begin, int64_t end) {
    const TileCoef<AdamCoef, scalar_t> coef(L.coef[t]);
    auto update = [&](auto& x) {
      using V = typename std::decay_t<decltype(x)>::value_type;
      const auto& c = coef.template get<V>();
      if constexpr (AMSGRAD) {
        adam_update<true, L2>(x[0], x[1], x[2], x[3], x[4], c);
      } else {
        adam_update<false, L2>(x[0], x[1], x[2], x[3], x[3], c);
      }
    };
    // streams: param, grad (read-only), exp_avg, exp_avg_sq[, max_exp_avg_sq]
    if constexpr (AMSGRAD) {
      map_streams<scalar_t, 5, 0b11101u>(
          {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
           stream<scalar_t>(L.exp_avg, t), stream<scalar_t>(L.exp_avg_sq, t),
           stream<scalar_t>(L.max_exp_avg_sq, t)},
          begin, end, update);
    } else {
      map_streams<scalar_t, 4, 0b1101u>(
          {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
           stream<scalar_t>(L.exp_avg, t), stream<scalar_t>(L.exp_avg_sq, t)},
          begin, end, update);
    }
  });
}

inline void adam_kernel(const AdamLaunch& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, L.bucket.dtype, "amos_fused_adam", [&] {
    if (L.amsgrad) {
      L.l2 ? adam_typed<scalar_t, true, true>(L) : adam_typed<scalar_t, true, false>(L);
    } else {
      L.l2 ? adam_typed<scalar_t, false, true>(L) : adam_typed<scalar_t, false, false>(L);
    }
  });
}

template <typename scalar_t, bool L2>
void radam_typed(const RAdamLaunch& L) {
  for_each_segment(L.bucket, [&](int64_t t, int64_t begin, int64_t end) {
    const TileCoef<RAdamCoef, scalar_t> coef(L.coef[t]);
    map_streams<scalar_t, 4, 0b1101u>(
        {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
         stream<scalar_t>(L.exp_avg, t), stream<scalar_t>(L.exp_avg_sq, t)},
        begin, end, [&](auto& x) {
          using V = typename std::decay_t<decltype(x)>::value_type;
          radam_update<L2>(x[0], x[1], x[2], x[3], coef.template get<V>());
        });
  });
}

inline void radam_kernel(const RAdamLaunch& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, L.bucket.dtype, "amos_fused_radam", [&] {
    L.l2 ? radam_typed<scalar_t, true>(L) : radam_typed<scalar_t, false>(L);
  });
}

template <typename scalar_t>
void lion_typed(const LionLaunch& L) {
  const TileCoef<LionCoef, scalar_t> coef(L.coef);
  for_each_segment(L.bucket, [&](int64_t t, int64_t begin, int64_t end) {
    map_streams<scalar_t, 3, 0b101u>(
        {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
         stream<scalar_t>(L.exp_avg, t)},
        begin, end, [&](auto& x) {
          using V = typename std::decay_t<decltype(x)>::value_type;
          lion_update(x[0], x[1], x[2], coef.template get<V>());
        });
  });
}

inline void lion_kernel(const LionLaunch& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, L.bucket.dtype, "amos_fused_lion", [&] {
    lion_typed<scalar_t>(L);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu

#define AMOS_FUSED_DEFINE_KERNEL_TABLE(getter, label)                              \
  const amos_fused::cpu::KernelTable& amos_fused::cpu::getter() {                   \
    static const KernelTable table{label, &adam_kernel, &radam_kernel, &lion_kernel, \
                                   &amos_kernel, &norm_scaled_phase1,               \
                                   &norm_scaled_phase2};                            \
    return table;                                                                  \
  }
