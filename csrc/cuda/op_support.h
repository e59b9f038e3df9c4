// Host-side steps every CUDA op shares: device checks, refusing CUDA graph capture,
// folding equal per-tensor coefficients, and
// the key of a bucket's cached device table.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "device_table.h"

namespace amos_fused::cuda {

// After the bucket's checks: the bucket lives on a CUDA device.
inline void require_cuda_params(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(params[0].is_cuda(), op, ": the CUDA kernels step CUDA tensors, params are on ",
                    params[0].device());
}

// Steps are host counters and the GradScaler inputs are read on the host: a
// captured graph would replay stale values (capturable steps, which read nothing
// there, skip this check).  Call under the bucket's device guard.
inline void refuse_graph_capture(const char* op) {
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              op, ": cannot run inside CUDA graph capture (step counts are host tensors; "
              "capturable=True steps can be captured)");
}

// The device checks of a CUDA step (Backend::device_checks, cuda/step_launch.h): CUDA params, and
// not under CUDA graph capture.
inline auto cuda_checks(const char* op, at::TensorList params) {
  return [op, params] {
    require_cuda_params(op, params);
    const c10::cuda::CUDAGuard guard(params[0].device());
    refuse_graph_capture(op);
  };
}

// The device checks of a capturable step (run_capturable_step): CUDA params; it
// may run under CUDA graph capture, since it reads nothing on the host.
inline void cuda_capturable_checks(const char* op, at::TensorList params) { require_cuda_params(op, params); }

// Per-tensor coefficients with runs of equal ones folded: tensor t uses
// unique[index[t]].  A bucket whose tensors share a step count (the usual case)
// has one entry, so the index never changes and only that entry is uploaded.
// A capturable step (StepCall::device_columns) has one placeholder entry per
// tensor (its table section is left zero bytes, the same every step), which
// device_coefficients.cuh fills on the device from row t of `device_columns`
// before the step's kernels run; its kernels return at once
// when `skip` (GradScaler's found_inf on the device) is non-zero.
template <typename Coef>
struct CoefTable {
  std::vector<Coef> unique;
  std::vector<int32_t> index;
  const double* device_columns = nullptr;  // [n][Coef::kColumns or more] float64, row-major
  int64_t width = 0;                       // columns per row of device_columns
  const float* skip = nullptr;
};

// The table of a capturable step: n placeholders filled on the device.
template <typename Coef>
CoefTable<Coef> device_coefficient_table(size_t n, const double* columns, int64_t width, const float* skip) {
  CoefTable<Coef> table;
  table.unique.assign(n, Coef{});
  table.index.resize(n);
  for (size_t t = 0; t < n; ++t) table.index[t] = static_cast<int32_t>(t);
  table.device_columns = columns;
  table.width = width;
  table.skip = skip;
  return table;
}

// key(t): what tensor t's coefficients depend on (comparable with ==);
// make(t): its coefficients.
template <typename Coef, typename Key, typename Make>
CoefTable<Coef> fold_coefficients(size_t n, const Key& key, const Make& make) {
  CoefTable<Coef> table;
  table.index.resize(n);
  for (size_t t = 0; t < n; ++t) {
    if (t == 0 || !(key(t) == key(t - 1))) table.unique.push_back(make(t));
    table.index[t] = static_cast<int32_t>(table.unique.size() - 1);
  }
  return table;
}

inline TableKey table_key(const char* op, at::TensorList params) {
  return {op, static_cast<int>(params[0].device().index()), static_cast<int64_t>(params.size()),
          reinterpret_cast<uintptr_t>(params.front().data_ptr()),
          reinterpret_cast<uintptr_t>(params.back().data_ptr())};
}

// Blocks of a launch (gridDim.x) and pieces of a tensor (BlockTask::chunk) must fit.
inline void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " thread blocks exceed one launch");
}
inline void check_chunks(const char* op, int64_t chunks) {
  TORCH_CHECK(chunks <= std::numeric_limits<uint32_t>::max(), op, ": a tensor of ", chunks,
              " chunks is too large");
}
inline void check_tensor_count(const char* op, size_t n) {
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), op, ": ", n,
              " tensors in one bucket are too many");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(std::true_type) or f(std::false_type): a runtime flag as a template argument.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Host coefficients (double) in the kernels' opmath type.
template <typename Op, template <typename> class Coef>
Coef<Op> to_opmath(const Coef<double>& c) {
  return c.template map<Op>([](double x) { return static_cast<Op>(x); });
}

}  // namespace amos_fused::cuda
