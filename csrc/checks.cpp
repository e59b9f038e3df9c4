#include "checks.h"

#include <c10/util/Exception.h>

namespace amos_fused {

GradProblem grad_problem(const at::Tensor& param, const at::Tensor& grad) {
  if (grad.is_sparse() || grad.layout() != c10::kStrided) return GradProblem::kSparse;
  if (grad.scalar_type() != param.scalar_type()) return GradProblem::kDtype;
  if (grad.device() != param.device()) return GradProblem::kDevice;
  if (grad.sizes() != param.sizes()) return GradProblem::kShape;
  if (grad.numel() > 1 && grad.strides() != param.strides()) return GradProblem::kLayout;
  return GradProblem::kNone;
}

std::tuple<int64_t, int64_t, int64_t> check_grads(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads) {
  TORCH_CHECK_VALUE(static_cast<size_t>(params.size()) == grads.size(),
                    "amos_fused: ", params.size(), " params but ", grads.size(), " grads");
  int64_t missing = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> grad = grads.get(i);
    if (!grad.has_value() || !grad->defined()) {
      ++missing;
      continue;
    }
    const GradProblem problem = grad_problem(params[i], *grad);
    if (problem != GradProblem::kNone)
      return {missing, static_cast<int64_t>(i), static_cast<int64_t>(problem)};
  }
  return {missing, -1, 0};
}

namespace {

bool supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void check_bucket(const char* op, at::TensorList params, at::TensorList grads,
                  std::initializer_list<NamedList> states, at::TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(n > 0, op, ": empty bucket");
  TORCH_CHECK_VALUE(grads.size() == n, op, ": ", n, " params but ", grads.size(), " grads");
  const at::Tensor& first = params[0];
  TORCH_CHECK_TYPE(supported_dtype(first.scalar_type()), op, ": params of dtype ",
                   first.scalar_type(), " are not supported (float32, float64, bfloat16, float16)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(p.scalar_type() == first.scalar_type(), op, ": params[", i, "] has dtype ",
                     p.scalar_type(), " but params[0] has ", first.scalar_type());
    TORCH_CHECK_VALUE(p.device() == first.device(), op, ": params[", i, "] is on ", p.device(),
                      " but params[0] is on ", first.device());
    TORCH_CHECK_VALUE(p.is_non_overlapping_and_dense(), op, ": params[", i,
                      "] is not dense in memory (a strided view?)");
    TORCH_CHECK_VALUE(grad_problem(p, grads[i]) == GradProblem::kNone, op, ": grads[", i,
                      "] (", grads[i].scalar_type(), " ", grads[i].sizes(), " on ", grads[i].device(),
                      ") does not match its param (", p.scalar_type(), " ", p.sizes(), " on ",
                      p.device(), ")");
  }
  for (const NamedList& state : states) {
    if (state.second.empty()) continue;
    TORCH_CHECK_VALUE(state.second.size() == n, op, ": ", n, " params but ", state.second.size(),
                      " ", state.first);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& s = state.second[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK_VALUE(s.scalar_type() == p.scalar_type() && s.device() == p.device() &&
                            s.sizes() == p.sizes() && (s.numel() <= 1 || s.strides() == p.strides()),
                        op, ": ", state.first, "[", i, "] (", s.scalar_type(), " ", s.sizes(),
                        " on ", s.device(), ") does not match its param (", p.scalar_type(), " ",
                        p.sizes(), " on ", p.device(), ")");
    }
  }
  if (!steps.empty()) {
    TORCH_CHECK_VALUE(steps.size() == n, op, ": ", n, " params but ", steps.size(), " steps");
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& s = steps[i];
      TORCH_CHECK_VALUE(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                        op, ": steps[", i, "] must be a float32 CPU scalar, got ", s.scalar_type(),
                        " ", s.sizes(), " on ", s.device());
    }
  }
}

GradScaling read_grad_scaling(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  GradScaling out{false, 1.0};
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->is_floating_point(), op,
                      ": found_inf must be a one-element floating tensor, got ",
                      found_inf->scalar_type(), " ", found_inf->sizes());
    out.skip = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->is_floating_point(), op,
                      ": grad_scale must be a one-element floating tensor, got ",
                      grad_scale->scalar_type(), " ", grad_scale->sizes());
    out.unscale = 1.0 / grad_scale->item<double>();
  }
  return out;
}

}  // namespace amos_fused
