// CUDA Adam / AdamW, RAdam and Lion: one elementwise launch
// per bucket (multi_tensor_apply.cuh); the per-element math is step_math.h's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../step_coefficients.h"
#include "../step_prologue.h"
#include "multi_tensor_apply.cuh"

namespace amos_fused::cuda {
namespace {

// Arrays: p, g, m, v (, vmax).
template <bool AMSGRAD, bool L2>
struct AdamElement {
  template <typename Op, int S>
  __device__ __forceinline__ void operator()(Op (&x)[S], const AdamCoef<Op>& c) const {
    adam_update<AMSGRAD, L2>(x[0], x[1], x[2], x[3], x[S - 1], c);
  }
};

// Arrays: p, g, m, v.
template <bool L2>
struct RAdamElement {
  template <typename Op>
  __device__ __forceinline__ void operator()(Op (&x)[4], const RAdamCoef<Op>& c) const {
    radam_update<L2>(x[0], x[1], x[2], x[3], c);
  }
};

// Arrays: p, g, m.
struct LionElement {
  template <typename Op>
  __device__ __forceinline__ void operator()(Op (&x)[3], const LionCoef<Op>& c) const {
    lion_update(x[0], x[1], x[2], c);
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool bias_correction,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const char* op = "amos_fused.adam_step";
  const auto start = start_step(
      op, params, grads,
      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
       {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList(), amsgrad}},
      steps, grad_scale, found_inf, cuda_checks(op, params));
  if (!start) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // -- every check passed: from here on we write --
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, bias_correction,
                        start->grad_unscale};
  const std::vector<double>& step = start->steps;
  const TableKey key = table_key(op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_adam_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<AdamCoef<Op>> coefs = fold_coefficients<AdamCoef<Op>>(
        params.size(), [&](size_t t) { return step[t]; },
        [&](size_t t) { return to_opmath<Op>(adam_coefficients(hyper, step[t])); });
    with_flag(!decoupled && weight_decay != 0.0, [&](auto l2) {
      if (amsgrad) {
        ElementwisePlan<AdamCoef<Op>, 5> plan(
            op, {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, coefs);
        launch_elementwise<scalar_t, 5, 0b11101u>(key, plan, AdamElement<true, decltype(l2)::value>{});
      } else {
        ElementwisePlan<AdamCoef<Op>, 4> plan(op, {params, grads, exp_avgs, exp_avg_sqs}, coefs);
        launch_elementwise<scalar_t, 4, 0b1101u>(key, plan, AdamElement<false, decltype(l2)::value>{});
      }
    });
  });
}

void radam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                     double beta2, double eps, double weight_decay, bool decoupled,
                     double rectify_threshold, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const char* op = "amos_fused.radam_step";
  const auto start = start_step(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                                steps, grad_scale, found_inf, cuda_checks(op, params));
  if (!start) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // -- every check passed: from here on we write --
  const RAdamHyper hyper{lr,        beta1, beta2, eps, weight_decay, rectify_threshold,
                         decoupled, start->grad_unscale};
  const std::vector<double>& step = start->steps;
  const TableKey key = table_key(op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_radam_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<RAdamCoef<Op>> coefs = fold_coefficients<RAdamCoef<Op>>(
        params.size(), [&](size_t t) { return step[t]; },
        [&](size_t t) { return to_opmath<Op>(radam_coefficients(hyper, step[t])); });
    ElementwisePlan<RAdamCoef<Op>, 4> plan(op, {params, grads, exp_avgs, exp_avg_sqs}, coefs);
    with_flag(!decoupled && weight_decay != 0.0, [&](auto l2) {
      launch_elementwise<scalar_t, 4, 0b1101u>(key, plan, RAdamElement<decltype(l2)::value>{});
    });
  });
}

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList steps, double lr, double beta1, double beta2,
                    double weight_decay, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const char* op = "amos_fused.lion_step";
  // Lion's update does not depend on t; the counter is kept for checkpoints.
  const auto start = start_step(op, params, grads, {{"exp_avgs", exp_avgs}}, steps, grad_scale, found_inf,
                                cuda_checks(op, params));
  if (!start) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // -- every check passed: from here on we write --
  const LionCoef<double> coef = lion_coefficients({lr, beta1, beta2, weight_decay, start->grad_unscale});
  const TableKey key = table_key(op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_lion_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<LionCoef<Op>> coefs = fold_coefficients<LionCoef<Op>>(
        params.size(), [](size_t) { return 0; }, [&](size_t) { return to_opmath<Op>(coef); });
    ElementwisePlan<LionCoef<Op>, 3> plan(op, {params, grads, exp_avgs}, coefs);
    launch_elementwise<scalar_t, 3, 0b101u>(key, plan, LionElement{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("radam_step", &radam_step_cuda);
  m.impl("lion_step", &lion_step_cuda);
}

}  // namespace amos_fused::cuda
