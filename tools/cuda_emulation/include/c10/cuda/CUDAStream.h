// Emulation stand-in (tools/cuda_emulation): one stream, whose id a test may change.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
namespace c10::cuda {
inline c10::StreamId emulated_stream_id = 0;
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  c10::StreamId id() const { return emulated_stream_id; }
  c10::DeviceIndex device_index() const { return 0; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
