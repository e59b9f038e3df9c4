// The host side of telemetry.cuh: the scratch of block pairs, and the per-tensor
// combination of a launch's pairs.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "op_support.h"
#include "telemetry.cuh"

namespace amos_fused::cuda {
namespace {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / kWarpSize;

// One warp per tensor.
__global__ void __launch_bounds__(kCombineThreads)
    telemetry_combine_kernel(const double* partials, const int64_t* begin, const int64_t* end,
                             int64_t num_tensors, double* telemetry) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= num_tensors) return;  // whole warps
  double weight_sq, update_sq;
  warp_sum_pairs(partials, begin[t], end[t], lane, weight_sq, update_sq);
  if (lane != 0) return;
  telemetry[2 * t] = weight_sq;
  telemetry[2 * t + 1] = update_sq;
}

}  // namespace

at::Tensor telemetry_partials(int64_t blocks, const at::Device& device) {
  return at::empty({2 * blocks}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void combine_telemetry(const double* partials, const int64_t* begin, const int64_t* end,
                       int64_t num_tensors, double* telemetry, cudaStream_t stream) {
  if (num_tensors == 0) return;
  telemetry_combine_kernel<<<static_cast<unsigned>(ceil_div(num_tensors, kCombineWarps)), kCombineThreads, 0,
                             stream>>>(partials, begin, end, num_tensors, telemetry);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zero_telemetry(double* telemetry, int64_t num_tensors, const at::Device& device) {
  at::from_blob(telemetry, {num_tensors, 2}, at::TensorOptions().dtype(at::kDouble).device(device)).zero_();
}

}  // namespace amos_fused::cuda
