// Block-scaled FP8 optimizer states (the 8-bit optimizers' exp_avg / exp_avg_sq, Amos8bit's mu):
// the ONE C++ copy of the format, used by the CPU kernels (and any device
// kernel).  Python's copy: amos_fused/fp8_states.py.
//
// A state tensor of n elements is cut into blocks of kBlock consecutive elements
// in memory order (the last block partial).  Each block keeps one float32 absmax
// and one uint8 code per element, an E4M3 float (torch.float8_e4m3fn's bits:
// sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities) of the
// value scaled so that the block's absmax maps to kFp8Max = 448:
//   encode  code = e4m3_rne(min(|x|·(448/absmax), 448)) with x's sign
//   decode  x    = e4m3_value(code) · (absmax/448)
// Signed states (exp_avg) store x; the second moment (exp_avg_sq) stores
// sqrt(v), so v = x², and its absmax is max sqrt(v): the square root halves the
// dynamic range a block must span (E4M3 spans 2^17 below absmax; sqrt(v) does,
// so v spans 2^34).  A block whose absmax is below kFp8Tiny = 2^-96 is stored as
// zeros (absmax 0, codes 0; 448/absmax stays finite above it).  A block
// holding NaN or ±Inf stores absmax = NaN and codes 0, so it decodes as NaN: a
// non-finite value is never replaced by a finite one, and never reaches beyond
// its block.  A block whose absmax no encode stores (negative, +Inf) decodes as
// NaN too, and so does a code E4M3 reserves for NaN (0x7f, 0xff: never encoded,
// an edited state's), as float8_e4m3fn reads it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AF_FP8_HD __host__ __device__ __forceinline__
#else
#define AF_FP8_HD inline
#endif

namespace amos_fused {

constexpr int64_t kFp8Block = 256;
constexpr float kFp8Max = 448.0f;
constexpr float kFp8Tiny = 0x1p-96f;

AF_FP8_HD uint32_t fp8_bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

AF_FP8_HD float fp8_float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The NaN a non-finite (or corrupted) block's absmax and factor are: the quiet NaN's bits.
AF_FP8_HD float fp8_nan() { return fp8_float_of(0x7fc00000u); }

// The E4M3 code of a non-negative finite a ≤ 448, rounded to nearest even.
// Normal E4M3 values (a ≥ 2^-6) are float32 values with the exponent rebased by
// 120 and the mantissa rounded to 3 bits; below, the code is a·2^9 rounded to
// an integer (0..8; 8 is the smallest normal, 2^-6).
AF_FP8_HD uint32_t e4m3_magnitude(float a) {
  const uint32_t u = fp8_bits_of(a);
  if (u >= (121u << 23)) return (u - (120u << 23) + 0x7ffffu + ((u >> 20) & 1u)) >> 20;
  const float scaled = a * 512.0f;  // exact
  const float whole = static_cast<float>(static_cast<int32_t>(scaled));  // floor (scaled ≥ 0)
  const float rest = scaled - whole;                                    // exact
  uint32_t code = static_cast<uint32_t>(whole);
  if (rest > 0.5f || (rest == 0.5f && (code & 1u))) ++code;
  return code;
}

// The value of an E4M3 code's magnitude bits (code & 0x7f).
AF_FP8_HD float e4m3_magnitude_value(uint32_t magnitude) {
  if (magnitude >= 8u) return fp8_float_of((magnitude << 20) + (120u << 23));
  return static_cast<float>(magnitude) * (1.0f / 512.0f);
}

// The block's absmax as stored: NaN when the block holds a non-finite value,
// 0 below kFp8Tiny.
AF_FP8_HD float fp8_stored_absmax(float absmax) {
  if (!(absmax - absmax == 0.0f)) return fp8_nan();
  return absmax < kFp8Tiny ? 0.0f : absmax;
}

// 448/absmax, the factor an encode multiplies by (0 for a zero or non-finite
// block: every code is then 0).
AF_FP8_HD float fp8_encode_factor(float stored_absmax) {
  return stored_absmax > 0.0f ? kFp8Max / stored_absmax : 0.0f;
}

// absmax/448, the factor a decode multiplies by; NaN for an absmax that no encode
// stores (negative or +Inf: a corrupted state), whose block then decodes as NaN,
// as a non-finite block does, rather than as values of the wrong sign or size.
AF_FP8_HD float fp8_decode_factor(float stored_absmax) {
  const bool stored = stored_absmax >= 0.0f && stored_absmax <= 3.40282347e38f;  // (FLT_MAX)
  return stored ? stored_absmax / kFp8Max : fp8_nan();
}

// x's code, x·factor being within ±448 up to rounding (factor = fp8_encode_factor).
AF_FP8_HD uint8_t fp8_encode(float x, float factor) {
  const float scaled = x * factor;
  float a = fp8_float_of(fp8_bits_of(scaled) & 0x7fffffffu);  // |scaled|, also for −0
  if (a > kFp8Max) a = kFp8Max;
  const uint32_t sign = (fp8_bits_of(scaled) >> 24) & 0x80u;
  return static_cast<uint8_t>(sign | e4m3_magnitude(a));
}

AF_FP8_HD float fp8_decode(uint8_t code, float factor) {
  if ((code & 0x7fu) == 0x7fu) return fp8_nan();  // E4M3's NaN (never encoded)
  const float value = e4m3_magnitude_value(code & 0x7fu);
  return ((code & 0x80u) ? -value : value) * factor;
}

}  // namespace amos_fused
