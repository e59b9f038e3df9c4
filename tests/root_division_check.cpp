// Checks csrc/cpu/root_division.h's divide_root against the divide instruction:
// for every divisor below and every float x in [2^-75, 2^64) (every square root a
// float32 has, but 0), plus ±0, +Inf and NaNs, the bits of both quotients.
// Built and run by tests/test_root_division.py with CPU_CAPABILITY_AVX512 or
// CPU_CAPABILITY_AVX2 defined; prints "checked N mismatches M".
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/root_division.h"

static float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

static std::vector<float> divisors() {
  // the ends of the range, all-ones and near-all-ones significands (1/d then
  // rounds hardest), and sqrt(1 − β2^t) as the optimizers take it
  std::vector<float> out = {1.0f, 0.5f, 0x1p-40f, 0x1.fffffep-1f, 0x1.fffffep-40f, 0x1.fffffep-14f,
                            0x1.ffffeep-1f, 0x1.000002p-1f, 0x1.8p-3f, 0.1f};
  for (double beta2 : {0.999, 0.95, 0.9999999})
    for (int t : {1, 3, 10})
      out.push_back(static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t))));
  return out;
}

int main() {
  uint64_t checked = 0, mismatches = 0;
  const uint32_t first = (127u - 75u) << 23, end = (127u + 64u) << 23;  // bits of 2^-75 and 2^64
  const float specials_list[] = {0.0f, -0.0f, INFINITY, float_of(0x7fc00000u), float_of(0xffc00000u),
                                 float_of(0x7fc12345u), 0x1p-75f, 0x1.fffffep63f};
  for (float d : divisors()) {
    if (!amos_fused::divides_roots_by_reciprocal(d)) return 2;
    const float y = 1.0f / d;
#if defined(CPU_CAPABILITY_AVX512)
    using Vec = __m512;
    constexpr uint32_t kLanes = 16;
    const Vec vd = _mm512_set1_ps(d), vy = _mm512_set1_ps(y);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    auto floats_from = [&](uint32_t u) { return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_set1_epi32(u), lane)); };
    auto differing = [&](Vec x) -> uint32_t {  // lanes whose bits differ
      return _mm512_cmpneq_epi32_mask(_mm512_castps_si512(amos_fused::divide_root(x, vd, vy)),
                                      _mm512_castps_si512(_mm512_div_ps(x, vd)));
    };
    auto store = [](float* p, Vec v) { _mm512_storeu_ps(p, v); };
#else
    using Vec = __m256;
    constexpr uint32_t kLanes = 8;
    const Vec vd = _mm256_set1_ps(d), vy = _mm256_set1_ps(y);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    auto floats_from = [&](uint32_t u) { return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_set1_epi32(u), lane)); };
    auto differing = [&](Vec x) -> uint32_t {
      const __m256i same = _mm256_cmpeq_epi32(_mm256_castps_si256(amos_fused::divide_root(x, vd, vy)),
                                              _mm256_castps_si256(_mm256_div_ps(x, vd)));
      return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(same))) & 0xffu;
    };
    auto store = [](float* p, Vec v) { _mm256_storeu_ps(p, v); };
#endif
    auto compare = [&](Vec x, uint32_t count) {
      const uint32_t lanes = differing(x) & ((1u << count) - 1u);
      checked += count;
      if (lanes == 0) return;
      float xs[kLanes];
      store(xs, x);
      for (uint32_t k = 0; k < count; ++k)
        if ((lanes >> k) & 1u && ++mismatches <= 5) std::printf("d=%a x=%a differs from the divide\n", d, xs[k]);
    };
    for (uint32_t u = first; u < end; u += kLanes) compare(floats_from(u), kLanes);
    float specials[kLanes];
    for (uint32_t k = 0; k < kLanes; ++k) specials[k] = specials_list[k % 8];
#if defined(CPU_CAPABILITY_AVX512)
    compare(_mm512_loadu_ps(specials), 8);
#else
    compare(_mm256_loadu_ps(specials), 8);
#endif
  }
  std::printf("checked %llu mismatches %llu\n", static_cast<unsigned long long>(checked),
              static_cast<unsigned long long>(mismatches));
  return mismatches == 0 ? 0 : 1;
}
