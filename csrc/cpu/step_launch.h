// The CPU step op (csrc/step_prologue.h's run_step): after the shared prologue,
// one launch per algorithm over the whole bucket (cpu/*_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>
#include <vector>

#include "../step_prologue.h"
#include "kernel_api.h"

namespace amos_fused::cpu {

AF_DECLARE_BACKEND_LAUNCHES

struct Backend {
  static void device_checks(const char*, at::TensorList) {}
  template <typename A>
  static constexpr bool writes_low_params() { return Contains<A, MasterAlgorithms>::value; }
  template <typename A>
  static void launch(const StepCall<A>& call) {
    cpu::launch(call);
  }
};

// Prefix sums of numel and the addresses of each list, for the kernels.
struct BucketTables {
  std::vector<int64_t> offsets;
  std::vector<void*> param, grad, low;  // low: the low-precision params written from masters, or empty
  c10::ScalarType low_dtype = c10::ScalarType::Undefined;
  std::vector<std::vector<void*>> states;

  template <typename A>
  explicit BucketTables(const StepCall<A>& call) {
    const size_t n = call.params.size();
    offsets.resize(n + 1, 0);
    for (size_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + call.params[i].numel();
    gather(param, call.params);
    gather(grad, call.grads);
    gather(low, call.low_params);
    if (!low.empty()) low_dtype = call.low_params[0].scalar_type();
    for (const at::TensorList& list : call.states) {
      states.emplace_back(list.size(), nullptr);
      for (size_t i = 0; i < list.size(); ++i) states.back()[i] = list[i].data_ptr();
    }
  }

  BucketView view(const at::TensorList& params) const {
    BucketView out{params[0].scalar_type(), static_cast<int64_t>(offsets.size() - 1), offsets.data()};
    if (!low.empty()) {
      out.low_dtype = low_dtype;
      out.low_params = low.data();
    }
    return out;
  }
  const void* const* grads() const { return const_cast<const void* const*>(grad.data()); }
  void* const* params() { return param.data(); }
  void* const* state(size_t k) { return states[k].data(); }

 private:
  static void gather(std::vector<void*>& out, at::TensorList list) {
    out.reserve(list.size());
    for (const at::Tensor& t : list) out.push_back(t.data_ptr());
  }
};

template <typename A, typename>
void launch(const StepCall<A>& call) {
  BucketTables tables(call);
  ElementwiseLaunch launch{tables.view(call.params), tables.params(), tables.grads(), {}, call.coef.data(), call.telemetry,
                         call.round_or_null()};
  for (size_t k = 0; k < kMaxStateLists; ++k) launch.states[k] = tables.state(k);
  active_kernels().elementwise[IndexOf<A, ElementwiseAlgorithms>::value](launch);
}

}  // namespace amos_fused::cpu
