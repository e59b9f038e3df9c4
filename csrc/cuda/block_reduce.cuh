// Deterministic sums over a warp and over a thread block: a fixed butterfly within
// each warp, then the warps' sums added in warp order.  Every thread gets the same
// total, bit for bit.
#pragma once

#include <cstdint>

namespace amos_fused::cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over the kThreads threads of the block; all of them must call it.  `buffer`:
// kThreads / 32 values of shared memory that no thread may still be reading from
// an earlier call (alternate two buffers, or __syncthreads() in between).
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T value, T* buffer) {
  static_assert(kThreads % kWarpSize == 0, "whole warps only");
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) buffer[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  T total = buffer[0];
#pragma unroll
  for (int w = 1; w < kThreads / kWarpSize; ++w) total += buffer[w];
  return total;
}

// Σ over i in [first, last) of the pairs (pairs[2i], pairs[2i + 1]), in double, by
// the 32 lanes of a warp: each lane adds every 32nd pair from first + lane, then
// warp_sum.  A fixed order; every lane gets both totals.  The per-tensor step of
// the two-level reductions: blocks write their own pair, a warp per tensor adds
// its blocks' pairs (norm_scaled.cu's scales, telemetry.cu).
template <typename T>
__device__ __forceinline__ void warp_sum_pairs(const T* pairs, int64_t first, int64_t last, int lane,
                                               double& a, double& b) {
  a = 0.0;
  b = 0.0;
  for (int64_t i = first + lane; i < last; i += kWarpSize) {
    a += static_cast<double>(pairs[2 * i]);
    b += static_cast<double>(pairs[2 * i + 1]);
  }
  a = warp_sum(a);
  b = warp_sum(b);
}

}  // namespace amos_fused::cuda
