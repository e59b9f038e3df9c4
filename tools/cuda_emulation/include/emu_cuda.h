// Host emulation of the CUDA features the kernels in csrc/cuda use, so their
// logic can run on a machine without a GPU (see build_emulated_ops.py).  A launch
// runs its blocks one after another; each block runs as blockDim real threads, so
// __syncthreads / __syncwarp / __shfl_xor_sync are real barriers and exchanges
// and a missing participant deadlocks as it would misbehave on a GPU.
// __shared__ becomes `static`: shared by the threads of the (one) running block.
#pragma once

#include <barrier>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using cudaStream_t = void*;
struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx, blockIdx;

namespace emu {

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local double* warp_lanes = nullptr;
inline bool skip_kernels = false;  // time the host side alone

inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  if (skip_kernels) return;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> block_sync(block);
    std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
    for (unsigned w = 0; w < block / 32; ++w) warp_sync.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<double> lanes(block);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        block_barrier = &block_sync;
        warp_barrier = warp_sync[t / 32].get();
        warp_lanes = &lanes[(t / 32) * 32];
        kernel();
      });
    }
    for (std::thread& thread : threads) thread.join();
  }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int offset) {
  const unsigned lane = threadIdx.x % 32;
  emu::warp_lanes[lane] = static_cast<double>(value);  // exact for float and double
  __syncwarp();
  const T other = static_cast<T>(emu::warp_lanes[lane ^ static_cast<unsigned>(offset)]);
  __syncwarp();
  return other;
}
