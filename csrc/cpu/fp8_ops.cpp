// The CPU step op of the optimizers with block-scaled FP8 states
// (csrc/fp8_states.h): the shared prologue with the FP8 state lists checked in
// place of full-precision ones, then one launch of cpu/fp8_kernel.h.
#include <torch/library.h>

#include "../fp8_states.h"
#include "step_launch.h"

namespace amos_fused::cpu {
namespace {

// The algorithms with FP8 states, their state lists and the list stored as sqrt.
template <typename A>
struct Fp8Traits;
template <>
struct Fp8Traits<AdamAlgorithm> {
  static constexpr Fp8Algorithm kKind = Fp8Algorithm::kAdam;
  static constexpr const char* kLists[2] = {"exp_avg", "exp_avg_sq"};
  static constexpr int64_t kStates = 2;
};
template <>
struct Fp8Traits<LionAlgorithm> {
  static constexpr Fp8Algorithm kKind = Fp8Algorithm::kLion;
  static constexpr const char* kLists[2] = {"exp_avg", ""};
  static constexpr int64_t kStates = 1;
};

template <typename A>
void run_fp8_step(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                  at::TensorList steps, at::ArrayRef<double> hyper,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys) {
  using Traits = Fp8Traits<A>;
  StepCall<A> call = new_step_call<A>(params, grads, hyper);
  const char* op = call.op;
  const size_t n = params.size();
  if constexpr (std::is_same_v<A, AdamAlgorithm>) {
    TORCH_CHECK_VALUE(call.hyper.amsgrad == 0, op, ": amsgrad is not supported with FP8 states");
  }
  TORCH_CHECK_VALUE(codes.size() == Traits::kStates * n && absmax.size() == Traits::kStates * n, op, ": expected ",
                    Traits::kStates, " lists of ", n, " codes and of ", n, " absmax tensors, got ",
                    codes.size(), " and ", absmax.size());
  TORCH_CHECK_VALUE(!steps.empty() || n == 0, op, ": steps are required");
  check_bucket(op, params, grads, {}, steps);
  TORCH_CHECK_TYPE(params[0].scalar_type() != at::kDouble, op,
                   ": FP8 states are kept for float32, bfloat16 and float16 params, got float64");
  std::vector<at::TensorList> code_lists, absmax_lists;
  for (int64_t k = 0; k < Traits::kStates; ++k) {
    code_lists.push_back(codes.slice(k * n, n));
    absmax_lists.push_back(absmax.slice(k * n, n));
  }
  const auto bad = find_fp8_problem(params, code_lists, absmax_lists);
  if (bad.first >= 0) {
    const bool is_codes = bad.second < Traits::kStates;
    const int64_t k = is_codes ? bad.second : bad.second - Traits::kStates;
    const at::Tensor& t = (is_codes ? code_lists : absmax_lists)[k][bad.first];
    const at::Tensor& p = params[bad.first];
    TORCH_CHECK_VALUE(false, op, ": ", Traits::kLists[k], is_codes ? " codes[" : " absmax[", bad.first, "] (",
                      t.scalar_type(), " ", t.sizes(), " on ", t.device(), ") does not fit its param (",
                      p.scalar_type(), " ", p.sizes(), " on ", p.device(), "): expected ",
                      is_codes ? "uint8 codes with the param's shape and strides"
                               : "a contiguous float32 tensor of one absmax per block of 256");
  }
  auto ready = finish_step(std::move(call), steps, {}, grad_scale, found_inf, telemetry, round_keys,
                           [](const char*, at::TensorList) {});
  if (!ready) {  // skipped by found_inf: nothing moved
    if (telemetry) telemetry->select(1, 1).zero_();
    return;
  }
  // -- every check passed: from here on we write --
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<void*> param(n), grad(n);
  std::vector<uint8_t*> code_ptr[2];
  std::vector<float*> absmax_ptr[2];
  for (size_t i = 0; i < n; ++i) {
    offsets[i + 1] = offsets[i] + params[i].numel();
    param[i] = params[i].data_ptr();
    grad[i] = grads[i].data_ptr();
  }
  Fp8Launch launch{{params[0].scalar_type(), static_cast<int64_t>(n), offsets.data()},
                   param.data(), const_cast<const void* const*>(grad.data()), {}, {}, Traits::kKind,
                   ready->coef.data(), false, ready->telemetry, ready->round_or_null()};
  for (int64_t k = 0; k < Traits::kStates; ++k) {
    for (size_t i = 0; i < n; ++i) {
      code_ptr[k].push_back(code_lists[k][i].data_ptr<uint8_t>());
      absmax_ptr[k].push_back(absmax_lists[k][i].data_ptr<float>());
    }
    launch.codes[k] = code_ptr[k].data();
    launch.absmax[k] = absmax_ptr[k].data();
  }
  if constexpr (std::is_same_v<A, AdamAlgorithm>) {
    launch.l2 = ready->hyper.decoupled == 0 && ready->hyper.weight_decay != 0.0;
  }
  active_kernels().fp8(launch);
  commit_steps(steps);
}

void step_fp8(c10::string_view algorithm, at::TensorList params, at::TensorList grads, at::TensorList codes,
              at::TensorList absmax, at::TensorList steps, at::ArrayRef<double> hyper,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys) {
  with_algorithm_in(Fp8Algorithms{}, algorithm, [&](auto traits) {
    run_fp8_step<decltype(traits)>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf,
                                   telemetry, round_keys);
  });
}

}  // namespace
}  // namespace amos_fused::cpu

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("step_fp8", &amos_fused::cpu::step_fp8); }
