// CPU launches of Adam / AdamW and RAdam: one fused pass over the bucket.
#include "step_launch.h"

namespace amos_fused::cpu {

void launch(const StepCall<AdamAlgorithm>& call) {
  BucketTables tables(call);
  const bool amsgrad = call.hyper.amsgrad != 0;
  active_kernels().adam({tables.view(call.params), tables.params(), tables.grads(), tables.state(0),
                         tables.state(1), tables.state(2), call.coef.data(), amsgrad,
                         call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0, call.telemetry,
                         call.round_or_null()});
}

void launch(const StepCall<RAdamAlgorithm>& call) {
  BucketTables tables(call);
  active_kernels().radam({tables.view(call.params), tables.params(), tables.grads(), tables.state(0),
                          tables.state(1), call.coef.data(),
                          call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0, call.telemetry,
                         call.round_or_null()});
}

}  // namespace amos_fused::cpu
