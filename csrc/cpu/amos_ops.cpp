// CPU entry point of the Amos op: check the bucket, work out each tensor's slot
// layout from its param and slot shapes (csrc/amos_layout.h), advance the steps,
// run the kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../amos_layout.h"
#include "../step_coefficients.h"
#include "../step_prologue.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
namespace {

constexpr const char* kOp = "amos_fused.amos_step";

void amos_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs,
                   at::TensorList bs, at::TensorList mus, at::TensorList steps,
                   at::ArrayRef<double> etas, double lr, double beta, std::optional<double> momentum,
                   std::optional<double> clip_value, double extra_l2, double d_coef, double c_coef,
                   double epsilon, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  std::vector<AmosLayout> layouts;
  const auto start = start_step(kOp, params, grads, {{"mus", momentum ? mus : at::TensorList(), bool(momentum)}},
                                steps, grad_scale, found_inf, [&] {
                                  check_per_tensor(kOp, params, etas.size(), "etas");
                                  layouts = amos_slot_layouts(kOp, params, vs, bs);
                                });
  if (!start) return;
  const size_t n = params.size();
  // -- every check passed: from here on we write --
  std::vector<int64_t> offsets(n + 1, 0), general;
  std::vector<void*> param(n), grad(n), v(n), b(n), mu(n, nullptr);
  std::vector<AmosCoef<double>> coef;
  coef.reserve(n);
  const AmosHyper hyper{lr,     beta,   momentum.value_or(0.0), clip_value.value_or(0.0), extra_l2,
                        d_coef, c_coef, epsilon,                start->grad_unscale};
  for (size_t i = 0; i < n; ++i) {
    const bool is_general = layouts[i].row_len == 0 && params[i].numel() > 0;
    if (is_general) general.push_back(static_cast<int64_t>(i));
    offsets[i + 1] = offsets[i] + (is_general ? 0 : params[i].numel());
    param[i] = params[i].data_ptr();
    grad[i] = grads[i].data_ptr();
    v[i] = vs[i].data_ptr();
    b[i] = bs[i].data_ptr();
    if (momentum) mu[i] = mus[i].data_ptr();
    coef.push_back(amos_coefficients(hyper, etas[i], start->steps[i]));
  }
  AmosLaunch launch{{params[0].scalar_type(), static_cast<int64_t>(n), offsets.data()},
                    param.data(),
                    const_cast<const void* const*>(grad.data()),
                    v.data(),
                    b.data(),
                    mu.data(),
                    coef.data(),
                    layouts.data(),
                    general.data(),
                    static_cast<int64_t>(general.size()),
                    momentum.has_value(),
                    clip_value.has_value()};
  active_kernels().amos(launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("amos_step", &amos_step_cpu); }

}  // namespace amos_fused::cpu
