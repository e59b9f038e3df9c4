// CPU launch of Amos: tensors whose slots each own one contiguous run go through
// the bucket's prefix sums, the others ("general" layouts) by index.
#include "step_launch.h"

namespace amos_fused::cpu {

void launch(const StepCall<AmosAlgorithm>& call) {
  BucketTables tables(call);
  const size_t n = call.params.size();
  std::vector<int64_t> general;
  for (size_t i = 0; i < n; ++i) {
    const bool is_general = call.layouts[i].kind == kSlotsGeneral && call.params[i].numel() > 0;
    if (is_general) general.push_back(static_cast<int64_t>(i));
    // general-layout tensors count 0 elements in the prefix sums
    tables.offsets[i + 1] = tables.offsets[i] + (is_general ? 0 : call.params[i].numel());
  }
  const bool momentum = call.hyper.use_momentum != 0;
  std::vector<void*> no_mu(n, nullptr);
  active_kernels().amos({tables.view(call.params), tables.params(), tables.grads(), tables.state(0),
                         tables.state(1), momentum ? tables.state(2) : no_mu.data(), call.coef.data(),
                         call.layouts.data(), general.data(), static_cast<int64_t>(general.size()),
                         momentum, call.hyper.clip != 0, call.telemetry, call.round_or_null()});
}

}  // namespace amos_fused::cpu
