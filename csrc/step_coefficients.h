// Each algorithm's per-step contract, declared once for every backend:
//   * its hyper-parameters: the op's `hyper` list, in the order of an X-macro;
//   * its per-step, per-tensor coefficients, computed on the host in double by ONE
//     function (never per element); the CPU and CUDA ops convert them to their
//     math type, the Triton backend reads them as a table whose columns are the
//     fields of the coefficient struct (csrc/step_math.h), named by the same X-macro.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "step_math.h"

namespace amos_fused {

// ---- hyper-parameters -----------------------------------------------------------
// Flags are passed as 0 / 1.  Adam's beta1_weight: m's lerp weight 1 − β1 (as torch.optim
// takes it for a Tensor β1: β1 cast to the param's dtype first; bc1 takes β1 itself).
#define AF_ADAM_HYPER(X) \
  X(lr) X(beta1) X(beta1_weight) X(beta2) X(eps) X(weight_decay) X(decoupled) X(amsgrad) X(bias_correction)
#define AF_RADAM_HYPER(X) \
  X(lr) X(beta1) X(beta2) X(eps) X(weight_decay) X(decoupled) X(rectify_threshold)
#define AF_LION_HYPER(X) X(lr) X(beta1) X(beta2) X(weight_decay)
// momentum and clip_value are read only when use_momentum / clip are set.
#define AF_AMOS_HYPER(X) \
  X(lr) X(beta) X(momentum) X(clip_value) X(extra_l2) X(d_coef) X(c_coef) X(epsilon) X(use_momentum) X(clip)
// p: the schedule's p (p0 for inverse_time); inverse_time: s(t) = 1/(2α0·p0·t + 1).
#define AF_SCALED_ADAM_HYPER(X) X(lr) X(beta1) X(beta2) X(eps) X(p) X(inverse_time) X(q)
#define AF_LAMB_HYPER(X) X(lr) X(beta1) X(beta2) X(eps) X(weight_decay) X(bias_correction)

#define AF_HYPER_FIELD(name) double name = 0.0;
#define AF_HYPER_NAME(name) #name,
#define AF_HYPER_READ(name) h.name = values[i++];
#define AF_HYPER_STRUCT(Name, FIELDS)                                              \
  struct Name {                                                                    \
    FIELDS(AF_HYPER_FIELD)                                                         \
    static std::vector<std::string> names() { return {FIELDS(AF_HYPER_NAME)}; }   \
    static Name read(const double* values) {                                       \
      Name h;                                                                      \
      size_t i = 0;                                                                \
      FIELDS(AF_HYPER_READ)                                                        \
      return h;                                                                    \
    }                                                                              \
  };

AF_HYPER_STRUCT(AdamHyper, AF_ADAM_HYPER)
AF_HYPER_STRUCT(RAdamHyper, AF_RADAM_HYPER)
AF_HYPER_STRUCT(LionHyper, AF_LION_HYPER)
AF_HYPER_STRUCT(AmosHyper, AF_AMOS_HYPER)
AF_HYPER_STRUCT(ScaledAdamHyper, AF_SCALED_ADAM_HYPER)
AF_HYPER_STRUCT(LambHyper, AF_LAMB_HYPER)

// ---- coefficients -----------------------------------------------------------------
// Every function takes the tensor's per-tensor value (Amos η, scale-aware Adam's
// ‖ε0‖; 0 for the others), its step count t after the increment and 1/GradScaler scale.

// torch.lerp's choice of form for the weight w = 1 − β1 (|w| < ½, af_lerp).
inline bool lerp_weight_small(double w) { return std::fabs(w) < 0.5; }

// Adam: bc1 = 1 − β1^t, bc2 = 1 − β2^t (both 1 without bias correction).
inline AdamCoef<double> adam_coefficients(const AdamHyper& h, double, double step, double unscale) {
  const double bc1 = h.bias_correction != 0 ? 1.0 - std::pow(h.beta1, step) : 1.0;
  const double bc2 = h.bias_correction != 0 ? 1.0 - std::pow(h.beta2, step) : 1.0;
  const bool decoupled = h.decoupled != 0;
  AdamCoef<double> c;
  c.beta1_complement = h.beta1_weight;
  c.beta2 = h.beta2;
  c.beta2_complement = 1.0 - h.beta2;
  c.param_decay = decoupled ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.l2 = decoupled ? 0.0 : h.weight_decay;
  c.eps = h.eps;
  c.bc2_sqrt = std::sqrt(bc2);
  c.neg_step_size = -(h.lr / bc1);
  c.grad_unscale = unscale;
  c.lerp_small = lerp_weight_small(c.beta1_complement);
  return c;
}

// RAdam: ρ∞ = 2/(1−β2) − 1, ρt = ρ∞ − 2tβ2^t/(1−β2^t),
//       r = sqrt((ρt−4)(ρt−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρt)) when ρt > threshold.
inline RAdamCoef<double> radam_coefficients(const RAdamHyper& h, double, double step, double unscale) {
  const double beta2_t = std::pow(h.beta2, step);
  const double bc2 = 1.0 - beta2_t;
  const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * step * beta2_t / bc2;
  const bool decoupled = h.decoupled != 0;
  RAdamCoef<double> c;
  c.beta1_complement = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.beta2_complement = 1.0 - h.beta2;
  c.param_decay = decoupled ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.l2 = decoupled ? 0.0 : h.weight_decay;
  c.eps = h.eps;
  c.bc1 = 1.0 - std::pow(h.beta1, step);
  c.lr = h.lr;
  c.bc2_sqrt = std::sqrt(bc2);
  c.grad_unscale = unscale;
  c.rectified = rho_t > h.rectify_threshold;
  c.lerp_small = lerp_weight_small(c.beta1_complement);
  c.rect = c.rectified ? std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                   ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                       : 1.0;
  return c;
}

// Lion: the same for every tensor and step.
inline LionCoef<double> lion_coefficients(const LionHyper& h, double, double, double unscale) {
  return {h.beta1,          1.0 - h.beta1, h.beta2, 1.0 - h.beta2, 1.0 - h.lr * h.weight_decay,
          -h.lr,            unscale};
}

// Amos, for one tensor of scale η at step t.
inline AmosCoef<double> amos_coefficients(const AmosHyper& h, double eta, double step, double unscale) {
  const double alpha = h.lr * eta;
  const double momentum = h.use_momentum != 0 ? h.momentum : 0.0;
  return {h.beta,
          1.0 - h.beta,
          1.0 - std::pow(h.beta, step),
          h.epsilon,
          h.c_coef * std::sqrt(h.lr),
          h.lr * h.lr,
          alpha,
          h.d_coef * std::sqrt(alpha),
          h.extra_l2,
          h.clip != 0 ? h.clip_value : 0.0,
          momentum,
          1.0 - momentum,
          unscale};
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

// The two-phase rules: moments, and what turns the per-tensor norms into
// θ ← θ − (k·u + ρ·θ):
//   scale-aware Adam: k = scale·init_norm/‖u‖ (0 when ‖u‖ = 0), scale = α0·s(t),
//                     ρ = α0²/(2q)·s(t), init_norm = ‖ε0‖;
//   LAMB:             k = scale·‖θ‖/‖u‖ (scale when a norm is 0), scale = η, ρ = 0.
struct NormScaledCoef {
  MomentCoef<double> moments;
  double scale, rho, init_norm;
};

// Scale-aware Adam's s(t): 1/(α0·p·t + 1)² (inverse_square, constant p) or
// 1/(2·α0·p·t + 1) (inverse_time, dynamic p).
inline double scaled_schedule(double lr, double p, bool inverse_time, double step) {
  return inverse_time ? 1.0 / (2.0 * lr * p * step + 1.0)
                      : 1.0 / ((lr * p * step + 1.0) * (lr * p * step + 1.0));
}

inline NormScaledCoef scaled_adam_coefficients(const ScaledAdamHyper& h, double init_norm, double step,
                                               double unscale) {
  const double s = scaled_schedule(h.lr, h.p, h.inverse_time != 0, step);
  return {moment_coefficients(h.beta1, h.beta2, h.eps, 0.0, true, unscale, step), h.lr * s,
          h.lr * h.lr / (2.0 * h.q) * s, init_norm};
}

// torch.lerp takes its form from the weight as its math type holds it: float32 for
// every param dtype but float64, where a weight just below ½ (1 − β1 for β1 in
// (½, ½ + 2^-26]) rounds to ½ and takes the second form.  Applied to a step's
// coefficients when its params are not float64 (finish_step); the other
// algorithms have no lerp.
inline void lerp_form_in_float32(AdamCoef<double>& c) {
  c.lerp_small = lerp_weight_small(static_cast<float>(c.beta1_complement));
}
inline void lerp_form_in_float32(RAdamCoef<double>& c) {
  c.lerp_small = lerp_weight_small(static_cast<float>(c.beta1_complement));
}
inline void lerp_form_in_float32(NormScaledCoef& c) {
  c.moments.lerp_small = lerp_weight_small(static_cast<float>(c.moments.beta1_complement));
}
template <typename Coef>
inline void lerp_form_in_float32(Coef&) {}

inline NormScaledCoef lamb_coefficients(const LambHyper& h, double, double step, double unscale) {
  return {moment_coefficients(h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction != 0,
                              unscale, step),
          h.lr, 0.0, 0.0};
}

// ---- coefficient tables -------------------------------------------------------------
// CoefColumns<Coef>: the column names of a coefficient row (the struct's fields in
// order, flags as 0 / 1) and the row of one tensor.
template <typename Coef>
struct CoefColumns;

#define AF_COLUMN_NAME(type, name) #name,
#define AF_COLUMN_STORE(type, name) row[i++] = static_cast<double>(c.name);
#define AF_COEF_COLUMNS(Name, FIELDS)                                                   \
  template <>                                                                          \
  struct CoefColumns<Name<double>> {                                                   \
    static std::vector<std::string> names() { return {FIELDS(AF_COLUMN_NAME)}; }      \
    static size_t store(const Name<double>& c, double* row) {                          \
      size_t i = 0;                                                                    \
      FIELDS(AF_COLUMN_STORE)                                                          \
      return i;                                                                        \
    }                                                                                  \
  };

AF_COEF_COLUMNS(AdamCoef, AF_ADAM_COEF)
AF_COEF_COLUMNS(RAdamCoef, AF_RADAM_COEF)
AF_COEF_COLUMNS(LionCoef, AF_LION_COEF)
AF_COEF_COLUMNS(MomentCoef, AF_MOMENT_COEF)
AF_COEF_COLUMNS(AmosCoef, AF_AMOS_COEF)

template <>
struct CoefColumns<NormScaledCoef> {
  static std::vector<std::string> names() {
    std::vector<std::string> out = CoefColumns<MomentCoef<double>>::names();
    for (const char* name : {"scale", "rho", "init_norm"}) out.emplace_back(name);
    return out;
  }
  static size_t store(const NormScaledCoef& c, double* row) {
    size_t i = CoefColumns<MomentCoef<double>>::store(c.moments, row);
    row[i++] = c.scale;
    row[i++] = c.rho;
    row[i++] = c.init_norm;
    return i;
  }
};

}  // namespace amos_fused
