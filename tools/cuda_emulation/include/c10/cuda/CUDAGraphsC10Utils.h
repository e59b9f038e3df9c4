// Emulation stand-in (tools/cuda_emulation): never capturing.
#pragma once
namespace c10::cuda {
enum class CaptureStatus { None, Active };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace c10::cuda
