// Telemetry of a step on CUDA (csrc/step_prologue.h, check_telemetry): Σθ² and
// Σ(Δθ)² per param, of the values as stored, taken by the kernels that write θ
// while θ is in registers (a compile-time variant of each: TELEMETRY = true),
// with the two-level reduction of the norm-scaled rules:
//   1. every thread adds its elements' terms (TelemetrySums, opmath), the block
//      adds its threads' sums (block_sum, in double) and writes them to its own
//      pair of a scratch buffer of 2 doubles per block (store_block_telemetry);
//   2. one warp per tensor adds the pairs of the tensor's blocks in block order
//      (warp_sum_pairs) into telemetry[2t], telemetry[2t + 1] (combine_telemetry).
// No atomics and no host synchronization: bitwise the same run to run.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "block_reduce.cuh"

namespace amos_fused::cuda {

// One thread's Σθ² and Σ(Δθ)² (storage type scalar_t, sums in its opmath type).
template <typename scalar_t>
struct TelemetrySums {
  using Op = at::opmath_type<scalar_t>;
  Op weight_sq = Op(0);
  Op update_sq = Op(0);

  // theta: θ after the step, in opmath, about to be stored; before: θ as loaded.
  // Rounds theta to what storage will hold (storing it afterwards is then exact)
  // and adds θ² and (θ − θ_before)² of the stored values.
  __device__ __forceinline__ void add(Op& theta, Op before) {
    theta = static_cast<Op>(static_cast<scalar_t>(theta));
    const Op delta = theta - before;
    weight_sq += theta * theta;
    update_sq += delta * delta;
  }
};

// The block's sums into pair[0] (Σθ²), pair[1] (Σ(Δθ)²).  Every thread of the
// block must call it (after its last add()).
template <int kThreads, typename scalar_t>
__device__ __forceinline__ void store_block_telemetry(const TelemetrySums<scalar_t>& sums, double* pair) {
  __shared__ double buffer[2][kThreads / kWarpSize];
  const double weight_sq = block_sum<kThreads>(static_cast<double>(sums.weight_sq), buffer[0]);
  const double update_sq = block_sum<kThreads>(static_cast<double>(sums.update_sq), buffer[1]);
  if (threadIdx.x == 0) {
    pair[0] = weight_sq;
    pair[1] = update_sq;
  }
}

// Host side.  The scratch of a launch's block pairs: 2·blocks doubles on `device`
// (torch's caching allocator, stream-ordered).
at::Tensor telemetry_partials(int64_t blocks, const at::Device& device);

// telemetry[2t], [2t + 1] = Σ over the pairs i ∈ [begin[t], end[t]) of partials
// (device arrays; an empty range gives 0), for t < num_tensors, on `stream`.
void combine_telemetry(const double* partials, const int64_t* begin, const int64_t* end,
                       int64_t num_tensors, double* telemetry, cudaStream_t stream);

// A bucket without a single block (every tensor empty): zeros, on the current stream.
void zero_telemetry(double* telemetry, int64_t num_tensors, const at::Device& device);

}  // namespace amos_fused::cuda
