// CPU entry points of the Adam-family ops: check the bucket, advance the step
// counters, compute the per-tensor scalars, run one fused pass over the bucket.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../step_coefficients.h"
#include "../step_prologue.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
namespace {

// Addresses and prefix sums of one bucket, gathered after start_step's checks passed.
struct BucketTables {
  std::vector<int64_t> offsets;
  std::vector<void*> param, grad, state0, state1, state2;

  BucketTables(at::TensorList params, at::TensorList grads, at::TensorList s0,
               at::TensorList s1 = {}, at::TensorList s2 = {}) {
    const size_t n = params.size();
    offsets.resize(n + 1, 0);
    for (size_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + params[i].numel();
    gather(param, params);
    gather(grad, grads);
    gather(state0, s0);
    gather(state1, s1);
    gather(state2, s2);
  }

  BucketView view(c10::ScalarType dtype) const {
    return {dtype, static_cast<int64_t>(offsets.size() - 1), offsets.data()};
  }

 private:
  static void gather(std::vector<void*>& out, at::TensorList list) {
    out.reserve(list.size());
    for (const at::Tensor& t : list) out.push_back(t.data_ptr());
  }
};

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool amsgrad, bool bias_correction,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const auto start = start_step(
      "amos_fused.adam_step", params, grads,
      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList(), amsgrad}},
      steps, grad_scale, found_inf, [] {});
  if (!start) return;
  const AdamHyper hyper{lr,        beta1,   beta2,           eps,
                        weight_decay, decoupled, amsgrad, bias_correction,
                        start->grad_unscale};
  const BucketTables tables(params, grads, exp_avgs, exp_avg_sqs,
                            amsgrad ? max_exp_avg_sqs : at::TensorList());
  std::vector<AdamCoef<double>> coef;
  for (double step : start->steps) coef.push_back(adam_coefficients(hyper, step));
  AdamLaunch launch{tables.view(params[0].scalar_type()),
                    tables.param.data(),
                    const_cast<const void* const*>(tables.grad.data()),
                    tables.state0.data(),
                    tables.state1.data(),
                    tables.state2.data(),
                    coef.data(),
                    amsgrad,
                    !decoupled && weight_decay != 0.0};
  active_kernels().adam(launch);
}

void radam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled,
                    double rectify_threshold, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const auto start = start_step("amos_fused.radam_step", params, grads,
                                {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps,
                                grad_scale, found_inf, [] {});
  if (!start) return;
  const RAdamHyper hyper{lr,        beta1, beta2, eps, weight_decay, rectify_threshold,
                         decoupled, start->grad_unscale};
  const BucketTables tables(params, grads, exp_avgs, exp_avg_sqs);
  std::vector<RAdamCoef<double>> coef;
  for (double step : start->steps) coef.push_back(radam_coefficients(hyper, step));
  RAdamLaunch launch{tables.view(params[0].scalar_type()),
                     tables.param.data(),
                     const_cast<const void* const*>(tables.grad.data()),
                     tables.state0.data(),
                     tables.state1.data(),
                     coef.data(),
                     !decoupled && weight_decay != 0.0};
  active_kernels().radam(launch);
}

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList steps, double lr, double beta1, double beta2, double weight_decay,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  // Lion's update does not depend on t; the counter is kept for checkpoints.
  const auto start = start_step("amos_fused.lion_step", params, grads, {{"exp_avgs", exp_avgs}}, steps,
                                grad_scale, found_inf, [] {});
  if (!start) return;
  const BucketTables tables(params, grads, exp_avgs);
  LionLaunch launch{tables.view(params[0].scalar_type()), tables.param.data(),
                    const_cast<const void* const*>(tables.grad.data()), tables.state0.data(),
                    lion_coefficients({lr, beta1, beta2, weight_decay, start->grad_unscale})};
  active_kernels().lion(launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("radam_step", &radam_step_cpu);
  m.impl("lion_step", &lion_step_cpu);
}

}  // namespace amos_fused::cpu
