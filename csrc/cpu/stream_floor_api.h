// The plain-data interface of the bandwidth-floor kernel (cpu/stream_floor_kernel.h),
// compiled once per instruction set like the step kernels, and its op
// (cpu/stream_floor.cpp).
#pragma once

#include <cstdint>

#include "kernel_api.h"  // BucketView

namespace amos_fused::cpu {

struct StreamFloorLaunch {
  BucketView bucket;
  int64_t num_written;  // W: streams read and written in place
  int64_t num_read;     // R: streams only read
  void* const* const* written;     // written[k][t]: stream k of tensor t
  const void* const* const* read;  // read[k][t]
};

using StreamFloorFn = void (*)(const StreamFloorLaunch&);

// One kernel per instruction set (defined in cpu/kernels_<isa>.cpp).
StreamFloorFn stream_floor_default();
StreamFloorFn stream_floor_avx2();
StreamFloorFn stream_floor_avx512();

}  // namespace amos_fused::cpu
