// Per-step, per-tensor scalars of each algorithm, computed on the host in double
// (never per element).  Shared by the CPU and CUDA launchers.
#pragma once

#include <cmath>

#include "step_math.h"

namespace amos_fused {

// torch.lerp's choice of form for the weight w = 1 − β1 (|w| < ½, af_lerp).
inline bool lerp_weight_small(double w) { return std::fabs(w) < 0.5; }

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, bias_correction;
  double grad_unscale;
};

// Adam: bc1 = 1 − β1^t, bc2 = 1 − β2^t (both 1 without bias correction).
inline AdamCoef<double> adam_coefficients(const AdamHyper& h, double step) {
  const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, step) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, step) : 1.0;
  AdamCoef<double> c;
  c.beta1_complement = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.beta2_complement = 1.0 - h.beta2;
  c.param_decay = h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.l2 = h.decoupled ? 0.0 : h.weight_decay;
  c.eps = h.eps;
  c.bc2_sqrt = std::sqrt(bc2);
  c.neg_step_size = -(h.lr / bc1);
  c.grad_unscale = h.grad_unscale;
  c.lerp_small = lerp_weight_small(c.beta1_complement);
  return c;
}

struct RAdamHyper {
  double lr, beta1, beta2, eps, weight_decay, rectify_threshold;
  bool decoupled;
  double grad_unscale;
};

// RAdam: ρ∞ = 2/(1−β2) − 1, ρt = ρ∞ − 2tβ2^t/(1−β2^t),
//       r = sqrt((ρt−4)(ρt−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρt)) when ρt > threshold.
inline RAdamCoef<double> radam_coefficients(const RAdamHyper& h, double step) {
  const double beta2_t = std::pow(h.beta2, step);
  const double bc2 = 1.0 - beta2_t;
  const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * step * beta2_t / bc2;
  RAdamCoef<double> c;
  c.beta1_complement = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.beta2_complement = 1.0 - h.beta2;
  c.param_decay = h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.l2 = h.decoupled ? 0.0 : h.weight_decay;
  c.eps = h.eps;
  c.bc1 = 1.0 - std::pow(h.beta1, step);
  c.lr = h.lr;
  c.bc2_sqrt = std::sqrt(bc2);
  c.grad_unscale = h.grad_unscale;
  c.rectified = rho_t > h.rectify_threshold;
  c.lerp_small = lerp_weight_small(c.beta1_complement);
  c.rect = c.rectified ? std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                   ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                       : 1.0;
  return c;
}

struct LionHyper {
  double lr, beta1, beta2, weight_decay, grad_unscale;
};

// Lion
inline LionCoef<double> lion_coefficients(const LionHyper& h) {
  return {h.beta1,          1.0 - h.beta1, h.beta2, 1.0 - h.beta2, 1.0 - h.lr * h.weight_decay,
          -h.lr,            h.grad_unscale};
}

// Adam moments for the two-phase rules (scale-aware Adam, LAMB).
inline MomentCoef<double> moment_coefficients(double beta1, double beta2, double eps,
                                              double weight_decay, bool bias_correction,
                                              double grad_unscale, double step) {
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, step) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, step) : 1.0;
  return {1.0 - beta1,  beta2,        1.0 - beta2,  eps,
          bc1,          std::sqrt(bc2), weight_decay, grad_unscale,
          lerp_weight_small(1.0 - beta1)};
}

// Scale-aware Adam's s(t): 1/(α0·p·t + 1)² (inverse_square, constant p) or
// 1/(2·α0·p·t + 1) (inverse_time, dynamic p).
inline double scaled_schedule(double lr, double p, bool inverse_time, double step) {
  return inverse_time ? 1.0 / (2.0 * lr * p * step + 1.0)
                      : 1.0 / ((lr * p * step + 1.0) * (lr * p * step + 1.0));
}

struct AmosHyper {
  double lr, beta, momentum, clip_value, extra_l2, d_coef, c_coef, epsilon, grad_unscale;
};

// Amos, for one tensor of scale η at step t.
inline AmosCoef<double> amos_coefficients(const AmosHyper& h, double eta, double step) {
  const double alpha = h.lr * eta;
  return {h.beta,
          1.0 - h.beta,
          1.0 - std::pow(h.beta, step),
          h.epsilon,
          h.c_coef * std::sqrt(h.lr),
          h.lr * h.lr,
          alpha,
          h.d_coef * std::sqrt(alpha),
          h.extra_l2,
          h.clip_value,
          h.momentum,
          1.0 - h.momentum,
          h.grad_unscale};
}

}  // namespace amos_fused
