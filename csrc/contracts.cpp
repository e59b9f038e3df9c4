// The contracts of the algorithms, and the two ops that hand them to Python
// (registered in ops.cpp): the description (`contract`) and the shared prologue
// of a step (`begin_step`, used by the Triton backend: the same checks, step
// advance and coefficients as the CPU and CUDA ops, returned as a table).
#include "contracts.h"

#include <ATen/ATen.h>

#include <tuple>

#include "step_prologue.h"

namespace amos_fused {
namespace {

template <typename A>
Contract make_contract(const char* name, const char* op, std::vector<StateSpec> states,
                       const char* per_tensor) {
  return {A::kId, name, op, std::move(states), per_tensor, A::Hyper::names(),
          CoefColumns<typename A::Coef>::names()};
}

const std::vector<Contract>& contracts() {
  static const std::vector<Contract> all = {
      make_contract<AdamAlgorithm>("adam", "amos_fused.adam_step",
                                   {{"exp_avg", "exp_avgs", false, nullptr},
                                    {"exp_avg_sq", "exp_avg_sqs", false, nullptr},
                                    {"max_exp_avg_sq", "max_exp_avg_sqs", false, "amsgrad"}},
                                   nullptr),
      make_contract<RAdamAlgorithm>("radam", "amos_fused.radam_step",
                                    {{"exp_avg", "exp_avgs", false, nullptr},
                                     {"exp_avg_sq", "exp_avg_sqs", false, nullptr}},
                                    nullptr),
      make_contract<LionAlgorithm>("lion", "amos_fused.lion_step",
                                   {{"exp_avg", "exp_avgs", false, nullptr}}, nullptr),
      make_contract<AmosAlgorithm>("amos", "amos_fused.amos_step",
                                   {{"v", "vs", true, nullptr},
                                    {"b", "bs", true, nullptr},
                                    {"mu", "mus", false, "use_momentum"}},
                                   "etas"),
      make_contract<ScaledAdamAlgorithm>("scaled_adam", "amos_fused.scaled_adam_step",
                                         {{"exp_avg", "exp_avgs", false, nullptr},
                                          {"exp_avg_sq", "exp_avg_sqs", false, nullptr}},
                                         "init_norms"),
      make_contract<LambAlgorithm>("lamb", "amos_fused.lamb_step",
                                   {{"exp_avg", "exp_avgs", false, nullptr},
                                    {"exp_avg_sq", "exp_avg_sqs", false, nullptr}},
                                   nullptr),
  };
  return all;
}

}  // namespace

// (hyper, state keys, the flag enabling each state or "", per-tensor value or none, columns)
ContractNames contract_op(c10::string_view algorithm) {
  const Contract& c = find_contract(algorithm);
  std::vector<std::string> keys, flags, per_tensor;
  for (const StateSpec& spec : c.states) {
    keys.emplace_back(spec.key);
    flags.emplace_back(spec.enabled_by != nullptr ? spec.enabled_by : "");
  }
  if (c.per_tensor != nullptr) per_tensor.emplace_back(c.per_tensor);
  return {c.hyper, keys, flags, per_tensor, c.columns};
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

// (whether to run the kernels, the coefficient table): false when found_inf skips
// the step, and then nothing was written.
std::tuple<bool, at::Tensor> begin_step_op(c10::string_view algorithm, at::TensorList params,
                                           at::TensorList grads, at::TensorList states,
                                           at::TensorList steps, at::ArrayRef<double> hyper,
                                           at::ArrayRef<double> per_tensor,
                                           const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& found_inf) {
  const Contract& c = find_contract(algorithm);
  return with_algorithm(c, [&](auto traits) -> std::tuple<bool, at::Tensor> {
    using A = decltype(traits);
    const auto call = begin_step<A>(c, params, grads, states, steps, hyper, per_tensor, grad_scale,
                                    found_inf, [](const char*, at::TensorList) {});
    if (!call) return {false, coefficient_table(std::vector<typename A::Coef>(), c.columns.size())};
    return {true, coefficient_table(call->coef, c.columns.size())};
  });
}

const Contract& find_contract(c10::string_view name) {
  for (const Contract& c : contracts()) {
    if (name == c.name) return c;
  }
  std::string known;
  for (const Contract& c : contracts()) known += (known.empty() ? "" : ", ") + std::string(c.name);
  TORCH_CHECK_VALUE(false, "amos_fused: unknown algorithm '", std::string(name), "' (known: ", known, ")");
}

}  // namespace amos_fused
