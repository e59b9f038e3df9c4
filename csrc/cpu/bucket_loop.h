// How the CPU kernels walk memory: the elements of a whole bucket are split
// evenly over the threads (at::parallel_for over the virtual concatenation of
// its tensors), and each thread streams through its share tensor by tensor in
// SIMD tiles with a scalar tail.  Include after defining CPU_CAPABILITY.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec_ops.h"  // before anything that includes step_math.h
#include "caller_float_mode.h"
#include "kernel_api.h"
#include "../stochastic_round.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Below this many elements a bucket is stepped by one thread.
constexpr int64_t kGrainSize = 32768;

// How many pieces a bucket of `total` elements is cut into (one per thread).
inline int64_t num_chunks(int64_t total) {
  const int64_t by_size = (total + kGrainSize - 1) / kGrainSize;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
}

// Cuts the virtual concatenation of a bucket's tensors into `chunks` equal
// pieces, stepped in parallel, and calls f(chunk, tensor, begin, end) for every
// part of a tensor inside a piece.  The cut depends only on `chunks`, so
// reductions combined chunk by chunk are deterministic.
template <typename F>
inline void for_each_chunk_segment(const BucketView& bucket, int64_t chunks, const F& f) {
  const int64_t n = bucket.num_tensors;
  const int64_t* offsets = bucket.offsets;
  const int64_t total = offsets[n];
  if (total == 0) return;
  parallel_for_as_caller(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
      int64_t lo = total / chunks * chunk + std::min(chunk, total % chunks);
      const int64_t hi = lo + total / chunks + (chunk < total % chunks ? 1 : 0);
      int64_t t = std::upper_bound(offsets, offsets + n + 1, lo) - offsets - 1;
      while (lo < hi) {
        const int64_t stop = std::min(hi, offsets[t + 1]);
        if (stop > lo) f(chunk, t, lo - offsets[t], stop - offsets[t]);
        lo = stop;
        ++t;
      }
    }
  });
}

// Calls f(tensor, begin, end) for every piece of every tensor, in parallel.
template <typename F>
inline void for_each_segment(const BucketView& bucket, const F& f) {
  for_each_chunk_segment(bucket, num_chunks(bucket.offsets[bucket.num_tensors]),
                         [&](int64_t, int64_t t, int64_t begin, int64_t end) { f(t, begin, end); });
}

// Σθ² and Σ(Δθ)² of a piece of one tensor, as stored (telemetry of a step).
struct Telemetry {
  double weight_sq = 0.0;
  double update_sq = 0.0;
};

// With telemetry each tensor is cut into blocks of this many elements from its
// own start; a block's sums are taken whole by whichever thread steps it.
constexpr int64_t kTelemetryBlock = 16384;

// for_each_segment's walk, calling f(tensor, begin, end, sums) with sums null
// when `telemetry` is null.  Otherwise the pieces are telemetry blocks, each
// with its own sums, added block by block in order into telemetry[2t] (Σθ²) and
// telemetry[2t + 1] (Σ(Δθ)²): bitwise the same for any thread count.
template <typename F>
inline void for_each_tracked_segment(const BucketView& bucket, double* telemetry, const F& f) {
  if (telemetry == nullptr) {
    for_each_segment(bucket, [&](int64_t t, int64_t begin, int64_t end) { f(t, begin, end, nullptr); });
    return;
  }
  const int64_t n = bucket.num_tensors;
  const int64_t* offsets = bucket.offsets;
  std::vector<int64_t> first_block(n + 1, 0);  // tensor t owns blocks [first_block[t], first_block[t+1])
  for (int64_t t = 0; t < n; ++t)
    first_block[t + 1] = first_block[t] + (offsets[t + 1] - offsets[t] + kTelemetryBlock - 1) / kTelemetryBlock;
  std::vector<Telemetry> partial(first_block[n]);
  parallel_for_as_caller(0, first_block[n], std::max<int64_t>(1, kGrainSize / kTelemetryBlock),
                   [&](int64_t lo, int64_t hi) {
    int64_t t = std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin() - 1;
    for (int64_t block = lo; block < hi; ++block) {
      while (block >= first_block[t + 1]) ++t;
      const int64_t begin = (block - first_block[t]) * kTelemetryBlock;
      f(t, begin, std::min(offsets[t + 1] - offsets[t], begin + kTelemetryBlock), &partial[block]);
    }
  });
  for (int64_t t = 0; t < n; ++t) {
    Telemetry sums;
    for (int64_t block = first_block[t]; block < first_block[t + 1]; ++block) {
      sums.weight_sq += partial[block].weight_sq;
      sums.update_sq += partial[block].update_sq;
    }
    telemetry[2 * t] = sums.weight_sq;
    telemetry[2 * t + 1] = sums.update_sq;
  }
}

// Tensor t's stream of a bucket, typed.
template <typename T>
inline T* stream(void* const* table, int64_t t) { return static_cast<T*>(table[t]); }
template <typename T>
inline T* stream(const void* const* table, int64_t t) {
  return const_cast<T*>(static_cast<const T*>(table[t]));  // read-only: never stored
}

#if defined(CPU_CAPABILITY_AVX512) && defined(AMOS_FUSED_AVX512_BF16)
// Whether vcvtne(2)ps2bf16 rounds x's lanes to nearest even as torch's vector
// conversion does: not for a denormal (read as zero) or a NaN (kept, where torch
// writes 0xffff); tiles with such a lane take torch's conversion, so the bits do
// not depend on the instruction set.  (Normal values round to normal bfloat16
// values or infinities, never to denormals.)
inline bool bf16_lanes_plain(const __m512& x) {
  return _mm512_fpclass_ps_mask(x, 0xa1) == 0;  // not QNaN (0x01), denormal (0x20) or SNaN (0x80)
}
#endif

// One float vector of bfloat16 or float16 values: widened exactly on load, rounded
// to nearest even on store.  The halves of a reduced tile (ReducedTileIO) load
// through it; and a bucket with master weights (kernel_api.h: BucketView), walked
// exactly as a float32 bucket (float32 tiles of one vector: the same sums and tails
// as float32 params), streams its Low values (the grads, the params written) through it.
template <typename Low>
struct LowLanes {
  using Vec = Vectorized<float>;
  static_assert(std::is_same_v<Low, c10::BFloat16> || std::is_same_v<Low, c10::Half>, "bfloat16 or float16");
  static Vec load(const Low* src) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    if constexpr (std::is_same_v<Low, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));  // exact
    } else {
      return _mm256_cvtph_ps(raw);  // exact
    }
#elif defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    if constexpr (std::is_same_v<Low, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));  // exact
    } else {
      return _mm512_cvtph_ps(raw);  // exact
    }
#else
    float lanes[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) lanes[k] = static_cast<float>(src[k]);
    return Vec::loadu(lanes);
#endif
  }
  // x rounded to nearest even.
  static void store(Low* dst, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<Low, c10::BFloat16>) {
      const __m256i both = at::vec::convert_from_float<c10::BFloat16>(x, x);  // x's lanes, twice
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(both));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
#elif defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<Low, c10::BFloat16>) {
#if defined(AMOS_FUSED_AVX512_BF16)
      if (__builtin_expect(bf16_lanes_plain(x), 1)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
        return;
      }
#endif
      const __m512i both = at::vec::convert_from_float<c10::BFloat16>(x, x);  // x's lanes, twice
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_castsi512_si256(both));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
#else
    float lanes[Vec::size()];
    x.store(lanes);
    for (int64_t k = 0; k < Vec::size(); ++k) dst[k] = static_cast<Low>(lanes[k]);
#endif
  }
};

// Loads and stores a tile of a storage dtype as opmath vectors.
template <typename scalar_t>
struct TileIO {
  using Vec = Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kTile = Vec::size();
  static void load(const scalar_t* src, Vec* out) { out[0] = Vec::loadu(src); }
  static void store(scalar_t* dst, const Vec* in) { in[0].store(dst); }
};

template <typename reduced_t>
struct ReducedTileIO {
  using Vec = Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kTile = Vectorized<reduced_t>::size();
  static_assert(kTile == 2 * Vec::size(), "reduced tile must hold two float vectors");
  static void load(const reduced_t* src, Vec* out) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // each half widened straight from memory (at::vec loads the whole tile, then
    // extracts its upper half: two more instructions)
    out[0] = LowLanes<reduced_t>::load(src);
    out[1] = LowLanes<reduced_t>::load(src + Vec::size());
#else
    auto halves = at::vec::convert_to_float<reduced_t>(Vectorized<reduced_t>::loadu(src));
    out[0] = std::get<0>(halves);
    out[1] = std::get<1>(halves);
#endif
  }
  static void store(reduced_t* dst, const Vec* in) {
#if defined(CPU_CAPABILITY_AVX512) && defined(AMOS_FUSED_AVX512_BF16)
    if constexpr (std::is_same_v<reduced_t, c10::BFloat16>) {
      if (__builtin_expect(bf16_lanes_plain(in[0]) & bf16_lanes_plain(in[1]), 1)) {
        _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(in[1], in[0]));
        return;
      }
    }
#endif
    at::vec::convert_from_float<reduced_t>(in[0], in[1]).store(dst);
  }
};
template <>
struct TileIO<c10::BFloat16> : ReducedTileIO<c10::BFloat16> {};
template <>
struct TileIO<c10::Half> : ReducedTileIO<c10::Half> {};

// The Low type of a bucket without master weights.
struct NoLow {};

// Calls f(scalar_t{}, Low{}): the type of the bucket's streams and, with master
// weights (float32 streams), the type of its low-precision params, else NoLow.
template <typename F>
void dispatch_streams(const BucketView& bucket, const char* name, const F& f) {
  if (bucket.low_params != nullptr) {
    TORCH_CHECK(bucket.dtype == at::kFloat, name, ": master weights are float32, got ", bucket.dtype);
    if (bucket.low_dtype == at::kBFloat16) {
      f(float{}, c10::BFloat16{});
    } else {
      TORCH_CHECK(bucket.low_dtype == at::kHalf, name, ": low params are bfloat16 or float16");
      f(float{}, c10::Half{});
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bucket.dtype, "amos_fused_step", [&] { f(scalar_t{}, NoLow{}); });
}

// Tensor t's low-precision param (master weights), or null.
template <typename Low>
inline Low* low_stream(const BucketView& bucket, int64_t t) {
  if constexpr (std::is_same_v<Low, NoLow>) {
    return nullptr;
  } else {
    return static_cast<Low*>(bucket.low_params[t]);
  }
}

// Coefficients of one tensor, in both the vector and the scalar opmath type.
template <template <typename> class Coef, typename scalar_t>
struct TileCoef {
  using Vec = typename TileIO<scalar_t>::Vec;
  using Op = at::opmath_type<scalar_t>;
  Coef<Vec> vec;
  Coef<Op> scalar;
  explicit TileCoef(const Coef<double>& c)
      : vec(c.template map<Vec>([](double x) { return Vec(static_cast<Op>(x)); })),
        scalar(c.template map<Op>([](double x) { return static_cast<Op>(x); })) {}
  template <typename V>
  const Coef<V>& get() const {
    if constexpr (std::is_same_v<V, Vec>) return vec; else return scalar;
  }
};

// An allocator that asks operator new for T's alignment.  In a SIMD build the
// standard library is parsed before the target pragma (csrc/simd/
// target_independent_includes.h), and GCC's std::allocator instantiated there hands
// an over-aligned T (a TileCoef of 32- or 64-byte vectors) memory aligned to 16
// bytes only, where the vector stores fault.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(alignof(T))));
  }
  void deallocate(T* p, std::size_t n) noexcept { ::operator delete(p, n * sizeof(T), std::align_val_t(alignof(T))); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
  friend bool operator!=(const AlignedAllocator&, const AlignedAllocator&) { return false; }
};

// The coefficients of a bucket's tensors, one TileCoef each.
template <template <typename> class Coef, typename scalar_t>
using TileCoefs = std::vector<TileCoef<Coef, scalar_t>, AlignedAllocator<TileCoef<Coef, scalar_t>>>;

// Stochastic rounding of one tensor's elements (csrc/stochastic_round.h), with
// the hash's per-tensor part kept for the current high word of the pair index.
class TensorRounding {
 public:
  explicit TensorRounding(const StochasticRound& round)
      : round_(round), base_(round_base(round.key, round.step, 0)) {}

  // x rounded to a bfloat16 value, x being element `index`.
  float scalar(float x, int64_t index) {
    const uint64_t e = static_cast<uint64_t>(index);
    const uint64_t pair = e >> 1;
    const uint32_t word = round_bits(base_for(static_cast<uint32_t>(pair >> 32)), static_cast<uint32_t>(pair));
    return round_to_bfloat16(x, element_bits(word, e));
  }

  // The float lanes of a bfloat16 tile, x[0] then x[1] (elements first, first + 1,
  // …), rounded to bfloat16 values in place.  From an even `first`, one hash
  // lane serves two elements (its low half the even one, its high half the odd
  // one): the hash words read as 16-bit halves and zero-extended.
  void tile(Vectorized<float> (&x)[2], int64_t first) {
    constexpr int64_t kLanes = Vectorized<float>::size();  // the tile's pairs
    const uint64_t e = static_cast<uint64_t>(first);
    const uint64_t pair = e >> 1;
    if ((e & 1u) || (pair & 0xffffffffu) + kLanes - 1 > 0xffffffffu) {  // (rare)
      tile_by_lanes(x, first);
      return;
    }
    const uint32_t base = base_for(static_cast<uint32_t>(pair >> 32));
    const int32_t lo = static_cast<int32_t>(static_cast<uint32_t>(pair));
#if defined(CPU_CAPABILITY_AVX2)
    __m256i h = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int32_t>(base)),
                                 _mm256_add_epi32(_mm256_set1_epi32(lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));  // lowbias32 on the lanes
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x846ca68bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    const __m256i bits[2] = {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)),
                             _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1))};
    for (int part = 0; part < 2; ++part) {
      const __m256 xf = x[part];
      const __m256i sum = _mm256_add_epi32(_mm256_castps_si256(xf), bits[part]);
      const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(sum, _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))));
      // NaN: the bits 0xffff0000, which store() stores as torch's vector conversion does (0xffff)
      x[part] = _mm256_blendv_ps(rounded, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))),
                                 _mm256_cmp_ps(xf, xf, _CMP_UNORD_Q));
    }
#elif defined(CPU_CAPABILITY_AVX512)
    // the AVX2 path above on 16 lanes
    __m512i h = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int32_t>(base)),
                                 _mm512_add_epi32(_mm512_set1_epi32(lo),
                                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(0x846ca68bu)));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    const __m512i bits[2] = {_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)),
                             _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1))};
    for (int part = 0; part < 2; ++part) {
      const __m512 xf = x[part];
      const __m512i sum = _mm512_add_epi32(_mm512_castps_si512(xf), bits[part]);
      const __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(sum, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
      x[part] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(xf, xf, _CMP_UNORD_Q), rounded,  // NaN as on AVX2
                                     _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
    }
#else
    // lane by lane in uint32_t (the default build's vectors are arrays; its int32
    // lanes would overflow, which C++ leaves undefined): the header's round_bits,
    // each word serving its pair, and round_to_bfloat16 (NaN kept)
    (void)lo;
    float lanes[2 * kLanes];
    x[0].store(lanes);
    x[1].store(lanes + kLanes);
    for (int64_t k = 0; k < 2 * kLanes; ++k) {
      const uint32_t word = round_bits(base, static_cast<uint32_t>(pair) + static_cast<uint32_t>(k >> 1));
      lanes[k] = round_to_bfloat16(lanes[k], element_bits(word, static_cast<uint64_t>(k)));
    }
    x[0] = Vectorized<float>::loadu(lanes);
    x[1] = Vectorized<float>::loadu(lanes + kLanes);
#endif
  }

  // Stores a tile of tile()'s results (bfloat16 values, NaN as 0xffff0000 bits on
  // AVX2/AVX-512) as bfloat16: the high halves, no rounding left to do.
  template <typename IO>
  static void store(c10::BFloat16* dst, const Vectorized<float>* in) {
    static_assert(IO::kParts == 2, "a bfloat16 tile holds two float vectors");
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i words = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(in[0]), 16),
                                              _mm256_srli_epi32(_mm256_castps_si256(in[1]), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(words, 0xd8));
#elif defined(CPU_CAPABILITY_AVX512)
    const __m512i high_words = _mm512_setr_epi32(  // word 2j + 1 of the pair, j = 0..31
        0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015, 0x001b0019, 0x001f001d,
        0x00230021, 0x00270025, 0x002b0029, 0x002f002d, 0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(_mm512_castps_si512(in[0]), high_words,
                                                      _mm512_castps_si512(in[1])));
#else
    IO::store(dst, in);
#endif
  }

 private:
  // tile() lane by lane: an odd first element, or pairs that cross into the next
  // high word of the pair index; out of line, so that tile() stays small enough
  // to be inlined with its values in registers.
  [[gnu::noinline, gnu::cold]] void tile_by_lanes(Vectorized<float> (&x)[2], int64_t first) {
    constexpr int64_t kLanes = Vectorized<float>::size();
    float lanes[2 * kLanes];
    x[0].store(lanes);
    x[1].store(lanes + kLanes);
    for (int64_t k = 0; k < 2 * kLanes; ++k) lanes[k] = scalar(lanes[k], first + k);
    x[0] = Vectorized<float>::loadu(lanes);
    x[1] = Vectorized<float>::loadu(lanes + kLanes);
  }

  uint32_t base_for(uint32_t hi) {
    if (hi != hi_) {
      hi_ = hi;
      base_ = round_base(round_.key, round_.step, hi);
    }
    return base_;
  }

  StochasticRound round_;
  uint32_t hi_ = 0;
  uint32_t base_;
};

// Σθ² and Σ(Δθ)² of the pieces of one tensor streamed so far: opmath lanes for
// the SIMD tiles, double for the scalar tails; added into a Telemetry by flush().
template <typename scalar_t>
struct PieceSums {
  using Vec = typename TileIO<scalar_t>::Vec;
  using Op = at::opmath_type<scalar_t>;
  Vec weight_sq = Vec(Op(0));
  Vec update_sq = Vec(Op(0));
  double tail_weight = 0.0;
  double tail_update = 0.0;

  void flush(Telemetry* sums) const {
    Op lanes_weight[Vec::size()], lanes_update[Vec::size()];
    weight_sq.store(lanes_weight);
    update_sq.store(lanes_update);
    for (int64_t k = 0; k < Vec::size(); ++k) {
      sums->weight_sq += lanes_weight[k];
      sums->update_sq += lanes_update[k];
    }
    sums->weight_sq += tail_weight;
    sums->update_sq += tail_update;
  }
};

// Streams N arrays of one tensor over [begin, end): loads every stream, calls
// f(values) on an std::array of N opmath values (vectors, then the scalar
// tail), and stores back the streams whose bit is set in kWriteMask.  With
// `acc`, stream 0 is the param: Σθ² and Σ(Δθ)² of its stored values are added to
// *acc.  With `round` (bfloat16 params only), stream 0 is the param, stored with
// stochastic rounding (its elements' indices are the indices within the tensor).
// With master weights (Low not NoLow; scalar_t float): stream kLowStream (the
// grad; -1: none) holds Low values (its pointer cast to float*), and when stream
// 0, the float32 master, is written, `low` (the param; may be null otherwise)
// gets it rounded to nearest even.
template <typename scalar_t, int N, unsigned kWriteMask, typename F, typename Low = NoLow, int kLowStream = 1>
inline void map_streams_summed(const std::array<scalar_t*, N>& ptr, int64_t begin, int64_t end, const F& f,
                               PieceSums<scalar_t>* acc, const StochasticRound* round = nullptr,
                               Low* low = nullptr) {
  constexpr bool kCanRound = std::is_same_v<scalar_t, c10::BFloat16> && (kWriteMask & 1u) != 0;
  constexpr bool kMaster = !std::is_same_v<Low, NoLow>;
  constexpr bool kWritesLow = kMaster && (kWriteMask & 1u) != 0;
  static_assert(!kMaster || (std::is_same_v<scalar_t, float> && kLowStream < N &&
                             (kLowStream < 0 || !((kWriteMask >> kLowStream) & 1u))),
                "master weights: float32 streams, the Low stream read only");
  using IO = TileIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Op = at::opmath_type<scalar_t>;
  // Only a stream 0 that is written can be a param (telemetry is off otherwise).
  const bool track = (kWriteMask & 1u) != 0 && acc != nullptr;
  std::optional<TensorRounding> rounding;
  if (kCanRound && round != nullptr) rounding.emplace(*round);
  // local accumulators (kept in registers: *acc could alias the streams), added into
  // *acc at the end (starting from zero, not from *acc: a run of short calls, one per
  // Amos row, does not chain each call's sums to the previous call's), and a second
  // pair for every other tile (swapped in after each tile): two chains of fused
  // multiply-adds, so the loop does not wait one FMA latency per tile
  Vec weight_sq = Vec(Op(0)), update_sq = Vec(Op(0));
  Vec weight_other = Vec(Op(0)), update_other = Vec(Op(0));
  double tail_weight = 0.0, tail_update = 0.0;
  auto one_element = [&](int64_t i) {  // the scalar step of element i
    std::array<Op, N> x;
    for (int s = 0; s < N; ++s) x[s] = static_cast<Op>(ptr[s][i]);
    if constexpr (kMaster && kLowStream >= 0) x[kLowStream] = static_cast<Op>(reinterpret_cast<const Low*>(ptr[kLowStream])[i]);
    const Op before = x[0];
    f(x);
    if constexpr (kCanRound) {
      if (rounding) x[0] = rounding->scalar(x[0], i);
    }
    for (int s = 0; s < N; ++s)
      if ((kWriteMask >> s) & 1u) ptr[s][i] = static_cast<scalar_t>(x[s]);
    if constexpr (kWritesLow) low[i] = static_cast<Low>(x[0]);
    if (track) {
      const Op after = static_cast<Op>(ptr[0][i]);
      tail_weight += static_cast<double>(after * after);
      tail_update += static_cast<double>((after - before) * (after - before));
    }
  };
  int64_t i = begin;
  if constexpr (kCanRound) {  // stochastic rounding hashes pairs of elements from an even one
    if (rounding && (i & 1) && i < end) one_element(i++);
  }
  for (; i + IO::kTile <= end; i += IO::kTile) {
    std::array<Vec, N> x[IO::kParts];
    for (int s = 0; s < N; ++s) {
      Vec tile[IO::kParts];
      if constexpr (kMaster) {
        if (s == kLowStream) {
          tile[0] = LowLanes<Low>::load(reinterpret_cast<const Low*>(ptr[s]) + i);
        } else {
          IO::load(ptr[s] + i, tile);
        }
      } else {
        IO::load(ptr[s] + i, tile);
      }
      for (int part = 0; part < IO::kParts; ++part) x[part][s] = tile[part];
    }
    Vec before[IO::kParts];
    for (int part = 0; part < IO::kParts; ++part) before[part] = x[part][0];
    for (int part = 0; part < IO::kParts; ++part) f(x[part]);
    if constexpr (kCanRound) {
      if (rounding) {
        static_assert(IO::kParts == 2, "a bfloat16 tile holds two float vectors");
        Vec param[2] = {x[0][0], x[1][0]};
        rounding->tile(param, i);
        x[0][0] = param[0];
        x[1][0] = param[1];
      }
    }
    for (int s = 0; s < N; ++s) {
      if (!((kWriteMask >> s) & 1u)) continue;
      Vec tile[IO::kParts];
      for (int part = 0; part < IO::kParts; ++part) tile[part] = x[part][s];
      if constexpr (kCanRound) {
        if (s == 0 && rounding) {
          TensorRounding::store<IO>(ptr[s] + i, tile);
          continue;
        }
      }
      IO::store(ptr[s] + i, tile);
      if constexpr (kWritesLow) {
        if (s == 0) LowLanes<Low>::store(low + i, tile[0]);  // the param, rounded to nearest even
      }
    }
    if (track) {
      Vec after[IO::kParts];
      if constexpr (IO::kParts == 1) {
        after[0] = x[0][0];
      } else {
        IO::load(ptr[0] + i, after);  // the values as rounded to storage
      }
      for (int part = 0; part < IO::kParts; ++part) {
        const Vec delta = after[part] - before[part];
        weight_sq = at::vec::fmadd(after[part], after[part], weight_sq);
        update_sq = at::vec::fmadd(delta, delta, update_sq);
      }
      std::swap(weight_sq, weight_other);
      std::swap(update_sq, update_other);
    }
  }
  for (; i < end; ++i) one_element(i);
  if (track) {
    acc->weight_sq = acc->weight_sq + (weight_sq + weight_other);
    acc->update_sq = acc->update_sq + (update_sq + update_other);
    acc->tail_weight += tail_weight;
    acc->tail_update += tail_update;
  }
}

// map_streams_summed over one piece, its sums (when `sums` is given) added into *sums.
template <typename scalar_t, int N, unsigned kWriteMask, int kLowStream = 1, typename F, typename Low = NoLow>
inline void map_streams(const std::array<scalar_t*, N>& ptr, int64_t begin, int64_t end,
                        const F& f, Telemetry* sums = nullptr, const StochasticRound* round = nullptr,
                        Low* low = nullptr) {
  if (sums == nullptr) {
    map_streams_summed<scalar_t, N, kWriteMask, F, Low, kLowStream>(ptr, begin, end, f, nullptr, round, low);
    return;
  }
  PieceSums<scalar_t> acc;
  map_streams_summed<scalar_t, N, kWriteMask, F, Low, kLowStream>(ptr, begin, end, f, &acc, round, low);
  acc.flush(sums);
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
