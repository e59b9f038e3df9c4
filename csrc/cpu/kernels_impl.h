// The CPU kernels of every algorithm: only how each walks its streams; the math
// is in csrc/step_math.h.  Included once per instruction set by
// cpu/kernels_<isa>.cpp, which defines CPU_CAPABILITY (and its flags) first.
#pragma once

#include <ATen/Dispatch.h>

#include <utility>

#include "amos_kernel.h"
#include "bucket_loop.h"
#include "fp8_step.h"
#include "norm_scaled_kernel.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, bool AMSGRAD, bool L2, typename Low>
void adam_typed(const AdamLaunch& L) {
  for_each_tracked_segment(L.bucket, L.telemetry, [&](int64_t t, int64_t begin, int64_t end, Telemetry* sums) {
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
          begin, end, update, sums, L.round ? &L.round[t] : nullptr, low_stream<Low>(L.bucket, t));
    } else {
      map_streams<scalar_t, 4, 0b1101u>(
          {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
           stream<scalar_t>(L.exp_avg, t), stream<scalar_t>(L.exp_avg_sq, t)},
          begin, end, update, sums, L.round ? &L.round[t] : nullptr, low_stream<Low>(L.bucket, t));
    }
  });
}

inline void adam_kernel(const AdamLaunch& L) {
  dispatch_streams(L.bucket, "amos_fused_adam", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    using Low = decltype(low);
    if (L.amsgrad) {
      L.l2 ? adam_typed<scalar_t, true, true, Low>(L) : adam_typed<scalar_t, true, false, Low>(L);
    } else {
      L.l2 ? adam_typed<scalar_t, false, true, Low>(L) : adam_typed<scalar_t, false, false, Low>(L);
    }
  });
}

template <typename scalar_t, bool L2, typename Low>
void radam_typed(const RAdamLaunch& L) {
  for_each_tracked_segment(L.bucket, L.telemetry, [&](int64_t t, int64_t begin, int64_t end, Telemetry* sums) {
    const TileCoef<RAdamCoef, scalar_t> coef(L.coef[t]);
    map_streams<scalar_t, 4, 0b1101u>(
        {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t),
         stream<scalar_t>(L.exp_avg, t), stream<scalar_t>(L.exp_avg_sq, t)},
        begin, end, [&](auto& x) {
          using V = typename std::decay_t<decltype(x)>::value_type;
          radam_update<L2>(x[0], x[1], x[2], x[3], coef.template get<V>());
        }, sums, L.round ? &L.round[t] : nullptr, low_stream<Low>(L.bucket, t));
  });
}

inline void radam_kernel(const RAdamLaunch& L) {
  dispatch_streams(L.bucket, "amos_fused_radam", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    using Low = decltype(low);
    L.l2 ? radam_typed<scalar_t, true, Low>(L) : radam_typed<scalar_t, false, Low>(L);
  });
}

// Any elementwise algorithm A (csrc/contracts.h): its streams walked tile by
// tile, A::update on each.
template <typename A, typename scalar_t, typename Low, size_t... S>
void elementwise_typed(const ElementwiseLaunch& L, std::index_sequence<S...>) {
  const auto* coefs = static_cast<const typename A::template CoefOf<double>*>(L.coef);
  for_each_tracked_segment(L.bucket, L.telemetry, [&](int64_t t, int64_t begin, int64_t end, Telemetry* sums) {
    const TileCoef<A::template CoefOf, scalar_t> coef(coefs[t]);
    map_streams<scalar_t, A::kStreams, A::kWriteMask>(
        {stream<scalar_t>(L.param, t), stream<scalar_t>(L.grad, t), stream<scalar_t>(L.states[S], t)...},
        begin, end, [&](auto& x) {
          using V = typename std::decay_t<decltype(x)>::value_type;
          A::update(x, coef.template get<V>());
        }, sums, L.round ? &L.round[t] : nullptr, low_stream<Low>(L.bucket, t));
  });
}

template <typename A>
void elementwise_kernel(const ElementwiseLaunch& L) {
  dispatch_streams(L.bucket, "amos_fused_elementwise", [&](auto storage, auto low) {
    elementwise_typed<A, decltype(storage), decltype(low)>(L, std::make_index_sequence<A::kStreams - 2>());
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {
template <typename... A>
KernelTable make_kernel_table(const char* label, TypeList<A...>) {
  return {label, &adam_kernel, &radam_kernel, &amos_kernel, &norm_scaled_phase1,
          &norm_scaled_phase2, {&elementwise_kernel<A>...}, &fp8_kernel};
}
}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu

#define AMOS_FUSED_DEFINE_KERNEL_TABLE(getter, label)                                      \
  const amos_fused::cpu::KernelTable& amos_fused::cpu::getter() {                           \
    static const KernelTable table = make_kernel_table(label, ElementwiseAlgorithms{});  \
    return table;                                                                          \
  }
