// Capturable steps read nothing on the host (op_support.h, CoefTable):
//   * their coefficients are a float64 table computed on the device (one row per
//     tensor, the columns of csrc/step_coefficients.h), turned here into the
//     kernels' Coef structs, in the table's coefficient section, by one small
//     launch ordered after the table upload and before the step's kernels;
//   * GradScaler's found_inf stays on the device: every kernel that writes starts
//     with step_skipped(table.skip) and returns when it is set, so a skipped step
//     writes nothing (the counters advance by 1 unless found_inf is set, in Python).
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "op_support.h"

namespace amos_fused::cuda {

constexpr int kCoefThreads = 128;

// Whether found_inf (null: no GradScaler, or not a capturable step) skips the step.
__device__ __forceinline__ bool step_skipped(const float* skip) { return skip != nullptr && *skip != 0.0f; }

template <typename Coef>
__global__ void __launch_bounds__(kCoefThreads)
    coefs_from_columns_kernel(const double* columns, int64_t width, int64_t n, Coef* coefs) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kCoefThreads + threadIdx.x;
  if (t < n) coefs[t] = Coef::from_columns(columns + t * width);
}

// Fills `coefs` (the device table's coefficient section, n entries) from
// table.device_columns on `stream`; nothing for a host-computed table.
template <typename Coef>
void fill_device_coefficients(const CoefTable<Coef>& table, const Coef* coefs, int64_t n, cudaStream_t stream) {
  if (table.device_columns == nullptr || n == 0) return;
  coefs_from_columns_kernel<Coef><<<static_cast<unsigned>(ceil_div(n, kCoefThreads)), kCoefThreads, 0, stream>>>(
      table.device_columns, table.width, n, const_cast<Coef*>(coefs));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace amos_fused::cuda
