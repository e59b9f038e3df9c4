// The contracts of the algorithms, and the two ops that hand them to Python
// (registered in ops.cpp): the description (`contract`) and the shared prologue
// of a step (`begin_step`, used by the Triton backend: the same checks, step
// advance and coefficients as the CPU and CUDA ops, returned as a table).
#include "contracts.h"

#include <ATen/ATen.h>

#include <tuple>

#include "amos_layout.h"
#include "fp8_prologue.h"
#include "step_prologue.h"

namespace amos_fused {

namespace {
template <typename... A>
std::vector<std::string> names_of(TypeList<A...>) {
  return {A::kName...};
}
}  // namespace

std::vector<std::string> algorithms_op() { return names_of(Algorithms{}); }

std::vector<std::string> fp8_algorithms_op() { return names_of(Fp8Algorithms{}); }
std::vector<std::string> cuda_fp8_algorithms_op() { return names_of(CudaFp8Algorithms{}); }

std::vector<std::string> master_algorithms_op() { return names_of(MasterAlgorithms{}); }

// (hyper, state keys, the flag enabling each state or "", per-tensor value or none, columns)
ContractNames contract_op(c10::string_view algorithm) {
  ContractNames out;
  with_algorithm(algorithm, [&](auto traits) {
    const Contract& c = contract_of<decltype(traits)>();
    std::vector<std::string> keys, flags, per_tensor;
    for (const StateSpec& spec : c.states) {
      keys.emplace_back(spec.key);
      flags.emplace_back(spec.enabled_by != nullptr ? spec.enabled_by : "");
    }
    if (c.per_tensor != nullptr) per_tensor.emplace_back(c.per_tensor);
    out = {c.hyper, keys, flags, per_tensor, c.columns};
  });
  return out;
}

namespace {

// The coefficients of every tensor as rows of a float64 CPU table.
template <typename Coef>
at::Tensor coefficient_table(const std::vector<Coef>& coef, size_t columns) {
  at::Tensor table = at::empty({static_cast<int64_t>(coef.size()), static_cast<int64_t>(columns)},
                               at::TensorOptions().dtype(at::kDouble));
  double* row = table.data_ptr<double>();
  for (const Coef& c : coef) row += CoefColumns<Coef>::store(c, row);
  return table;
}

}  // namespace

// (whether to run the kernels, the coefficient table at the next step counts):
// false when found_inf skips the step.  Writes nothing: the caller launches, then
// advances the step counters by one (in float32).
std::tuple<bool, at::Tensor> begin_step_op(c10::string_view algorithm, at::TensorList params,
                                           at::TensorList grads, at::TensorList states,
                                           at::TensorList steps, at::ArrayRef<double> hyper,
                                           at::ArrayRef<double> per_tensor,
                                           const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& found_inf,
                                           const std::optional<at::Tensor>& telemetry,
                                           at::OptionalIntArrayRef round_keys) {
  std::tuple<bool, at::Tensor> out;
  with_algorithm(algorithm, [&](auto traits) {
    using A = decltype(traits);
    const size_t width = contract_of<A>().columns.size();
    const auto call = begin_step<A>(params, grads, states, steps, hyper, per_tensor, grad_scale,
                                    found_inf, telemetry, round_keys, [](const char*, at::TensorList) {});
    if (!call && telemetry) telemetry->select(1, 1).zero_();  // skipped: nothing moved
    out = call ? std::make_tuple(true, coefficient_table(call->coef, width))
               : std::make_tuple(false, coefficient_table(std::vector<CoefRow<A>>(), width));
  });
  return out;
}

void advance_steps_op(at::TensorList steps) {
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK_VALUE(is_step_counter(steps[i]), "amos_fused.advance_steps: steps[", i,
                      "] must be a finite float32 CPU scalar >= 0");
  commit_steps(steps);
}

// begin_step for the FP8-state step (csrc/fp8_prologue.h): the same checks and
// coefficients as step_fp8, nothing written.
std::tuple<bool, at::Tensor> begin_step_fp8_op(c10::string_view algorithm, at::TensorList params,
                                               at::TensorList grads, at::TensorList codes,
                                               at::TensorList absmax, at::TensorList steps,
                                               at::ArrayRef<double> hyper,
                                               const std::optional<at::Tensor>& grad_scale,
                                               const std::optional<at::Tensor>& found_inf,
                                               const std::optional<at::Tensor>& telemetry,
                                               at::OptionalIntArrayRef round_keys,
                                               const std::optional<at::TensorList>& states,
                                               const std::optional<at::ArrayRef<double>>& per_tensor) {
  std::tuple<bool, at::Tensor> out;
  with_algorithm_in(Fp8Algorithms{}, algorithm, [&](auto traits) {
    using A = decltype(traits);
    const size_t width = contract_of<A>().columns.size();
    const auto ready = begin_fp8_step<A>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf,
                                         telemetry, round_keys, {}, states ? *states : at::TensorList{},
                                         per_tensor ? *per_tensor : at::ArrayRef<double>{});
    if (!ready && telemetry) telemetry->select(1, 1).zero_();  // skipped: nothing moved
    out = ready ? std::make_tuple(true, coefficient_table(ready->call.coef, width))
                : std::make_tuple(false, coefficient_table(std::vector<CoefRow<A>>(), width));
  });
  return out;
}

at::Tensor amos_slot_layouts_op(c10::string_view op, at::TensorList params, at::TensorList vs,
                                at::TensorList bs) {
  const std::string name(op);
  const std::vector<AmosLayout> layouts = amos_slot_layouts(name.c_str(), params, vs, bs);
  constexpr int64_t kWidth = 4 + 2 * kAmosMaxDims;
  at::Tensor out = at::zeros({static_cast<int64_t>(layouts.size()), kWidth}, at::TensorOptions().dtype(at::kLong));
  int64_t* row = out.data_ptr<int64_t>();
  for (const AmosLayout& layout : layouts) {
    row[0] = layout.kind;
    row[1] = layout.num_slots;
    row[2] = layout.row_len;
    row[3] = layout.ndim;
    for (int d = 0; d < layout.ndim; ++d) {
      row[4 + d] = layout.sizes[d];
      row[4 + kAmosMaxDims + d] = layout.slot_strides[d];
    }
    row += kWidth;
  }
  return out;
}

}  // namespace amos_fused
