// CPU launches of scale-aware Adam and LAMB: phase 1 (moments + per-tensor
// norms), per-tensor k and ρ, phase 2 (θ ← θ − (k·u + ρ·θ)).
#include <cmath>

#include "step_launch.h"

namespace amos_fused::cpu {
namespace {

void norm_scaled_launch(const std::vector<NormScaledCoef>& coefs, BucketTables& tables,
                        at::TensorList params, bool lamb, double* telemetry,
                        const StochasticRound* round) {
  const size_t n = params.size();
  std::vector<MomentCoef<double>> moments;
  moments.reserve(n);
  for (const NormScaledCoef& c : coefs) moments.push_back(c.moments);
  const NormScaledLaunch launch{tables.view(params), tables.params(), tables.grads(), tables.state(0),
                                tables.state(1), moments.data(), lamb, telemetry, round};
  std::vector<double> u_sq(n), theta_sq(n), k(n), rho(n);
  active_kernels().norm_scaled_phase1(launch, u_sq.data(), theta_sq.data());
  for (size_t t = 0; t < n; ++t) {
    const NormScaledCoef& c = coefs[t];
    const double u_norm = std::sqrt(u_sq[t]);
    if (lamb) {  // k = η·‖θ‖/‖u‖, η when a norm is 0, NaN or Inf
      const double theta_norm = std::sqrt(theta_sq[t]);
      const bool ratio = u_norm > 0.0 && theta_norm > 0.0 && std::isfinite(u_norm) && std::isfinite(theta_norm);
      k[t] = c.scale * (ratio ? theta_norm / u_norm : 1.0);
    } else {     // k = α0·s(t)·‖ε0‖/‖u‖, 0 when ‖u‖ = 0
      k[t] = u_norm > 0.0 ? c.scale * c.init_norm / u_norm : 0.0;
    }
    rho[t] = c.rho;
  }
  active_kernels().norm_scaled_phase2(launch, k.data(), rho.data());
}

}  // namespace

void launch(const StepCall<ScaledAdamAlgorithm>& call) {
  BucketTables tables(call);
  norm_scaled_launch(call.coef, tables, call.params, false, call.telemetry, call.round_or_null());
}

void launch(const StepCall<LambAlgorithm>& call) {
  BucketTables tables(call);
  norm_scaled_launch(call.coef, tables, call.params, true, call.telemetry, call.round_or_null());
}

}  // namespace amos_fused::cpu
