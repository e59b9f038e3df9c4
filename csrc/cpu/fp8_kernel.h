// The CPU kernel of the optimizers with block-scaled FP8 states (csrc/fp8_states.h):
// one pass, block by block.  A block of 256 elements is decoded and stepped tile
// by tile with the algorithm's own update (csrc/step_math.h, the same function as
// the full-precision kernels), its new states kept in float32 arrays (L1) while
// its new absmax is taken, then encoded back while the next block is stepped
// (Fp8PendingBlock).  Blocks are split over the threads freely (Amos8bit's rows:
// at row starts, fp8_amos_kernel.h); telemetry sums are per block, added in order
// per tensor (bitwise the same at any thread count).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "bucket_loop.h"
#include "../fp8_states.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

// Blocks per task of the parallel walk (32768 elements).
constexpr int64_t kFp8GrainBlocks = 128;
// How far ahead the block walk prefetches its streams, in elements.  On a 2-core
// AMD EPYC (39M params, AdamW8bit and Lion8bit) it took the step from 10-14% over
// the same bytes' copy loop to 5-9%; distances of 512 to 8192 all helped.
constexpr int64_t kFp8PrefetchAhead = 2048;

// False when codes[0, len) hold none of E4M3's NaN codes (0x7f, 0xff: never
// encoded, an edited state's): code·2 ≡ 0xfe as a byte for exactly those two, and
// is at most 0xfc for every other code, so the block's largest code·2 tells.
// Checked once per block, so that fp8_decode_tile can leave the NaN test out of
// blocks that have none (all of them, unless a state was edited).  The scalar
// build's decode tests each code anyway: true there, without a look.
inline bool fp8_codes_may_hold_nan(const uint8_t* codes, int64_t len) {
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
  (void)codes;
  (void)len;
  return true;
#else
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  __m512i top = _mm512_setzero_si512();
  for (; i + 64 <= len; i += 64) {
    const __m512i x = _mm512_loadu_si512(codes + i);
    top = _mm512_max_epu8(top, _mm512_add_epi8(x, x));
  }
  if (i < len) {  // the block's last codes, the bytes past them masked off (read as 0)
    const __m512i x = _mm512_maskz_loadu_epi8((__mmask64(1) << (len - i)) - 1, codes + i);
    top = _mm512_max_epu8(top, _mm512_add_epi8(x, x));
    i = len;
  }
  if (_mm512_cmpeq_epi8_mask(top, _mm512_set1_epi8(static_cast<char>(0xfe))) != 0) return true;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i top = _mm256_setzero_si256();
  for (; i + 32 <= len; i += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
    top = _mm256_max_epu8(top, _mm256_add_epi8(x, x));
  }
  if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(top, _mm256_set1_epi8(static_cast<char>(0xfe)))) != 0) return true;
#endif
  for (; i < len; ++i)
    if ((codes[i] & 0x7fu) == 0x7fu) return true;
  return false;
#endif
}

// Decodes the codes of one float vector at `codes` (8 with AVX2, 16 with AVX-512):
// e4m3_value(code)·factor, squared for a root state; NaN for E4M3's NaN codes,
// which are looked for only where `nan_codes` (fp8_codes_may_hold_nan of the block).
inline Vectorized<float> fp8_decode_tile(const uint8_t* codes, float factor, bool root, bool nan_codes) {
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(Vec::size() == 8, "an AVX2 float vector holds 8 lanes");
  // s eeee mmm → the binary16 s 0eeee mmm0000000, whose value is the code's / 2^8 (its
  // subnormals too, E = 0); F16C widens it exactly, and one multiply by factor·2^8
  // (exact: factor < 2^120) gives the code's value · factor, rounded once
  // (the code sign-extended to 16 bits and shifted by 7 holds s s eeee mmm 0000000: bit 14 cleared)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  const __m128i code = _mm_cvtepi8_epi16(bytes);
  const __m128i half = _mm_and_si128(_mm_slli_epi16(code, 7), _mm_set1_epi16(static_cast<int16_t>(0xbfff)));
  __m256 value = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(factor * 256.0f));
  if (__builtin_expect(nan_codes, 0)) {  // (rare: the NaN-free path is laid out inline)
    // a NaN code (code·2 ≡ 0xfe as a byte) sets every bit of its lane: a NaN
    const __m128i nan_code = _mm_cmpeq_epi8(_mm_add_epi8(bytes, bytes), _mm_set1_epi8(static_cast<char>(0xfe)));
    value = _mm256_or_ps(value, _mm256_castsi256_ps(_mm256_cvtepi8_epi32(nan_code)));
  }
  return root ? _mm256_mul_ps(value, value) : value;
#elif defined(CPU_CAPABILITY_AVX512)
  static_assert(Vec::size() == 16, "an AVX-512 float vector holds 16 lanes");
  // as the AVX2 path above, 16 codes at a time; the lanes of NaN codes (code·2 ≡ 0xfe
  // as a byte) are left out of the multiply and keep NaN
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m256i code = _mm256_cvtepi8_epi16(bytes);
  const __m256i half = _mm256_and_si256(_mm256_slli_epi16(code, 7), _mm256_set1_epi16(static_cast<int16_t>(0xbfff)));
  const __m512 scale = _mm512_set1_ps(factor * 256.0f);
  __m512 value;
  if (__builtin_expect(nan_codes, 0)) {  // (rare: the NaN-free path is laid out inline)
    const __mmask16 number = _mm_cmpneq_epi8_mask(_mm_add_epi8(bytes, bytes), _mm_set1_epi8(static_cast<char>(0xfe)));
    value = _mm512_mask_mul_ps(_mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)), number, _mm512_cvtph_ps(half), scale);
  } else {
    value = _mm512_mul_ps(_mm512_cvtph_ps(half), scale);
  }
  return root ? _mm512_mul_ps(value, value) : value;
#else
  (void)nan_codes;  // (fp8_decode tests each code)
  float lanes[Vec::size()];
  for (int64_t k = 0; k < Vec::size(); ++k) {
    const float x = fp8_decode(codes[k], factor);
    lanes[k] = root ? x * x : x;
  }
  return Vec::loadu(lanes);
#endif
}

// max(top, |x|) lane by lane, NaN propagating: as unsigned integers, the bits of
// |x| order like the values, with NaN above +Inf.  kRoot: x is a root state's
// value, ≥ +0 or NaN, whose bits need no clearing of the sign (a NaN whose sign
// is set is then the largest of all, and still a NaN).
template <bool kRoot>
inline Vectorized<float> fp8_abs_max(const Vectorized<float>& top, const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256i bits = _mm256_castps_si256(x);
  if constexpr (!kRoot) bits = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  return _mm256_castsi256_ps(_mm256_max_epu32(_mm256_castps_si256(top), bits));
#elif defined(CPU_CAPABILITY_AVX512)
  __m512i bits = _mm512_castps_si512(x);
  if constexpr (!kRoot) bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(top), bits));
#else
  return at::vec::maximum(top, x.abs());
#endif
}

// The largest lane of fp8_abs_max's result (NaN when a lane is NaN): the lanes
// hold the bits of |x| (or a NaN), so an unsigned maximum across them is the
// float one.
inline float fp8_lane_max(const Vectorized<float>& top) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256i m = _mm256_castps_si256(top);
  m = _mm256_max_epu32(m, _mm256_permute2x128_si256(m, m, 1));
  m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0x4e));
  m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0xb1));
  return _mm256_cvtss_f32(_mm256_castsi256_ps(m));
#elif defined(CPU_CAPABILITY_AVX512)
  return fp8_float_of(static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_castps_si512(top))));
#else
  float lanes[Vectorized<float>::size()];
  top.store(lanes);
  float block_max = 0.0f;
  for (float lane : lanes) block_max = af_max(block_max, lane);
  return block_max;
#endif
}

// f(k) for each state k in [0, S), k a compile-time constant (so that per-state
// arrays of vectors stay in registers).
template <int S, typename F>
inline void for_each_state(const F& f) {
  [&]<int... k>(std::integer_sequence<int, k...>) { (f(std::integral_constant<int, k>{}), ...); }(
      std::make_integer_sequence<int, S>{});
}

// The codes of scaled = x·(448/absmax), |scaled| ≤ 448·(1 + 2^-23) (|x| ≤ absmax), as
// int32 lanes: csrc/fp8_states.h's encode, rounding done by one float add.  With
// a = |scaled|, q = its exponent bits, t = max(q − bits(2^-6), 0) and the float
// c = 2^20·max(2^q, 2^-6) (bits t + bits(2^14)), a + c rounds a to a multiple of
// c·2^-23: E4M3's spacing (2^-9 below 2^-6, then 8 steps per binade), ties to
// even, carrying into the next binade; bits(a + c) − bits(c) counts those steps
// (0..16), and t >> 20 adds the 8 codes of each binade below a's.  Matches
// e4m3_magnitude for every float in [0, 464) (checked exhaustively).
// kSigned false: the values are ≥ +0 (a root state: sqrt(v)), so neither |·| nor
// the sign bit is taken.
#if defined(CPU_CAPABILITY_AVX2)
template <bool kSigned>
inline __m256i fp8_encode_lanes(const float* values, __m256 factor) {
  const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(values), factor));
  const __m256 a = _mm256_castsi256_ps(kSigned ? _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)) : bits);
  const __m256i t = _mm256_max_epi32(
      _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000)), _mm256_set1_epi32(0x3c800000)),
      _mm256_setzero_si256());
  const __m256i c = _mm256_add_epi32(t, _mm256_set1_epi32(0x46800000));
  const __m256i steps = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(a, _mm256_castsi256_ps(c))), c);
  const __m256i magnitude = _mm256_add_epi32(steps, _mm256_srli_epi32(t, 20));
  if constexpr (!kSigned) return magnitude;
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  return _mm256_or_si256(magnitude, sign);
}
#elif defined(CPU_CAPABILITY_AVX512)
template <bool kSigned>
inline __m512i fp8_encode_lanes(const float* values, __m512 factor) {
  const __m512i bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(values), factor));
  const __m512 a = _mm512_castsi512_ps(kSigned ? _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)) : bits);
  const __m512i t = _mm512_max_epi32(
      _mm512_sub_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x3c800000)),
      _mm512_setzero_si512());
  const __m512i c = _mm512_add_epi32(t, _mm512_set1_epi32(0x46800000));
  const __m512i steps = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(a, _mm512_castsi512_ps(c))), c);
  const __m512i magnitude = _mm512_add_epi32(steps, _mm512_srli_epi32(t, 20));
  if constexpr (!kSigned) return magnitude;
  // magnitude | (bits >> 24 & 0x80)
  return _mm512_ternarylogic_epi32(magnitude, _mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80), 0xf8);
}
#endif

// Codes encoded per fp8_encode_step: one pack of four vectors.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kFp8EncodeStep = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kFp8EncodeStep = 32;
#else
constexpr int64_t kFp8EncodeStep = 16;
#endif

// codes[0, kFp8EncodeStep) of values·factor (factor = fp8_encode_factor > 0).
template <bool kSigned>
inline void fp8_encode_step(const float* values, float factor, uint8_t* codes) {
#if defined(CPU_CAPABILITY_AVX2)
  // 4 × 8 codes packed to 32 bytes, then put back in order
  const __m256 vfactor = _mm256_set1_ps(factor);
  const __m256i words01 = _mm256_packus_epi32(fp8_encode_lanes<kSigned>(values, vfactor),
                                              fp8_encode_lanes<kSigned>(values + 8, vfactor));
  const __m256i words23 = _mm256_packus_epi32(fp8_encode_lanes<kSigned>(values + 16, vfactor),
                                              fp8_encode_lanes<kSigned>(values + 24, vfactor));
  const __m256i bytes = _mm256_packus_epi16(words01, words23);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#elif defined(CPU_CAPABILITY_AVX512)
  // 4 × 16 codes packed to 64 bytes (each 128-bit lane holds 4 codes of each
  // vector), then put back in order
  const __m512 vfactor = _mm512_set1_ps(factor);
  const __m512i words01 = _mm512_packus_epi32(fp8_encode_lanes<kSigned>(values, vfactor),
                                              fp8_encode_lanes<kSigned>(values + 16, vfactor));
  const __m512i words23 = _mm512_packus_epi32(fp8_encode_lanes<kSigned>(values + 32, vfactor),
                                              fp8_encode_lanes<kSigned>(values + 48, vfactor));
  const __m512i bytes = _mm512_packus_epi16(words01, words23);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_si512(codes, _mm512_permutexvar_epi32(order, bytes));
#else
  for (int64_t i = 0; i < kFp8EncodeStep; ++i) codes[i] = fp8_encode(values[i], factor);
#endif
}

// codes[from, to) of values·factor.
template <bool kSigned>
inline void fp8_encode_span(const float* values, float factor, uint8_t* codes, int64_t from, int64_t to) {
  int64_t i = from;
  for (; i + kFp8EncodeStep <= to; i += kFp8EncodeStep) fp8_encode_step<kSigned>(values + i, factor, codes + i);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vfactor = _mm512_set1_ps(factor);
  for (; i + 16 <= to; i += 16)  // vpmovdb narrows the int32 codes (< 256) to bytes in order
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(fp8_encode_lanes<kSigned>(values + i, vfactor)));
#endif
  for (; i < to; ++i) codes[i] = fp8_encode(values[i], factor);
}

// One block's new state, stepped but not yet encoded: its values (float32, in
// the kernel's buffer), where its codes go, and the factor they are encoded
// with (0: the block is stored as zero codes, written already).  The kernel
// encodes it a step at a time while it steps the next block, so that the
// encoder's integer work fills the gaps the update's divisions and square roots
// leave; codes are the same whatever the split.
struct Fp8PendingState {
  const float* values = nullptr;
  uint8_t* codes = nullptr;
  float factor = 0.0f;
};

template <int S, unsigned root_mask>
struct Fp8PendingBlock {
  std::array<Fp8PendingState, S> state;
  int64_t len = 0;   // elements in the block (0: none pending)
  int64_t done = 0;  // codes [0, done) written

  // Encodes steps while a whole one fits below `upto`.  (A plain loop over the
  // states with fp8_encode_step, not for_each_state over fp8_encode_span as in
  // finish(): that form measured 10-40% slower on the whole step.)
  void encode_upto(int64_t upto) {
    upto = std::min(upto, len);
    for (; done + kFp8EncodeStep <= upto; done += kFp8EncodeStep)
      for (int k = 0; k < S; ++k) {
        const Fp8PendingState& pending = state[k];
        if (!(pending.factor > 0.0f)) continue;
        if ((root_mask >> k) & 1u) {
          fp8_encode_step<false>(pending.values + done, pending.factor, pending.codes + done);
        } else {
          fp8_encode_step<true>(pending.values + done, pending.factor, pending.codes + done);
        }
      }
  }

  void finish() {
    for_each_state<S>([&](auto k) {
      const Fp8PendingState& pending = state[k];
      if (pending.factor > 0.0f)
        fp8_encode_span<!((root_mask >> k) & 1u)>(pending.values, pending.factor, pending.codes, done, len);
    });
    len = done = 0;
  }
};

// Stores a block's absmax, whose largest |value| is block_max (NaN when a value
// is NaN), and returns the factor its len codes are to be encoded with; 0 when
// the block is all zeros or not finite, whose codes are written here, as 0
// (csrc/fp8_states.h).
inline float fp8_seal_block(float block_max, float* absmax, uint8_t* codes, int64_t len) {
  const float stored = fp8_stored_absmax(block_max);
  *absmax = stored;
  if (stored > 0.0f) return fp8_encode_factor(stored);
  std::fill(codes, codes + len, uint8_t(0));
  return 0.0f;
}

// Steps every block of a bucket: tensor t's elements are param[t], grad[t] and
// the S states, each codes[k][t] (uint8, the param's layout) with
// absmax[k][t] (float32, one per block); state k is stored as sqrt when bit k
// of root_mask is set.  update_of(t, begin, len) gives the update of tensor t's
// block of len elements from element begin: a callable (x, i) that steps
// std::array<V, 2 + S> values x (param, grad, states) of the block's elements
// from i on (one lane each) and leaves each state in its stored form (sqrt(v)
// for a root state).  A task of the parallel walk starts only at a block of
// tensor t whose index is a multiple of blocks_per_cut(t) (1: any block), and
// walks its blocks in order.  With master weights (Low: bucket_loop.h), the
// params are float32 masters, the grads Low, and the Low params are written too.
template <typename scalar_t, int S, unsigned root_mask, typename Low, typename UpdateOf,
          typename BlocksPerCut = int64_t (*)(int64_t)>
void fp8_blocks(const Fp8Launch& L, const UpdateOf& update_of,
                const BlocksPerCut& blocks_per_cut = [](int64_t) { return int64_t(1); }) {
  constexpr bool kMaster = !std::is_same_v<Low, NoLow>;
  using IO = TileIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Op = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<Op, float>, "FP8 states are stepped in float32");
  const int64_t n = L.bucket.num_tensors;
  const int64_t* offsets = L.bucket.offsets;
  std::vector<int64_t> first_block(n + 1, 0);  // tensor t owns blocks [first_block[t], first_block[t+1])
  for (int64_t t = 0; t < n; ++t)
    first_block[t + 1] = first_block[t] + (offsets[t + 1] - offsets[t] + kFp8Block - 1) / kFp8Block;
  std::vector<Telemetry> partial(L.telemetry != nullptr ? first_block[n] : 0);
  auto walk = [&](int64_t lo, int64_t hi) {
    alignas(64) float buffers[2][S][kFp8Block];  // this block's new states, and the pending block's
    Fp8PendingBlock<S, root_mask> pending;
    int64_t t = std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin() - 1;
    int64_t rounding_for = -1;
    std::optional<TensorRounding> rounding;
    for (int64_t block = lo; block < hi; ++block) {
      while (block >= first_block[t + 1]) ++t;
      const int64_t index = block - first_block[t];
      const int64_t begin = index * kFp8Block;
      const int64_t len = std::min(kFp8Block, offsets[t + 1] - offsets[t] - begin);
      scalar_t* p = stream<scalar_t>(L.param, t) + begin;
      const scalar_t* g = stream<scalar_t>(L.grad, t) + begin;  // (Low values with master weights)
      Low* low = kMaster ? low_stream<Low>(L.bucket, t) + begin : nullptr;
      const auto update = update_of(t, begin, len);
      float(&state)[S][kFp8Block] = buffers[block & 1];
      const uint8_t* codes[S];
      float factor[S];
      bool nan_codes[S];
      for (int k = 0; k < S; ++k) {
        codes[k] = L.codes[k][t] + begin;
        factor[k] = fp8_decode_factor(L.absmax[k][t][index]);
        nan_codes[k] = fp8_codes_may_hold_nan(codes[k], len);
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (L.round != nullptr && rounding_for != t) {
          rounding.emplace(L.round[t]);
          rounding_for = t;
        }
      }
      Vec weight_sq(0.0f), update_sq(0.0f);
      double tail_weight = 0.0, tail_update = 0.0;
      std::array<Vec, S> top;  // per state: the largest |stored value| (NaN propagates)
      std::array<float, S> tail_top;
      for_each_state<S>([&](auto k) {
        top[k] = Vec(0.0f);
        tail_top[k] = 0.0f;
      });
      int64_t i = 0;
      for (; i + IO::kTile <= len; i += IO::kTile) {
        Vec pv[IO::kParts], gv[IO::kParts];
        IO::load(p + i, pv);
        if constexpr (kMaster) {
          gv[0] = LowLanes<Low>::load(reinterpret_cast<const Low*>(stream<scalar_t>(L.grad, t)) + begin + i);
        } else {
          IO::load(g + i, gv);
        }
        Vec before[IO::kParts];
        for (int part = 0; part < IO::kParts; ++part) {
          std::array<Vec, 2 + S> x;
          x[0] = before[part] = pv[part];
          x[1] = gv[part];
          const int64_t offset = i + part * Vec::size();
          for_each_state<S>([&](auto k) {
            x[2 + k] = fp8_decode_tile(codes[k] + offset, factor[k], (root_mask >> k) & 1u, nan_codes[k]);
          });
          update(x, offset);
          for_each_state<S>([&](auto k) {
            x[2 + k].store(state[k] + offset);
            top[k] = fp8_abs_max<((root_mask >> k) & 1u) != 0>(top[k], x[2 + k]);
          });
          pv[part] = x[0];
        }
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (rounding) {
            rounding->tile(pv, begin + i);
            TensorRounding::store<IO>(p + i, pv);
          } else {
            IO::store(p + i, pv);
          }
        } else {
          IO::store(p + i, pv);
        }
        if constexpr (kMaster) LowLanes<Low>::store(low + i, pv[0]);  // rounded to nearest even
        pending.encode_upto(i + IO::kTile);
        // the lines kFp8PrefetchAhead elements on (past the end of a tensor too:
        // a prefetch never faults)
        __builtin_prefetch(p + i + kFp8PrefetchAhead);
        if constexpr (kMaster) {
          __builtin_prefetch(reinterpret_cast<const Low*>(stream<scalar_t>(L.grad, t)) + begin + i + kFp8PrefetchAhead);
        } else {
          __builtin_prefetch(g + i + kFp8PrefetchAhead);
        }
        if ((i & 63) < IO::kTile)  // a line of codes per 64 elements
          for_each_state<S>([&](auto k) { __builtin_prefetch(codes[k] + i + kFp8PrefetchAhead); });
        if (L.telemetry != nullptr) {
          Vec after[IO::kParts];
          if constexpr (IO::kParts == 1) after[0] = pv[0]; else IO::load(p + i, after);  // as stored
          for (int part = 0; part < IO::kParts; ++part) {
            const Vec delta = after[part] - before[part];
            weight_sq = at::vec::fmadd(after[part], after[part], weight_sq);
            update_sq = at::vec::fmadd(delta, delta, update_sq);
          }
        }
      }
      for (; i < len; ++i) {
        std::array<float, 2 + S> x;
        x[0] = static_cast<float>(p[i]);
        if constexpr (kMaster) {
          x[1] = static_cast<float>(reinterpret_cast<const Low*>(stream<scalar_t>(L.grad, t))[begin + i]);
        } else {
          x[1] = static_cast<float>(g[i]);
        }
        for (int k = 0; k < S; ++k) {
          const float value = fp8_decode(codes[k][i], factor[k]);
          x[2 + k] = (root_mask >> k) & 1u ? value * value : value;
        }
        const float before = x[0];
        update(x, i);
        for (int k = 0; k < S; ++k) {
          state[k][i] = x[2 + k];
          tail_top[k] = af_max(tail_top[k], std::fabs(x[2 + k]));
        }
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (rounding) x[0] = rounding->scalar(x[0], begin + i);
        }
        p[i] = static_cast<scalar_t>(x[0]);
        if constexpr (kMaster) low[i] = static_cast<Low>(x[0]);
        if (L.telemetry != nullptr) {
          const float after = static_cast<float>(p[i]);
          tail_weight += static_cast<double>(after * after);
          tail_update += static_cast<double>((after - before) * (after - before));
        }
      }
      pending.finish();  // the previous block's last codes
      for (int k = 0; k < S; ++k) {
        const float block_max = af_max(tail_top[k], fp8_lane_max(top[k]));
        uint8_t* block_codes = L.codes[k][t] + begin;
        pending.state[k] = {state[k], block_codes, fp8_seal_block(block_max, &L.absmax[k][t][index], block_codes, len)};
      }
      pending.len = len;
      if (L.telemetry != nullptr) {
        PieceSums<scalar_t> sums;
        sums.weight_sq = weight_sq;
        sums.update_sq = update_sq;
        sums.tail_weight = tail_weight;
        sums.tail_update = tail_update;
        sums.flush(&partial[block]);
      }
    }
    pending.finish();
  };
  std::vector<int64_t> cuts;  // the blocks a task may start at, then the end
  for (int64_t t = 0; t < n && cuts.empty(); ++t)
    if (blocks_per_cut(t) != 1) cuts.push_back(0);
  if (cuts.empty()) {
    parallel_for_as_caller(0, first_block[n], kFp8GrainBlocks, walk);
  } else {
    cuts.clear();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t b = first_block[t]; b < first_block[t + 1]; b += blocks_per_cut(t)) cuts.push_back(b);
    cuts.push_back(first_block[n]);
    // the threads' shares split by blocks, as above, each end moved on to the next cut:
    // the tasks still cover every block once, and weigh about the same
    auto cut_at = [&](int64_t block) { return *std::lower_bound(cuts.begin(), cuts.end(), block); };
    parallel_for_as_caller(0, first_block[n], kFp8GrainBlocks, [&](int64_t lo, int64_t hi) {
      const int64_t from = cut_at(lo), to = cut_at(hi);
      if (from < to) walk(from, to);
    });
  }
  if (L.telemetry == nullptr) return;
  for (int64_t t = 0; t < n; ++t) {
    Telemetry sums;
    for (int64_t block = first_block[t]; block < first_block[t + 1]; ++block) {
      sums.weight_sq += partial[block].weight_sq;
      sums.update_sq += partial[block].update_sq;
    }
    L.telemetry[2 * t] = sums.weight_sq;
    L.telemetry[2 * t + 1] = sums.update_sq;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
