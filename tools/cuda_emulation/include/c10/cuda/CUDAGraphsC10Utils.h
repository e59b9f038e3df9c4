// Emulation stand-in (tools/cuda_emulation): capturing while emu_set_capturing(true).
#pragma once
namespace c10::cuda {
enum class CaptureStatus { None, Active };
inline bool emulated_capturing = false;
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return emulated_capturing ? CaptureStatus::Active : CaptureStatus::None;
}
}  // namespace c10::cuda
