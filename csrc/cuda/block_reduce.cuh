// Deterministic sums over a warp and over a thread block: a fixed butterfly within
// each warp, then the warps' sums added in warp order.  Every thread gets the same
// total, bit for bit.
#pragma once

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

}  // namespace amos_fused::cuda
