// The CUDA step op (csrc/step_prologue.h's run_step): after the shared prologue,
// one launch per algorithm over the whole bucket: the generic elementwise launch
// below, or the algorithm's own (cuda/*.cu).  Every launch fills the call's
// telemetry when it has one (telemetry.cuh) and stores bfloat16 params with
// stochastic rounding when the call has round keys (param_rounding.cuh).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <type_traits>
#include <vector>

#include "../step_prologue.h"
#include "multi_tensor_apply.cuh"
#include "op_support.h"

namespace amos_fused::cuda {

AF_DECLARE_BACKEND_LAUNCHES

struct Backend {
  // CUDA params, and not under CUDA graph capture.
  static void device_checks(const char* op, at::TensorList params) { cuda_checks(op, params)(); }
  // A capturable step: CUDA params (it may run under CUDA graph capture).
  static void capturable_checks(const char* op, at::TensorList params) { cuda_capturable_checks(op, params); }
  // Master weights are written by a second pass (amos_fused/master_weights.py).
  template <typename A>
  static constexpr bool writes_low_params() { return false; }
  template <typename A>
  static void launch(const StepCall<A>& call) {
    cuda::launch(call);
  }
};

// The call's coefficients in the kernels' math type, runs of equal rows folded
// (a capturable call's: placeholders filled on the device, op_support.h).
template <typename Op, template <typename> class Coef, typename A>
CoefTable<Coef<Op>> opmath_coefficients(const StepCall<A>& call) {
  if (call.device_columns != nullptr) {
    return device_coefficient_table<Coef<Op>>(call.params.size(), call.device_columns, call.device_width, call.skip);
  }
  using Columns = CoefColumns<Coef<double>>;
  const size_t width = Columns::names().size();
  std::vector<double> rows(call.coef.size() * width);
  for (size_t t = 0; t < call.coef.size(); ++t) Columns::store(call.coef[t], rows.data() + t * width);
  return fold_coefficients<Coef<Op>>(
      call.coef.size(),
      [&](size_t t) { return std::vector<double>(rows.begin() + t * width, rows.begin() + (t + 1) * width); },
      [&](size_t t) { return to_opmath<Op>(call.coef[t]); });
}

template <typename A>
struct AlgorithmElement {
  template <typename Op, int S>
  __device__ __forceinline__ void operator()(Op (&x)[S], const typename A::template CoefOf<Op>& c) const {
    A::update(x, c);
  }
};

template <typename A, typename>
void launch(const StepCall<A>& call) {
  constexpr int S = A::kStreams;
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  std::array<at::TensorList, S> arrays;
  arrays[0] = call.params;
  arrays[1] = call.grads;
  for (int s = 2; s < S; ++s) arrays[s] = call.states[s - 2];
  const TableKey key = table_key(call.op, call.params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, call.params[0].scalar_type(), "amos_fused_elementwise_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<typename A::template CoefOf<Op>> coefs = opmath_coefficients<Op, A::template CoefOf>(call);
    ElementwisePlan<typename A::template CoefOf<Op>, S> plan(call.op, arrays, coefs, call.round_or_null());
    launch_elementwise<scalar_t, S, A::kWriteMask>(key, plan, AlgorithmElement<A>{}, call.telemetry);
  });
}

}  // namespace amos_fused::cuda
