// Division of non-negative 64-bit indices by a divisor fixed on the host: a
// multiply-high, an add and a shift instead of a 64-bit division (which the GPU
// runs as a subroutine call).  The round-up method of T. Granlund and P. Montgomery,
// "Division by invariant integers using multiplication", PLDI 1994 (section 4), the
// scheme of ATen's IntDivider (ATen/cuda/detail/IntegerDivider.cuh) at 64 bits:
// with l = ⌈log2 d⌉ and m = ⌊2^64·(2^l − d)/d⌋ + 1,  n / d = (mulhi(n, m) + n) >> l
// for 0 ≤ n < 2^63 (the sum then stays below 2^64).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace amos_fused::cuda {

struct FastDivisor {
  uint64_t magic;
  int64_t divisor;
  int32_t shift;
  int32_t unused;

  // Host side; 1 ≤ d < 2^63.
  static FastDivisor of(int64_t d) {
    TORCH_CHECK(d >= 1, "FastDivisor: divisor ", d, " is not positive");
    int32_t l = 0;
    while ((uint64_t{1} << l) < static_cast<uint64_t>(d)) ++l;  // d < 2^63, so l ≤ 63
    const unsigned __int128 two_l = static_cast<unsigned __int128>(1) << l;
    const unsigned __int128 m =
        ((two_l - static_cast<uint64_t>(d)) << 64) / static_cast<uint64_t>(d) + 1;  // < 2^64
    return {static_cast<uint64_t>(m), d, l, 0};
  }

  // n / divisor, for 0 ≤ n < 2^63.
  __host__ __device__ __forceinline__ int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
#if defined(__CUDA_ARCH__)
    const uint64_t t = __umul64hi(u, magic);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(u) * magic) >> 64);
#endif
    return static_cast<int64_t>((t + u) >> shift);
  }
};

}  // namespace amos_fused::cuda
