// The bandwidth floor of a fused step: a pass over a bucket that moves exactly
// the bytes of an algorithm's pass (W streams read and written in place, R
// streams only read, 1 <= W <= 4, 1 <= R <= 3) with trivial math, walked by the
// same bucket loop as the real kernels (for_each_segment + map_streams: same
// split over threads, same SIMD tiles).  Per element: s = r_0 + ... + r_{R-1},
// then w_k += s for every written stream — every load and store is needed for
// the result, so the compiler cannot drop any.
//
// Included by the per-ISA kernel files (cpu/kernels_<isa>.cpp) after
// kernels_impl.h, so it is compiled once per instruction set exactly as the
// step kernels are; the op (cpu/stream_floor.cpp) picks the table of the
// instruction set the step kernels run with.
#pragma once

#include <ATen/Dispatch.h>

#include "bucket_loop.h"
#include "stream_floor_api.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, int W, int R>
void stream_floor_typed(const StreamFloorLaunch& L) {
  constexpr int N = W + R;
  constexpr unsigned kWriteMask = (1u << W) - 1u;  // the written streams come first
  for_each_segment(L.bucket, [&](int64_t t, int64_t begin, int64_t end) {
    std::array<scalar_t*, N> ptr;
    for (int s = 0; s < W; ++s) ptr[s] = stream<scalar_t>(L.written[s], t);
    for (int s = 0; s < R; ++s) ptr[W + s] = stream<scalar_t>(L.read[s], t);
    map_streams<scalar_t, N, kWriteMask>(ptr, begin, end, [](auto& x) {
      auto sum = x[W];
      for (int s = W + 1; s < W + R; ++s) sum = sum + x[s];
      for (int s = 0; s < W; ++s) x[s] = x[s] + sum;
    });
  });
}

template <typename scalar_t, int W>
void stream_floor_reads(const StreamFloorLaunch& L) {
  switch (L.num_read) {
    case 1: return stream_floor_typed<scalar_t, W, 1>(L);
    case 2: return stream_floor_typed<scalar_t, W, 2>(L);
    case 3: return stream_floor_typed<scalar_t, W, 3>(L);
    default: TORCH_CHECK(false, "amos_fused.stream_floor: unsupported number of read streams ", L.num_read);
  }
}

inline void stream_floor_kernel(const StreamFloorLaunch& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, L.bucket.dtype, "amos_fused_stream_floor", [&] {
    switch (L.num_written) {
      case 1: return stream_floor_reads<scalar_t, 1>(L);
      case 2: return stream_floor_reads<scalar_t, 2>(L);
      case 3: return stream_floor_reads<scalar_t, 3>(L);
      case 4: return stream_floor_reads<scalar_t, 4>(L);
      default:
        TORCH_CHECK(false, "amos_fused.stream_floor: unsupported number of written streams ", L.num_written);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu

#define AMOS_FUSED_DEFINE_STREAM_FLOOR(getter) \
  amos_fused::cpu::StreamFloorFn amos_fused::cpu::getter() { return &stream_floor_kernel; }
