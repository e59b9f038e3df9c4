// Input checks shared by every op, run before anything is written.  They look
// only at tensor metadata, so they serve every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

namespace amos_fused {

// What is wrong with a gradient, as reported by check_grads (0 = nothing).
enum class GradProblem : int64_t {
  kNone = 0,
  kSparse = 1,
  kDtype = 2,
  kDevice = 3,
  kShape = 4,
  kLayout = 5,  // same shape, but strides other than the param's
};

GradProblem grad_problem(const at::Tensor& param, const at::Tensor& grad);

// (number of missing grads, index of the first bad grad or -1, its GradProblem)
std::tuple<int64_t, int64_t, int64_t> check_grads(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads);

using NamedList = std::pair<const char*, at::TensorList>;

// Checks one bucket before a kernel runs: params dense, of one supported dtype
// and one device; every grad and state tensor shaped and laid out like its
// param; steps are float32 scalars on the CPU.  `states` may hold empty lists
// (state not used by this call).
void check_bucket(const char* op, at::TensorList params, at::TensorList grads,
                  std::initializer_list<NamedList> states, at::TensorList steps);

// GradScaler inputs of a step, read on the host: skip the step when found_inf is
// non-zero; otherwise multiply grads by `unscale` (1 without a scale).  Checks
// that each given tensor is a one-element floating tensor.
struct GradScaling {
  bool skip;
  double unscale;
};
GradScaling read_grad_scaling(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf);

}  // namespace amos_fused
