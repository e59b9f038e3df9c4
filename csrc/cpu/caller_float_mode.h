// at::parallel_for with each task run in the calling thread's handling of
// subnormal floats.  torch.set_flush_denormal(True) sets flush-to-zero and
// denormals-are-zero (MXCSR) on the calling thread only, not on torch's other
// threads, so without this the elements a worker thread steps would keep their
// subnormals while the caller's flushed them: results would depend on the
// thread count.  Include after defining CPU_CAPABILITY.
#pragma once

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define AMOS_FUSED_HAS_MXCSR 1
#endif

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

#if defined(AMOS_FUSED_HAS_MXCSR)
// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
constexpr unsigned kFlushBits = 0x8040u;

// Sets this thread's flush bits to `wanted` while it lives, where they differ.
class FlushBitsScope {
 public:
  explicit FlushBitsScope(unsigned wanted) : own_(_mm_getcsr()) {
    if ((own_ & kFlushBits) != wanted) _mm_setcsr((own_ & ~kFlushBits) | wanted);
  }
  ~FlushBitsScope() { _mm_setcsr(own_); }
  FlushBitsScope(const FlushBitsScope&) = delete;
  FlushBitsScope& operator=(const FlushBitsScope&) = delete;

 private:
  unsigned own_;
};
#endif

template <typename F>
inline void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, const F& f) {
#if defined(AMOS_FUSED_HAS_MXCSR)
  const unsigned caller = _mm_getcsr() & kFlushBits;
  at::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) {
    FlushBitsScope scope(caller);
    f(lo, hi);
  });
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
