// The start of every step op, the same on every device: find the algorithm's
// contract, check the bucket and the op's arguments, read the GradScaler inputs
// and, unless found_inf skips the step, compute every tensor's coefficients at the
// next step counts.  It writes nothing: run_step launches, then advances the
// step counters.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "amos_layout.h"
#include "checks.h"
#include "contracts.h"
#include "stochastic_round.h"

namespace amos_fused {

// Every step counter (float32 CPU scalars) plus one, in float32 as torch.optim
// adds it; nothing is written (commit_steps writes them after the launch).
inline std::vector<double> next_steps(at::TensorList steps) {
  std::vector<double> out;
  out.reserve(steps.size());
  for (const at::Tensor& s : steps) out.push_back(static_cast<double>(*s.data_ptr<float>() + 1.0f));
  return out;
}

// Advances every step counter by one, once the kernels were launched: a launch
// that raises leaves the counters as they were.
inline void commit_steps(at::TensorList steps) {
  for (const at::Tensor& s : steps) *s.data_ptr<float>() += 1.0f;
}

// A per-tensor list of an op (etas, init_norms) has one value per param.
inline void check_per_tensor(const char* op, at::TensorList params, size_t count, const char* name) {
  TORCH_CHECK_VALUE(count == params.size(), op, ": ", params.size(), " params but ", count, " ", name);
}

// The optional telemetry output of a step: Σθ² and Σ(Δθ)² per param, of the
// values as stored (θ after the step, Δθ = θ_after − θ_before), each tensor's
// sum taken in a fixed order (blocks cut from the tensor's own start, combined
// in order), so it is bitwise the same for any thread count.  Checked here,
// before any write.
inline void check_telemetry(const char* op, at::TensorList params, const std::optional<at::Tensor>& telemetry) {
  if (!telemetry) return;
  const at::Tensor& t = *telemetry;
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == n && t.size(1) == 2 &&
                        t.is_contiguous(),
                    op, ": telemetry must be a contiguous float64 tensor of shape [", n, ", 2], got ",
                    t.scalar_type(), " of shape ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(n == 0 || t.device() == params[0].device(), op, ": telemetry is on ", t.device(),
                    ", the params on ", params[0].device());
}

// Stochastic rounding (csrc/stochastic_round.h) is asked for with one key per
// param, and only of bfloat16 params.
inline void check_round_keys(const char* op, at::TensorList params, at::OptionalIntArrayRef round_keys) {
  if (!round_keys) return;
  TORCH_CHECK_VALUE(round_keys->size() == params.size(), op, ": ", params.size(), " params but ",
                    round_keys->size(), " round_keys");
  TORCH_CHECK_VALUE(params.empty() || params[0].scalar_type() == at::kBFloat16, op,
                    ": stochastic rounding (round_keys) applies to bfloat16 params, got ",
                    params[0].scalar_type());
}

// One checked step of algorithm A, handed to a backend's launch(): the lists in
// the contract's order (a disabled state's list is empty), the hyper-parameters
// and every tensor's coefficients.
template <typename A>
struct StepCall {
  const char* op;
  at::TensorList params, grads;
  std::array<at::TensorList, kMaxStateLists> states;
  typename A::Hyper hyper;
  std::vector<CoefRow<A>> coef;        // per tensor
  std::vector<double> per_tensor;      // η or ‖ε0‖ per tensor; empty when the algorithm has none
  std::vector<double> steps;           // per tensor, after the increment
  std::vector<AmosLayout> layouts;     // Amos: per tensor
  double* telemetry = nullptr;         // [n][Σθ², Σ(Δθ)²] (check_telemetry) or null
  std::vector<StochasticRound> round;  // per tensor with stochastic rounding, else empty
  at::TensorList low_params;           // written from the params (float32 masters), or empty
  // A capturable step (run_capturable_step): `coef` and `steps` stay empty; the
  // coefficients are the rows of a [n][device_width] float64 table on the
  // params' device, and `skip` is GradScaler's found_inf there (or null).
  const double* device_columns = nullptr;
  int64_t device_width = 0;
  const float* skip = nullptr;

  const StochasticRound* round_or_null() const { return round.empty() ? nullptr : round.data(); }
};

inline std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

// A step call of algorithm A with its hyper-parameters read (checked against
// the contract's count); its state lists are filled by the caller.
template <typename A>
StepCall<A> new_step_call(at::TensorList params, at::TensorList grads, at::ArrayRef<double> hyper) {
  const Contract& c = contract_of<A>();
  TORCH_CHECK_VALUE(hyper.size() == c.hyper.size(), c.op, ": expected ", c.hyper.size(),
                    " hyper-parameters (", joined(c.hyper), "), got ", hyper.size());
  StepCall<A> call{c.op, params, grads};
  call.hyper = A::Hyper::read(hyper.data());
  return call;
}

// The op's per-tensor values (one per param where the algorithm has them, else
// none) checked, and Amos's slot layouts read into the call (amos_layout.h).
template <typename A>
void check_per_tensor_and_layouts(StepCall<A>& call, at::ArrayRef<double> per_tensor) {
  const Contract& c = contract_of<A>();
  if (c.per_tensor != nullptr) {
    check_per_tensor(c.op, call.params, per_tensor.size(), c.per_tensor);
  } else {
    TORCH_CHECK_VALUE(per_tensor.empty(), c.op, ": takes no per-tensor values, got ", per_tensor.size());
  }
  if constexpr (std::is_same_v<A, AmosAlgorithm>) {
    call.layouts = amos_slot_layouts(c.op, call.params, call.states[0], call.states[1]);
  }
}

// The rest of a step's prologue, once the bucket and its states are checked:
// the per-tensor values, Amos's slot layouts, telemetry, round keys and the
// backend's own checks, then (unless found_inf skips the step) the coefficients
// at the next step counts.  Writes nothing.
template <typename A, typename DeviceChecks>
std::optional<StepCall<A>> finish_step(StepCall<A> call, at::TensorList steps,
                                       at::ArrayRef<double> per_tensor,
                                       const std::optional<at::Tensor>& grad_scale,
                                       const std::optional<at::Tensor>& found_inf,
                                       const std::optional<at::Tensor>& telemetry,
                                       at::OptionalIntArrayRef round_keys,
                                       const DeviceChecks& device_checks) {
  const Contract& c = contract_of<A>();
  const char* op = c.op;
  const at::TensorList params = call.params;
  const size_t n = params.size();
  check_per_tensor_and_layouts(call, per_tensor);
  check_telemetry(op, params, telemetry);
  check_round_keys(op, params, round_keys);
  if (n > 0) device_checks(op, params);
  const GradScaling scaling = read_grad_scaling(op, grad_scale, found_inf);
  if (scaling.skip) return std::nullopt;
  if (telemetry && n > 0) call.telemetry = telemetry->data_ptr<double>();
  call.steps = next_steps(steps);
  if (round_keys && n > 0) {
    for (size_t t = 0; t < n; ++t) {
      call.round.push_back({static_cast<uint64_t>((*round_keys)[t]), static_cast<uint32_t>(call.steps[t])});
    }
  }
  call.per_tensor.assign(per_tensor.begin(), per_tensor.end());
  call.coef.reserve(n);
  const bool float32_math = n > 0 && params[0].scalar_type() != at::kDouble;
  for (size_t t = 0; t < n; ++t) {
    call.coef.push_back(A::coefficients(call.hyper, per_tensor.empty() ? 0.0 : per_tensor[t],
                                        call.steps[t], scaling.unscale));
    if (float32_math) lerp_form_in_float32(call.coef.back());
  }
  return call;
}

// Cuts the op's flat `states` into the call's state lists (the contract's, those
// enabled by the hyper-parameters); returns those shaped like the params, named,
// for check_bucket (Amos's slot lists are checked by amos_slot_layouts).
template <typename A>
std::vector<NamedList> slice_states(StepCall<A>& call, at::TensorList states, at::ArrayRef<double> hyper) {
  const Contract& c = contract_of<A>();
  const char* op = c.op;
  const size_t n = call.params.size();
  std::vector<NamedList> like_params;
  size_t used = 0;
  for (size_t k = 0; k < c.states.size(); ++k) {
    const StateSpec& spec = c.states[k];
    bool enabled = true;
    for (size_t h = 0; spec.enabled_by != nullptr && h < c.hyper.size(); ++h) {
      if (c.hyper[h] == spec.enabled_by) enabled = hyper[h] != 0.0;
    }
    if (!enabled) continue;
    TORCH_CHECK_VALUE(states.size() >= (used + 1) * n, op, ": ", spec.list, " are required (",
                      states.size(), " state tensors for ", n, " params)");
    call.states[k] = states.slice(used * n, n);
    if (!spec.slot) like_params.emplace_back(spec.list, call.states[k]);
    ++used;
  }
  TORCH_CHECK_VALUE(states.size() == used * n, op, ": expected ", used, " state lists of ", n,
                    " tensors, got ", states.size(), " state tensors");
  return like_params;
}

// Checks a step call of algorithm A against its contract and, unless found_inf
// skips the step, computes the coefficients at the next step counts.  Writes
// nothing: the caller launches, then commit_steps.
// `device_checks(op, params)`: the backend's own checks, run before any write.
template <typename A, typename DeviceChecks>
std::optional<StepCall<A>> begin_step(at::TensorList params, at::TensorList grads,
                                      at::TensorList states, at::TensorList steps,
                                      at::ArrayRef<double> hyper, at::ArrayRef<double> per_tensor,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf,
                                      const std::optional<at::Tensor>& telemetry,
                                      at::OptionalIntArrayRef round_keys,
                                      const DeviceChecks& device_checks,
                                      at::TensorList low_params = {}) {
  const char* op = contract_of<A>().op;
  StepCall<A> call = new_step_call<A>(params, grads, hyper);
  const size_t n = params.size();
  const std::vector<NamedList> like_params = slice_states(call, states, hyper);
  TORCH_CHECK_VALUE(!steps.empty() || n == 0, op, ": steps are required");
  if (low_params.empty()) {
    check_bucket(op, params, grads, like_params, steps);
  } else {  // the grads belong to the low params; the float32 masters carry the states
    TORCH_CHECK_VALUE(!round_keys.has_value(), op, ": low_params and round_keys exclude each other");
    check_low_params(op, params, grads, low_params, steps);
    check_bucket(op, params, params, like_params, steps);
    call.low_params = low_params;
  }
  return finish_step(std::move(call), steps, per_tensor, grad_scale, found_inf, telemetry, round_keys,
                     device_checks);
}

// The prologue of a capturable step (run_capturable_step): the bucket and its
// states checked as begin_step does (no step counters: they live on the device
// and the caller advances them), `coef` a contiguous float64 [n][columns] table
// of the contract's columns on the params' device, `found_inf` a one-element
// float32 tensor there.  Reads no tensor's values on the host; writes nothing.
template <typename A, typename CapturableChecks>
StepCall<A> begin_capturable_step(at::TensorList params, at::TensorList grads, at::TensorList states,
                                  at::ArrayRef<double> hyper, at::ArrayRef<double> per_tensor,
                                  const at::Tensor& coef, const std::optional<at::Tensor>& found_inf,
                                  const CapturableChecks& capturable_checks) {
  const Contract& c = contract_of<A>();
  const char* op = c.op;
  StepCall<A> call = new_step_call<A>(params, grads, hyper);
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<NamedList> like_params = slice_states(call, states, hyper);
  check_bucket(op, params, grads, like_params, {});
  check_per_tensor_and_layouts(call, per_tensor);
  const int64_t width = static_cast<int64_t>(c.columns.size());
  TORCH_CHECK_VALUE(coef.scalar_type() == at::kDouble && coef.dim() == 2 && coef.size(0) == n &&
                        coef.size(1) == width && coef.is_contiguous(),
                    op, ": coef must be a contiguous float64 tensor of shape [", n, ", ", width, "], got ",
                    coef.scalar_type(), " of shape ", coef.sizes(), coef.is_contiguous() ? "" : " (not contiguous)");
  if (n == 0) return call;
  capturable_checks(op, params);
  TORCH_CHECK_VALUE(coef.device() == params[0].device(), op, ": coef is on ", coef.device(), ", the params on ",
                    params[0].device());
  if (found_inf) {
    const at::Tensor& f = *found_inf;
    TORCH_CHECK_VALUE(f.scalar_type() == at::kFloat && f.numel() == 1 && f.device() == params[0].device(), op,
                      ": found_inf must be a one-element float32 tensor on ", params[0].device(), ", got ",
                      f.scalar_type(), " of shape ", f.sizes(), " on ", f.device());
    call.skip = f.data_ptr<float>();
  }
  call.device_columns = coef.data_ptr<double>();
  call.device_width = width;
  call.per_tensor.assign(per_tensor.begin(), per_tensor.end());
  return call;
}

// Declares, in a backend's namespace, its launch of every algorithm with kernels
// of its own, and of every elementwise algorithm (its generic walk, defined by the
// backend).  Backend: device_checks(op, params), and launch() forwarding to these.
#define AF_DECLARE_BACKEND_LAUNCHES                                        \
  void launch(const StepCall<AdamAlgorithm>& call);                        \
  void launch(const StepCall<RAdamAlgorithm>& call);                       \
  void launch(const StepCall<AmosAlgorithm>& call);                        \
  void launch(const StepCall<ScaledAdamAlgorithm>& call);                  \
  void launch(const StepCall<LambAlgorithm>& call);                        \
  template <typename A, typename = std::enable_if_t<kIsElementwise<A>>>  \
  void launch(const StepCall<A>& call);

// The step op of a backend: Backend::device_checks(op, params),
// Backend::launch(const StepCall<A>&) for every algorithm A and
// Backend::writes_low_params<A>() (whether its launch takes low_params).
template <typename Backend>
void run_step(c10::string_view algorithm, at::TensorList params, at::TensorList grads,
              at::TensorList states, at::TensorList steps, at::ArrayRef<double> hyper,
              at::ArrayRef<double> per_tensor, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& telemetry,
              at::OptionalIntArrayRef round_keys, const std::optional<at::TensorList>& low_params) {
  with_algorithm(algorithm, [&](auto traits) {
    using A = decltype(traits);
    TORCH_CHECK_VALUE(!low_params || Backend::template writes_low_params<A>(), contract_of<A>().op,
                      ": low_params (master weights written in the same pass) are not supported by this "
                      "backend for this algorithm");
    TORCH_CHECK_VALUE(!low_params || low_params->size() == params.size(), contract_of<A>().op, ": ",
                      params.size(), " params but ", low_params ? low_params->size() : 0, " low_params");
    auto call = begin_step<A>(params, grads, states, steps, hyper, per_tensor, grad_scale, found_inf,
                              telemetry, round_keys, &Backend::device_checks,
                              low_params ? *low_params : at::TensorList{});
    if (!call) {  // skipped by found_inf: nothing moved
      if (telemetry) telemetry->select(1, 1).zero_();
      return;
    }
    // -- every check passed: from here on we write --
    if (!params.empty()) Backend::launch(*call);
    commit_steps(steps);
  });
}

// The capturable step op of a backend (capturable=True): begin_capturable_step,
// then Backend::launch; Backend::capturable_checks(op, params) are its device
// checks.  No telemetry, stochastic rounding or low params: those need the host.
template <typename Backend>
void run_capturable_step(c10::string_view algorithm, at::TensorList params, at::TensorList grads,
                         at::TensorList states, at::ArrayRef<double> hyper, at::ArrayRef<double> per_tensor,
                         const at::Tensor& coef, const std::optional<at::Tensor>& found_inf) {
  with_algorithm(algorithm, [&](auto traits) {
    using A = decltype(traits);
    const StepCall<A> call = begin_capturable_step<A>(params, grads, states, hyper, per_tensor, coef, found_inf,
                                                      &Backend::capturable_checks);
    // -- every check passed: from here on we write --
    if (!params.empty()) Backend::launch(call);
  });
}

}  // namespace amos_fused
