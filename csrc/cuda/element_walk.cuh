// How the CUDA kernels walk memory: the threads of a group stream through a range
// of elements of S same-dtype arrays, one pack (16 bytes unless a kernel asks for
// fewer) per array per load when every array is pack-aligned at the start of the
// range, one element at a time otherwise and for the tail.  Values are converted
// to the opmath type (float for float/bfloat16/half, double for double) in
// registers.  Indices are int64.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace amos_fused::cuda {

// A pack of kBytes bytes of storage elements: one vector load or store.
template <typename scalar_t, int kBytes = 16>
struct alignas(kBytes) Pack {
  static_assert(kBytes % sizeof(scalar_t) == 0 && kBytes >= static_cast<int>(sizeof(scalar_t)),
                "a pack holds whole elements");
  static constexpr int kWidth = kBytes / static_cast<int>(sizeof(scalar_t));
  scalar_t lane[kWidth];
};

// Addresses read from a table are generic pointers; telling the compiler they are
// global lets it emit global-memory loads and stores (LDG/STG).
__device__ __forceinline__ void assume_global(const void* ptr) {
#if defined(__CUDA_ARCH__)
  __builtin_assume(__isGlobal(ptr));
#else
  (void)ptr;
#endif
}

template <typename scalar_t, int S>
__device__ __forceinline__ bool all_aligned(scalar_t* const (&ptr)[S], int64_t begin, int bytes = 16) {
  bool aligned = true;
#pragma unroll
  for (int s = 0; s < S; ++s) aligned &= reinterpret_cast<uintptr_t>(ptr[s] + begin) % bytes == 0;
  return aligned;
}

// Elements [begin, end) of S arrays, shared by `group` threads of which this is
// `rank`: f(x, e) gets the opmath values x[0..S) of element e and may change them;
// arrays whose bit is set in kWriteMask are stored back.  kPackBytes: the bytes
// per array per load (16, or 8 where f is long enough that a 16-byte pack of
// 2-byte elements keeps more values live across its IEEE slow-path calls than
// the calling convention leaves registers for: ptxas then keeps one in local
// memory in the loop).
template <typename scalar_t, int S, unsigned kWriteMask, int kPackBytes = 16, typename F>
__device__ __forceinline__ void map_elements(scalar_t* const (&ptr)[S], int64_t begin, int64_t end,
                                             int rank, int group, const F& f) {
  using Op = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kPackBytes>;
  constexpr int W = P::kWidth;
#pragma unroll
  for (int s = 0; s < S; ++s) assume_global(ptr[s]);
  int64_t tail = begin;
  if (end - begin >= W && all_aligned(ptr, begin, kPackBytes)) {
    const int64_t packs = (end - begin) / W;
    for (int64_t q = rank; q < packs; q += group) {
      const int64_t first = begin + q * W;
      P pack[S];
#pragma unroll
      for (int s = 0; s < S; ++s) pack[s] = *reinterpret_cast<const P*>(ptr[s] + first);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        Op x[S];
#pragma unroll
        for (int s = 0; s < S; ++s) x[s] = static_cast<Op>(pack[s].lane[k]);
        f(x, first + k);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          if ((kWriteMask >> s) & 1u) pack[s].lane[k] = static_cast<scalar_t>(x[s]);
        }
      }
#pragma unroll
      for (int s = 0; s < S; ++s) {
        if ((kWriteMask >> s) & 1u) *reinterpret_cast<P*>(ptr[s] + first) = pack[s];
      }
    }
    tail = begin + packs * W;
  }
  for (int64_t e = tail + rank; e < end; e += group) {
    Op x[S];
#pragma unroll
    for (int s = 0; s < S; ++s) x[s] = static_cast<Op>(ptr[s][e]);
    f(x, e);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if ((kWriteMask >> s) & 1u) ptr[s][e] = static_cast<scalar_t>(x[s]);
    }
  }
}

}  // namespace amos_fused::cuda
