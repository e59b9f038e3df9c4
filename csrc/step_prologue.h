// The start of every step op, the same on every device: check the bucket, run the
// op's own checks, read the GradScaler inputs and, unless found_inf skips the
// step, advance the step counters.  Nothing is written before it returns a value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "checks.h"

namespace amos_fused {

// A state list of an op; an optional one may be empty (a state this call does not use).
struct StateList {
  const char* name;
  at::TensorList tensors;
  bool required = true;
};

struct StepStart {
  double grad_unscale;        // 1 / GradScaler scale, or 1
  std::vector<double> steps;  // every tensor's step count, after the increment
};

// Advances every step counter (float32 CPU scalars) by one, in float32 as torch.optim
// does; returns the new values.
inline std::vector<double> advance_steps(at::TensorList steps) {
  std::vector<double> out;
  out.reserve(steps.size());
  for (const at::Tensor& s : steps) {
    float* value = s.data_ptr<float>();
    *value += 1.0f;
    out.push_back(static_cast<double>(*value));
  }
  return out;
}

// `more()`: the op's own checks (its device, slot layouts, per-tensor lists), run
// after the bucket's and before anything is written.  Returns nullopt when
// found_inf says to skip the step: then nothing at all is written.
template <typename More>
std::optional<StepStart> start_step(const char* op, at::TensorList params, at::TensorList grads,
                                    std::initializer_list<StateList> states, at::TensorList steps,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf, const More& more) {
  std::vector<NamedList> named;
  for (const StateList& state : states) {
    TORCH_CHECK_VALUE(!state.required || !state.tensors.empty(), op, ": ", state.name, " are required");
    named.emplace_back(state.name, state.tensors);
  }
  TORCH_CHECK_VALUE(!steps.empty(), op, ": steps are required");
  check_bucket(op, params, grads, named, steps);
  more();
  const GradScaling scaling = read_grad_scaling(op, grad_scale, found_inf);
  if (scaling.skip) return std::nullopt;
  return StepStart{scaling.unscale, advance_steps(steps)};
}

// A per-tensor list of an op (etas, init_norms) has one value per param.
inline void check_per_tensor(const char* op, at::TensorList params, size_t count, const char* name) {
  TORCH_CHECK_VALUE(count == params.size(), op, ": ", params.size(), " params but ", count, " ", name);
}

}  // namespace amos_fused
