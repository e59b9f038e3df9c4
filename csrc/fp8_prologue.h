// The start of the step op of the optimizers with block-scaled FP8 states
// (csrc/fp8_states.h), the same on every device: the shared prologue
// (csrc/step_prologue.h) with the FP8 state lists checked in place of
// full-precision ones.  Writes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "fp8_states.h"
#include "step_prologue.h"

namespace amos_fused {

// The algorithms with FP8 states (contracts.h: Fp8Algorithms): their state lists,
// in the order of the op's codes and absmax lists.
template <typename A>
struct Fp8States;
template <>
struct Fp8States<AdamAlgorithm> {
  static constexpr const char* kLists[2] = {"exp_avg", "exp_avg_sq"};  // m; sqrt(v)
  static constexpr int64_t kCount = 2;
};
template <>
struct Fp8States<RAdamAlgorithm> {
  static constexpr const char* kLists[2] = {"exp_avg", "exp_avg_sq"};  // m; sqrt(v)
  static constexpr int64_t kCount = 2;
};
template <>
struct Fp8States<LionAlgorithm> {
  static constexpr const char* kLists[2] = {"exp_avg", ""};
  static constexpr int64_t kCount = 1;
};
template <>
struct Fp8States<AmosAlgorithm> {  // the momentum; v and b stay full precision (the op's `states`)
  static constexpr const char* kLists[2] = {"mu", ""};
  static constexpr int64_t kCount = 1;
};

// A checked FP8 step: the StepCall (no full-precision states) and the code and
// absmax lists, one per state.
template <typename A>
struct Fp8StepCall {
  StepCall<A> call;
  std::vector<at::TensorList> codes, absmax;
};

// Checks a step_fp8 call of algorithm A and, unless found_inf skips the step
// (then nullopt), computes the coefficients at the next step counts.  `states`
// and `per_tensor`: Amos's full-precision slots (vs, then bs) and etas; empty for
// the others.
template <typename A>
std::optional<Fp8StepCall<A>> begin_fp8_step(at::TensorList params, at::TensorList grads, at::TensorList codes,
                                             at::TensorList absmax, at::TensorList steps,
                                             at::ArrayRef<double> hyper,
                                             const std::optional<at::Tensor>& grad_scale,
                                             const std::optional<at::Tensor>& found_inf,
                                             const std::optional<at::Tensor>& telemetry,
                                             at::OptionalIntArrayRef round_keys,
                                             at::TensorList low_params = {}, at::TensorList states = {},
                                             at::ArrayRef<double> per_tensor = {}) {
  using States = Fp8States<A>;
  StepCall<A> call = new_step_call<A>(params, grads, hyper);
  const char* op = call.op;
  const size_t n = params.size();
  if constexpr (std::is_same_v<A, AdamAlgorithm>) {
    TORCH_CHECK_VALUE(call.hyper.amsgrad == 0, op, ": amsgrad is not supported with FP8 states");
  }
  if constexpr (std::is_same_v<A, AmosAlgorithm>) {
    TORCH_CHECK_VALUE(call.hyper.use_momentum != 0, op,
                      ": the FP8 step keeps Amos's momentum in FP8; without momentum there is none "
                      "(use the step op)");
    TORCH_CHECK_VALUE(states.size() == 2 * n, op, ": expected 2 lists of ", n, " slot tensors (vs, bs), got ",
                      states.size(), " state tensors");
    call.states[0] = states.slice(0, n);
    call.states[1] = states.slice(n, n);
  } else {
    TORCH_CHECK_VALUE(states.empty(), op, ": takes no full-precision states with FP8 states, got ",
                      states.size());
  }
  TORCH_CHECK_VALUE(codes.size() == States::kCount * n && absmax.size() == States::kCount * n, op,
                    ": expected ", States::kCount, " lists of ", n, " codes and of ", n,
                    " absmax tensors, got ", codes.size(), " and ", absmax.size());
  TORCH_CHECK_VALUE(!steps.empty() || n == 0, op, ": steps are required");
  if (low_params.empty()) {
    check_bucket(op, params, grads, {}, steps);
  } else {  // float32 masters; the grads belong to the low params (step_prologue.h: begin_step)
    TORCH_CHECK_VALUE(!round_keys.has_value(), op, ": low_params and round_keys exclude each other");
    check_low_params(op, params, grads, low_params, steps);
    check_bucket(op, params, params, {}, steps);
    call.low_params = low_params;
  }
  TORCH_CHECK_TYPE(params[0].scalar_type() != at::kDouble, op,
                   ": FP8 states are kept for float32, bfloat16 and float16 params, got float64");
  Fp8StepCall<A> out;
  for (int64_t k = 0; k < States::kCount; ++k) {
    out.codes.push_back(codes.slice(k * n, n));
    out.absmax.push_back(absmax.slice(k * n, n));
  }
  const auto bad = find_fp8_problem(params, out.codes, out.absmax);
  if (bad.first >= 0) {
    const bool is_codes = bad.second < States::kCount;
    const int64_t k = is_codes ? bad.second : bad.second - States::kCount;
    const at::Tensor& t = (is_codes ? out.codes : out.absmax)[k][bad.first];
    const at::Tensor& p = params[bad.first];
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", States::kLists[k],
                is_codes ? " codes[" : " absmax[", bad.first, "] is an inference tensor, which cannot be updated ",
                "in place outside inference mode");
    TORCH_CHECK_VALUE(false, op, ": ", States::kLists[k], is_codes ? " codes[" : " absmax[", bad.first, "] (",
                      t.scalar_type(), " ", t.sizes(), " on ", t.device(), ") does not fit its param (",
                      p.scalar_type(), " ", p.sizes(), " on ", p.device(), "): expected ",
                      is_codes ? "uint8 codes with the param's shape and strides"
                               : "a contiguous float32 tensor of one absmax per block of 256");
  }
  auto ready = finish_step(std::move(call), steps, per_tensor, grad_scale, found_inf, telemetry, round_keys,
                           [](const char*, at::TensorList) {});
  if (!ready) return std::nullopt;
  out.call = std::move(*ready);
  return out;
}

}  // namespace amos_fused
