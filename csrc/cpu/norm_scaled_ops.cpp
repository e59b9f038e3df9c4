// CPU entry points of scale-aware Adam and LAMB: check, advance the
// steps, phase 1 (moments + per-tensor norms), per-tensor k and ρ, phase 2.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../step_coefficients.h"
#include "../step_prologue.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
namespace {

struct NormScaledBucket {
  std::vector<int64_t> offsets;
  std::vector<void*> param, grad, exp_avg, exp_avg_sq;
  std::vector<MomentCoef<double>> coef;
  std::vector<double> steps;

  NormScaledBucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const StepStart& start, double beta1, double beta2,
                   double eps, double weight_decay, bool bias_correction)
      : steps(start.steps) {
    const size_t n = params.size();
    offsets.assign(n + 1, 0);
    for (size_t i = 0; i < n; ++i) {
      offsets[i + 1] = offsets[i] + params[i].numel();
      param.push_back(params[i].data_ptr());
      grad.push_back(grads[i].data_ptr());
      exp_avg.push_back(exp_avgs[i].data_ptr());
      exp_avg_sq.push_back(exp_avg_sqs[i].data_ptr());
      coef.push_back(moment_coefficients(beta1, beta2, eps, weight_decay, bias_correction,
                                         start.grad_unscale, steps[i]));
    }
  }

  NormScaledLaunch launch(c10::ScalarType dtype, bool lamb) const {
    return {{dtype, static_cast<int64_t>(param.size()), offsets.data()},
            param.data(),
            const_cast<const void* const*>(grad.data()),
            const_cast<void* const*>(exp_avg.data()),
            const_cast<void* const*>(exp_avg_sq.data()),
            coef.data(),
            lamb};
  }
};

// Scale-aware Adam: θ ← θ − (α_t·u + ρ_t·θ), α_t = α0·‖ε0‖/‖u‖·s(t), ρ_t = α0²/(2q)·s(t).
void scaled_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::ArrayRef<double> init_norms, double lr, double beta1, double beta2,
                          double eps, double p, bool inverse_time, double q,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  const char* op = "amos_fused.scaled_adam_step";
  const auto start = start_step(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                                steps, grad_scale, found_inf,
                                [&] { check_per_tensor(op, params, init_norms.size(), "init_norms"); });
  if (!start) return;
  const size_t n = params.size();
  const NormScaledBucket bucket(params, grads, exp_avgs, exp_avg_sqs, *start, beta1, beta2, eps, 0.0, true);
  const NormScaledLaunch launch = bucket.launch(params[0].scalar_type(), false);
  std::vector<double> u_sq(n), theta_sq(n), k(n), rho(n);
  active_kernels().norm_scaled_phase1(launch, u_sq.data(), theta_sq.data());
  for (size_t t = 0; t < n; ++t) {
    const double s = scaled_schedule(lr, p, inverse_time, bucket.steps[t]);
    const double u_norm = std::sqrt(u_sq[t]);
    k[t] = u_norm > 0.0 ? lr * init_norms[t] * s / u_norm : 0.0;
    rho[t] = lr * lr / (2.0 * q) * s;
  }
  active_kernels().norm_scaled_phase2(launch, k.data(), rho.data());
}

// LAMB: θ ← θ − η·(‖θ‖/‖u‖)·u, u = m̂/(sqrt(v̂)+ε) + λθ, ratio 1 when a norm is 0.
void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool bias_correction,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const auto start = start_step("amos_fused.lamb_step", params, grads,
                                {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps, grad_scale,
                                found_inf, [] {});
  if (!start) return;
  const size_t n = params.size();
  const NormScaledBucket bucket(params, grads, exp_avgs, exp_avg_sqs, *start, beta1, beta2, eps,
                                weight_decay, bias_correction);
  const NormScaledLaunch launch = bucket.launch(params[0].scalar_type(), true);
  std::vector<double> u_sq(n), theta_sq(n), k(n), rho(n, 0.0);
  active_kernels().norm_scaled_phase1(launch, u_sq.data(), theta_sq.data());
  for (size_t t = 0; t < n; ++t) {
    const double u_norm = std::sqrt(u_sq[t]), theta_norm = std::sqrt(theta_sq[t]);
    k[t] = lr * (u_norm > 0.0 && theta_norm > 0.0 ? theta_norm / u_norm : 1.0);
  }
  active_kernels().norm_scaled_phase2(launch, k.data(), rho.data());
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) {
  m.impl("scaled_adam_step", &scaled_adam_step_cpu);
  m.impl("lamb_step", &lamb_step_cpu);
}

}  // namespace amos_fused::cpu
