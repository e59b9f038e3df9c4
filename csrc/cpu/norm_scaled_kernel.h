// Two-phase CPU kernels of the rules that scale each tensor's Adam direction by a
// norm (scale-aware Adam and LAMB).  Math: csrc/step_math.h.
//
// float32/float64: phase 1 writes m, v; phase 2 recomputes u from them (36 B/param
// in fp32).  bfloat16/float16: rounding m, v to storage between the phases would
// make phase 2's u differ from the u that was normed (in fp16, v underflows to 0
// and u explodes), so phase 1 only reads, and phase 2 recomputes the moments from
// the old m, v and g in float32 — both phases see the same unrounded u.
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "bucket_loop.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

// Whether m, v are written in phase 2 (storage dtype narrower than the math).
template <typename scalar_t>
constexpr bool kMomentsInPhase2 = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

// Phase 1: m, v ← moments; Σu² (and Σθ²) per tensor.  Each tensor is cut into
// blocks of kBlock elements from its own start; a block is summed whole (float
// lanes, then its scalar tail, in double) by whichever thread takes it, and a
// tensor's blocks are added in order, so the sums are bitwise the same for any
// thread count and any place of the tensor in the bucket.
template <typename scalar_t, bool LAMB, typename Low>
void norm_scaled_phase1_typed(const NormScaledLaunch& L, double* u_sq, double* theta_sq) {
  using IO = TileIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Op = at::opmath_type<scalar_t>;
  constexpr unsigned kMomentMask = kMomentsInPhase2<scalar_t> ? 0u : 0b11u;  // m, v bits
  constexpr int64_t kBlock = 64 * IO::kTile;
  const int64_t n = L.bucket.num_tensors;
  const int64_t* offsets = L.bucket.offsets;
  std::vector<int64_t> first_block(n + 1, 0);  // tensor t owns blocks [first_block[t], first_block[t+1])
  for (int64_t t = 0; t < n; ++t)
    first_block[t + 1] = first_block[t] + (offsets[t + 1] - offsets[t] + kBlock - 1) / kBlock;
  std::vector<double> partial(2 * first_block[n], 0.0);  // [block][u, θ]
  parallel_for_as_caller(0, first_block[n], std::max<int64_t>(1, kGrainSize / kBlock), [&](int64_t lo, int64_t hi) {
    int64_t t = std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin() - 1;
    for (int64_t block = lo; block < hi; ++block) {
      while (block >= first_block[t + 1]) ++t;
      const TileCoef<MomentCoef, scalar_t> coef(L.coef[t]);
      scalar_t* p = stream<scalar_t>(L.param, t);
      scalar_t* g = stream<scalar_t>(L.grad, t);
      scalar_t* m = stream<scalar_t>(L.exp_avg, t);
      scalar_t* v = stream<scalar_t>(L.exp_avg_sq, t);
      const int64_t i = (block - first_block[t]) * kBlock;
      const int64_t stop = std::min(offsets[t + 1] - offsets[t], i + kBlock);
      Vec acc_u(Op(0)), acc_p(Op(0));
      Op tail_u(0), tail_p(0);
      auto phase1 = [&](auto theta, auto grad, auto& m_, auto& v_) {
        using V = decltype(theta);
        const auto& c = coef.template get<V>();
        update_moments(grad, m_, v_, c);
        const V u = adam_direction<LAMB>(theta, m_, v_, c);
        if constexpr (std::is_same_v<V, Vec>) {
          acc_u = acc_u + u * u;
          if (LAMB) acc_p = acc_p + theta * theta;
        } else {
          tail_u += u * u;
          if (LAMB) tail_p += theta * theta;
        }
      };
      Low* const no_low = nullptr;  // (master weights: the grads are Low; nothing else is)
      if constexpr (LAMB) {
        map_streams<scalar_t, 4, (kMomentMask << 2), 1>({p, g, m, v}, i, stop,
                                                        [&](auto& x) { phase1(x[0], x[1], x[2], x[3]); },
                                                        nullptr, nullptr, no_low);
      } else {  // θ is not read: its slot gets g, which the direction ignores
        map_streams<scalar_t, 3, (kMomentMask << 1), 0>({g, m, v}, i, stop,
                                                       [&](auto& x) { phase1(x[0], x[0], x[1], x[2]); },
                                                       nullptr, nullptr, no_low);
      }
      Op lanes_u[Vec::size()], lanes_p[Vec::size()];
      acc_u.store(lanes_u);
      acc_p.store(lanes_p);
      double block_u = tail_u, block_p = tail_p;
      for (int64_t k = 0; k < Vec::size(); ++k) {
        block_u += lanes_u[k];
        block_p += lanes_p[k];
      }
      partial[2 * block] = block_u;
      partial[2 * block + 1] = block_p;
    }
  });
  for (int64_t t = 0; t < n; ++t) {
    u_sq[t] = 0.0;
    theta_sq[t] = 0.0;
    for (int64_t block = first_block[t]; block < first_block[t + 1]; ++block) {
      u_sq[t] += partial[2 * block];
      theta_sq[t] += partial[2 * block + 1];
    }
  }
}

// Phase 2: recompute u (from the stored m, v, or from the moments updated here
// for narrow storage) and write θ ← θ − (k·u + ρ·θ).
template <typename scalar_t, bool LAMB, typename Low>
void norm_scaled_phase2_typed(const NormScaledLaunch& L, const double* k, const double* rho) {
  using Vec = typename TileIO<scalar_t>::Vec;
  using Op = at::opmath_type<scalar_t>;
  for_each_tracked_segment(L.bucket, L.telemetry, [&](int64_t t, int64_t begin, int64_t end, Telemetry* sums) {
    const TileCoef<MomentCoef, scalar_t> coef(L.coef[t]);
    const Op ks = static_cast<Op>(k[t]), rs = static_cast<Op>(rho[t]);
    const Vec kv(ks), rv(rs);
    auto phase2 = [&](auto& theta, auto& m_, auto& v_) {
      using V = std::decay_t<decltype(theta)>;
      const V u = adam_direction<LAMB>(theta, m_, v_, coef.template get<V>());
      if constexpr (std::is_same_v<V, Vec>) {
        scaled_update(theta, u, kv, rv);
      } else {
        scaled_update(theta, u, ks, rs);
      }
    };
    scalar_t* p = stream<scalar_t>(L.param, t);
    scalar_t* m = stream<scalar_t>(L.exp_avg, t);
    scalar_t* v = stream<scalar_t>(L.exp_avg_sq, t);
    if constexpr (kMomentsInPhase2<scalar_t>) {
      map_streams<scalar_t, 4, 0b1101u>({p, stream<scalar_t>(L.grad, t), m, v}, begin, end,
                                        [&](auto& x) {  // x: p, g, m, v
                                          using V = typename std::decay_t<decltype(x)>::value_type;
                                          update_moments(x[1], x[2], x[3], coef.template get<V>());
                                          phase2(x[0], x[2], x[3]);
                                        }, sums, L.round ? &L.round[t] : nullptr);
    } else {
      map_streams<scalar_t, 3, 0b1u, -1>({p, m, v}, begin, end,  // x: p, m, v (master weights: p → low)
                                         [&](auto& x) { phase2(x[0], x[1], x[2]); }, sums,
                                         L.round ? &L.round[t] : nullptr, low_stream<Low>(L.bucket, t));
    }
  });
}

inline void norm_scaled_phase1(const NormScaledLaunch& L, double* u_sq, double* theta_sq) {
  dispatch_streams(L.bucket, "amos_fused_norm_scaled", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    using Low = decltype(low);
    L.lamb ? norm_scaled_phase1_typed<scalar_t, true, Low>(L, u_sq, theta_sq)
           : norm_scaled_phase1_typed<scalar_t, false, Low>(L, u_sq, theta_sq);
  });
}

inline void norm_scaled_phase2(const NormScaledLaunch& L, const double* k, const double* rho) {
  dispatch_streams(L.bucket, "amos_fused_norm_scaled", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    using Low = decltype(low);
    L.lamb ? norm_scaled_phase2_typed<scalar_t, true, Low>(L, k, rho)
           : norm_scaled_phase2_typed<scalar_t, false, Low>(L, k, rho);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
