// The CPU step op of the optimizers with block-scaled FP8 states
// (csrc/fp8_states.h): the FP8 prologue (csrc/fp8_prologue.h), then one launch
// of cpu/fp8_kernel.h.
#include <torch/library.h>

#include "../fp8_prologue.h"
#include "step_launch.h"

namespace amos_fused::cpu {
namespace {

template <typename A>
void run_fp8_step(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                  at::TensorList steps, at::ArrayRef<double> hyper,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys,
                  at::TensorList low_params, at::TensorList states, at::ArrayRef<double> per_tensor) {
  auto ready = begin_fp8_step<A>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf, telemetry,
                                 round_keys, low_params, states, per_tensor);
  if (!ready) {  // skipped by found_inf: nothing moved
    if (telemetry) telemetry->select(1, 1).zero_();
    return;
  }
  // -- every check passed: from here on we write --
  const StepCall<A>& call = ready->call;
  const size_t n = params.size();
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<void*> param(n), grad(n), low(low_params.size());
  std::vector<uint8_t*> code_ptr[2];
  std::vector<float*> absmax_ptr[2];
  for (size_t i = 0; i < n; ++i) {
    offsets[i + 1] = offsets[i] + params[i].numel();
    param[i] = params[i].data_ptr();
    grad[i] = grads[i].data_ptr();
  }
  for (size_t i = 0; i < low_params.size(); ++i) low[i] = low_params[i].data_ptr();
  const Fp8Algorithm kind = std::is_same_v<A, AdamAlgorithm>    ? Fp8Algorithm::kAdam
                            : std::is_same_v<A, RAdamAlgorithm> ? Fp8Algorithm::kRAdam
                            : std::is_same_v<A, AmosAlgorithm>  ? Fp8Algorithm::kAmos
                                                                : Fp8Algorithm::kLion;
  Fp8Launch launch{{params[0].scalar_type(), static_cast<int64_t>(n), offsets.data()},
                   param.data(), const_cast<const void* const*>(grad.data()), {}, {}, kind,
                   call.coef.data(), false, call.telemetry, call.round_or_null()};
  if (!low_params.empty()) {
    launch.bucket.low_dtype = low_params[0].scalar_type();
    launch.bucket.low_params = low.data();
  }
  for (size_t k = 0; k < ready->codes.size(); ++k) {
    for (size_t i = 0; i < n; ++i) {
      code_ptr[k].push_back(ready->codes[k][i].template data_ptr<uint8_t>());
      absmax_ptr[k].push_back(ready->absmax[k][i].template data_ptr<float>());
    }
    launch.codes[k] = code_ptr[k].data();
    launch.absmax[k] = absmax_ptr[k].data();
  }
  std::vector<void*> slot_v(n), slot_b(n);
  Fp8AmosSlots amos{};
  if constexpr (std::is_same_v<A, AmosAlgorithm>) {
    for (size_t i = 0; i < n; ++i) {
      slot_v[i] = call.states[0][i].data_ptr();
      slot_b[i] = call.states[1][i].data_ptr();
    }
    amos = {slot_v.data(), slot_b.data(), call.layouts.data(), call.hyper.clip != 0};
    launch.amos = &amos;
  } else if constexpr (!std::is_same_v<A, LionAlgorithm>) {
    launch.l2 = call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0;
  }
  active_kernels().fp8(launch);
  commit_steps(steps);
}
void step_fp8(c10::string_view algorithm, at::TensorList params, at::TensorList grads, at::TensorList codes,
              at::TensorList absmax, at::TensorList steps, at::ArrayRef<double> hyper,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys,
              const std::optional<at::TensorList>& low_params, const std::optional<at::TensorList>& states,
              const std::optional<at::ArrayRef<double>>& per_tensor) {
  TORCH_CHECK_VALUE(!low_params || low_params->size() == params.size(), "amos_fused.step_fp8: ", params.size(),
                    " params but ", low_params ? low_params->size() : 0, " low_params");
  with_algorithm_in(Fp8Algorithms{}, algorithm, [&](auto traits) {
    run_fp8_step<decltype(traits)>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf,
                                   telemetry, round_keys, low_params ? *low_params : at::TensorList{},
                                   states ? *states : at::TensorList{},
                                   per_tensor ? *per_tensor : at::ArrayRef<double>{});
  });
}

}  // namespace
}  // namespace amos_fused::cpu

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("step_fp8", &amos_fused::cpu::step_fp8); }
