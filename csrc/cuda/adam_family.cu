// CUDA launches of Adam / AdamW and RAdam: one elementwise launch
// per bucket (multi_tensor_apply.cuh); the per-element math is step_math.h's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "step_launch.h"

namespace amos_fused::cuda {
namespace {

// Arrays: p, g, m, v (, vmax).
template <bool AMSGRAD, bool L2>
struct AdamElement {
  template <typename Op, int S>
  __device__ __forceinline__ void operator()(Op (&x)[S], const AdamCoef<Op>& c) const {
    adam_update<AMSGRAD, L2>(x[0], x[1], x[2], x[3], x[S - 1], c);
  }
};

// Arrays: p, g, m, v.
template <bool L2>
struct RAdamElement {
  template <typename Op>
  __device__ __forceinline__ void operator()(Op (&x)[4], const RAdamCoef<Op>& c) const {
    radam_update<L2>(x[0], x[1], x[2], x[3], c);
  }
};

}  // namespace

void launch(const StepCall<AdamAlgorithm>& call) {
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  const at::TensorList params = call.params;
  const bool amsgrad = call.hyper.amsgrad != 0;
  const bool l2 = call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0;
  const TableKey key = table_key(call.op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_adam_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<AdamCoef<Op>> coefs = opmath_coefficients<Op, AdamCoef>(call);
    with_flag(l2, [&](auto l2_flag) {
      if (amsgrad) {
        ElementwisePlan<AdamCoef<Op>, 5> plan(
            call.op, {params, call.grads, call.states[0], call.states[1], call.states[2]}, coefs,
            call.round_or_null());
        launch_elementwise<scalar_t, 5, 0b11101u>(key, plan, AdamElement<true, decltype(l2_flag)::value>{},
                                                  call.telemetry);
      } else {
        ElementwisePlan<AdamCoef<Op>, 4> plan(call.op, {params, call.grads, call.states[0], call.states[1]},
                                              coefs, call.round_or_null());
        launch_elementwise<scalar_t, 4, 0b1101u>(key, plan, AdamElement<false, decltype(l2_flag)::value>{},
                                                 call.telemetry);
      }
    });
  });
}

void launch(const StepCall<RAdamAlgorithm>& call) {
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  const at::TensorList params = call.params;
  const bool l2 = call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0;
  const TableKey key = table_key(call.op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_radam_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<RAdamCoef<Op>> coefs = opmath_coefficients<Op, RAdamCoef>(call);
    ElementwisePlan<RAdamCoef<Op>, 4> plan(call.op, {params, call.grads, call.states[0], call.states[1]},
                                           coefs, call.round_or_null());
    with_flag(l2, [&](auto l2_flag) {
      launch_elementwise<scalar_t, 4, 0b1101u>(key, plan, RAdamElement<decltype(l2_flag)::value>{}, call.telemetry);
    });
  });
}

}  // namespace amos_fused::cuda
