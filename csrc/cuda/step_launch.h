// The CUDA step op (csrc/step_prologue.h's run_step): after the shared prologue,
// one launch per algorithm over the whole bucket (cuda/*.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "../step_prologue.h"
#include "op_support.h"

namespace amos_fused::cuda {

void launch(const StepCall<AdamAlgorithm>& call);
void launch(const StepCall<RAdamAlgorithm>& call);
void launch(const StepCall<LionAlgorithm>& call);
void launch(const StepCall<AmosAlgorithm>& call);
void launch(const StepCall<ScaledAdamAlgorithm>& call);
void launch(const StepCall<LambAlgorithm>& call);

struct Backend {
  // CUDA params, and not under CUDA graph capture.
  static void device_checks(const char* op, at::TensorList params) { cuda_checks(op, params)(); }
  template <typename A>
  static void launch(const StepCall<A>& call) {
    cuda::launch(call);
  }
};

// The call's coefficients in the kernels' math type, runs of equal rows folded.
template <typename Op, template <typename> class Coef, typename A>
CoefTable<Coef<Op>> opmath_coefficients(const StepCall<A>& call) {
  using Columns = CoefColumns<Coef<double>>;
  const size_t width = Columns::names().size();
  std::vector<double> rows(call.coef.size() * width);
  for (size_t t = 0; t < call.coef.size(); ++t) Columns::store(call.coef[t], rows.data() + t * width);
  return fold_coefficients<Coef<Op>>(
      call.coef.size(),
      [&](size_t t) { return std::vector<double>(rows.begin() + t * width, rows.begin() + (t + 1) * width); },
      [&](size_t t) { return to_opmath<Op>(call.coef[t]); });
}

}  // namespace amos_fused::cuda
