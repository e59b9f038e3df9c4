// The CUDA kernel of the step op with block-scaled FP8 states (csrc/fp8_states.h,
// the format; cuda/fp8.cu, the host side).  One thread block per FP8 block of
// kFp8Block = 256 elements, kFp8Threads = 64 threads of kFp8PerThread = 4
// consecutive elements each:
//   decode  x = e4m3(code)·absmax/448 (squared for a state stored as sqrt(v))
//   update  step_math.h's function, the one of the full-precision kernels
//   store   θ (stochastic rounding: param_rounding.cuh; telemetry: telemetry.cuh)
//   absmax  the block's NaN-propagating max |stored value| (fp8_stored_absmax)
//   encode  code = e4m3_rne(min(|x|·448/absmax, 448)) with x's sign
// 64 threads rather than 256: one vector load per array per thread (4 codes in
// 32 bits, 4 params in 16 bytes for float32, 8 for bfloat16/float16), 4
// independent elements in flight per thread, and two warps to reduce the absmax
// over (one butterfly each, one barrier).  32 resident blocks (the per-SM block
// limit on sm_80/sm_90) hold 2048 threads, so only registers limit occupancy:
// Lion's variants use 32–45 (full to 2/3), Adam's 56–63 (16 blocks, 1024 threads).
// Misaligned arrays and the partial last block of a tensor load element by element.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "../fp8_states.h"
#include "../step_math.h"
#include "block_reduce.cuh"
#include "device_table.h"
#include "element_walk.cuh"
#include "param_rounding.cuh"
#include "telemetry.cuh"

namespace amos_fused::cuda {

constexpr int kFp8Threads = 64;
constexpr int kFp8PerThread = static_cast<int>(kFp8Block) / kFp8Threads;
static_assert(kFp8PerThread * kFp8Threads == kFp8Block, "a thread block covers one FP8 block");
// The table maps every kFp8GroupBlocks-th FP8 block to its tensor (host work per
// step ∝ blocks/64, not blocks); a thread block finds its own tensor from there
// by a binary search of first_block (fp8_tensor_of).
constexpr int64_t kFp8GroupBlocks = 64;

// Adam(W): x = θ, g, m, v → adam_update<false, L2> (csrc/step_math.h); v is left
// as the root it returns, sqrt(v), the stored form of exp_avg_sq.
template <bool L2>
struct Fp8AdamUpdate {
  static constexpr int kStates = 2;
  static constexpr unsigned kRootMask = 0b10u;  // state 1 (exp_avg_sq) stored as sqrt(v)
  __device__ __forceinline__ void operator()(float (&x)[4], const AdamCoef<float>& c) const {
    x[3] = adam_update<false, L2>(x[0], x[1], x[2], x[3], x[3], c);
  }
};

// RAdam: x = θ, g, m, v → radam_update<L2> (csrc/step_math.h); v is left as the
// root it returns, sqrt(v).
template <bool L2>
struct Fp8RAdamUpdate {
  static constexpr int kStates = 2;
  static constexpr unsigned kRootMask = 0b10u;  // state 1 (exp_avg_sq) stored as sqrt(v)
  __device__ __forceinline__ void operator()(float (&x)[4], const RAdamCoef<float>& c) const {
    x[3] = radam_update<L2>(x[0], x[1], x[2], x[3], c);
  }
};

// Lion: x = θ, g, m → lion_update (csrc/step_math.h).
struct Fp8LionUpdate {
  static constexpr int kStates = 1;
  static constexpr unsigned kRootMask = 0u;
  __device__ __forceinline__ void operator()(float (&x)[3], const LionCoef<float>& c) const {
    lion_update(x[0], x[1], x[2], c);
  }
};

// The device view of a bucket's table (cuda/fp8.cu builds it).  Arrays of
// tensor t: address[0][t] param, [1][t] grad, [2 + k][t] codes of state k,
// [2 + S + k][t] its absmax (float32, one per block).
template <typename Coef, int S>
struct Fp8Table {
  static constexpr int kArrays = 2 + 2 * S;
  void* const* address[kArrays];
  const int64_t* numel;
  const int64_t* first_block;   // n + 1: tensor t owns blocks [first_block[t], first_block[t + 1])
  const int32_t* group_tensor;  // per group of kFp8GroupBlocks blocks: its first block's tensor; then n − 1
  const int32_t* coef_index;
  const Coef* coefs;
  const RoundKey* round;  // per tensor with stochastic rounding, else null
};

// The tensor owning `block`: the largest t in [group_tensor[g], group_tensor[g + 1]]
// with first_block[t] ≤ block (an empty tensor t' has first_block[t'] = first_block[t' + 1],
// so the largest such t owns blocks).
template <typename Coef, int S>
__device__ __forceinline__ int64_t fp8_tensor_of(const Fp8Table<Coef, S>& table, int64_t block) {
  const int64_t group = block / kFp8GroupBlocks;
  int64_t lo = table.group_tensor[group], hi = table.group_tensor[group + 1];
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// kFp8PerThread elements of one array: one access of this many bytes when vector.
template <typename T>
struct alignas(sizeof(T) * kFp8PerThread) Fp8Lanes {
  T lane[kFp8PerThread];
};

// This thread's elements at src: one vector load when `vector`, else the first
// `count` one by one (the rest zero).
template <typename T>
__device__ __forceinline__ void fp8_load(const T* src, bool vector, int count, T (&out)[kFp8PerThread]) {
  if (vector) {
    const Fp8Lanes<T> lanes = *reinterpret_cast<const Fp8Lanes<T>*>(src);
#pragma unroll
    for (int j = 0; j < kFp8PerThread; ++j) out[j] = lanes.lane[j];
    return;
  }
#pragma unroll
  for (int j = 0; j < kFp8PerThread; ++j) out[j] = j < count ? src[j] : T{};
}

template <typename T>
__device__ __forceinline__ void fp8_store(T* dst, bool vector, int count, const T (&in)[kFp8PerThread]) {
  if (vector) {
    Fp8Lanes<T> lanes;
#pragma unroll
    for (int j = 0; j < kFp8PerThread; ++j) lanes.lane[j] = in[j];
    *reinterpret_cast<Fp8Lanes<T>*>(dst) = lanes;
    return;
  }
#pragma unroll
  for (int j = 0; j < kFp8PerThread; ++j) {
    if (j < count) dst[j] = in[j];
  }
}

template <typename T>
__device__ __forceinline__ bool fp8_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Fp8Lanes<T>) == 0;
}

// top[k] ← the largest top[k] of the block's kThreads threads, for every thread.
// The values are |x| bits, which order like |x| as integers with NaN above +Inf,
// so the max propagates NaN (the CPU kernel's fp8_abs_max).  Call once per kernel.
template <int kThreads, int S>
__device__ __forceinline__ void block_max_bits(uint32_t (&top)[S]) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ uint32_t buffer[S][kWarps];
#pragma unroll
  for (int k = 0; k < S; ++k) {
    uint32_t value = top[k];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const uint32_t other = __shfl_xor_sync(0xffffffffu, value, offset);
      value = other > value ? other : value;
    }
    if (threadIdx.x % kWarpSize == 0) buffer[k][threadIdx.x / kWarpSize] = value;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < S; ++k) {
    top[k] = buffer[k][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) top[k] = buffer[k][w] > top[k] ? buffer[k][w] : top[k];
  }
}

// One FP8 block per thread block (grid: every block of the bucket).  TELEMETRY:
// the block's Σθ², Σ(Δθ)² into telemetry_partials[2·block], [2·block + 1];
// ROUND: θ stored with stochastic rounding (table.round, bfloat16 only).
template <typename scalar_t, bool TELEMETRY, bool ROUND, typename Coef, typename Update>
__global__ void __launch_bounds__(kFp8Threads)
    fp8_step_kernel(Fp8Table<Coef, Update::kStates> table, Update update, double* telemetry_partials) {
  constexpr int S = Update::kStates;
  constexpr int kPer = kFp8PerThread;
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, float>, "FP8 states are stepped in float32");
  const int64_t block = blockIdx.x;
  const int64_t t = fp8_tensor_of(table, block);
  const int64_t index = block - table.first_block[t];  // the block within its tensor
  const int64_t begin = index * kFp8Block;              // its first element
  const int64_t rest = table.numel[t] - begin;
  const int len = static_cast<int>(rest < kFp8Block ? rest : kFp8Block);
  const int first = static_cast<int>(threadIdx.x) * kPer;  // this thread's elements: [first, first + kPer)
  const int count = len - first < 0 ? 0 : (len - first > kPer ? kPer : len - first);

  scalar_t* p = static_cast<scalar_t*>(table.address[0][t]) + begin;
  const scalar_t* g = static_cast<const scalar_t*>(table.address[1][t]) + begin;
  assume_global(p);
  assume_global(g);
  uint8_t* codes[S];
  float* absmax[S];
  float factor[S];
  bool vector = len == kFp8Block && fp8_aligned(p) && fp8_aligned(g);
#pragma unroll
  for (int k = 0; k < S; ++k) {
    codes[k] = static_cast<uint8_t*>(table.address[2 + k][t]) + begin;
    absmax[k] = static_cast<float*>(table.address[2 + S + k][t]) + index;
    assume_global(codes[k]);
    assume_global(absmax[k]);
    vector = vector && fp8_aligned(codes[k]);
    factor[k] = fp8_decode_factor(*absmax[k]);  // read by all before thread 0 writes it (after a barrier)
  }

  scalar_t pv[kPer], gv[kPer];
  uint8_t cv[S][kPer];
  fp8_load(p + first, vector, count, pv);
  fp8_load(g + first, vector, count, gv);
#pragma unroll
  for (int k = 0; k < S; ++k) fp8_load(codes[k] + first, vector, count, cv[k]);

  const Coef coef = table.coefs[table.coef_index[t]];
  const ParamRounding<ROUND> rounding(table.round, t);
  [[maybe_unused]] TelemetrySums<scalar_t> sums;
  float stored[S][kPer];  // the new states in their stored form (sqrt(v) for a root state)
  uint32_t top[S];        // bits of the largest |stored value|
#pragma unroll
  for (int k = 0; k < S; ++k) top[k] = 0u;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (j >= count) continue;
    float x[2 + S];
    x[0] = static_cast<float>(pv[j]);
    x[1] = static_cast<float>(gv[j]);
#pragma unroll
    for (int k = 0; k < S; ++k) {
      const float value = fp8_decode(cv[k][j], factor[k]);
      x[2 + k] = (Update::kRootMask >> k) & 1u ? value * value : value;
    }
    [[maybe_unused]] const float before = x[0];
    update(x, coef);
#pragma unroll
    for (int k = 0; k < S; ++k) {
      stored[k][j] = x[2 + k];
      const uint32_t bits = fp8_bits_of(x[2 + k]) & 0x7fffffffu;
      top[k] = bits > top[k] ? bits : top[k];
    }
    x[0] = rounding(x[0], begin + first + j);
    if constexpr (TELEMETRY) sums.add(x[0], before);
    pv[j] = static_cast<scalar_t>(x[0]);
  }
  fp8_store(p + first, vector, count, pv);

  block_max_bits<kFp8Threads, S>(top);
#pragma unroll
  for (int k = 0; k < S; ++k) {
    const float block_absmax = fp8_stored_absmax(fp8_float_of(top[k]));
    const float encode = fp8_encode_factor(block_absmax);
    uint8_t out[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      // all zeros, or non-finite: codes 0 (fp8_states.h)
      out[j] = block_absmax > 0.0f ? fp8_encode(j < count ? stored[k][j] : 0.0f, encode) : uint8_t(0);
    }
    fp8_store(codes[k] + first, vector, count, out);
    if (threadIdx.x == 0) *absmax[k] = block_absmax;
  }
  if constexpr (TELEMETRY) {
    store_block_telemetry<kFp8Threads>(sums, telemetry_partials + 2 * block);
  }
}

}  // namespace amos_fused::cuda
