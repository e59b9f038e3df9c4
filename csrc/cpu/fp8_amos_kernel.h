// Amos with its momentum mu in block-scaled FP8 (csrc/fp8_states.h) on the CPU:
// the block walk of fp8_kernel.h with Amos's update (csrc/step_math.h, the same
// functions as amos_kernel.h).  Each element is stepped with its slot's (w, a):
// Δ = w·θ − a·g, mu ← m·mu + (1−m)·Δ, θ ← θ + mu.
//  - elementwise slots: the slot math per element inside the walk (v, b read and
//    written there);
//  - rows (trailing reduced axes): the walk's tasks start at row starts, and a
//    row's Σg² (as amos_kernel.h sums it), v, b and (w, a) are taken when the walk
//    reaches the block its first element is in, so its grads are still in cache
//    when its blocks are stepped: one pass over memory;
//  - general layouts: every slot first (phase 1: Σg² per slot in memory order),
//    then the walk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "amos_kernel.h"
#include "fp8_kernel.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

// The slot of each element of a general layout from element `first` on, in
// memory order (amos_walk_general's order, started anywhere).
class AmosSlotCursor {
 public:
  AmosSlotCursor(const AmosLayout& layout, int64_t first) : L_(layout) {
    for (int d = L_.ndim - 1; d >= 0; --d) {
      index_[d] = first % L_.sizes[d];
      first /= L_.sizes[d];
      slot_ += index_[d] * L_.slot_strides[d];
    }
  }
  int64_t slot() const { return slot_; }
  void next() {
    for (int d = L_.ndim - 1; d >= 0; --d) {
      slot_ += L_.slot_strides[d];
      if (++index_[d] < L_.sizes[d]) return;
      slot_ -= L_.slot_strides[d] * L_.sizes[d];
      index_[d] = 0;
    }
  }

 private:
  const AmosLayout& L_;
  int64_t index_[kAmosMaxDims] = {0};
  int64_t slot_ = 0;
};

// Phase 1 of tensor t (reduced slots), slots [first, last): v, b of each updated
// with the mean of its clip(g)², and its (w, a) written to w[s], a[s].
template <typename scalar_t, bool CLIP, typename Low>
void amos_fp8_slots(const Fp8Launch& L, int64_t t, int64_t first, int64_t last,
                    const TileCoef<AmosCoef, scalar_t>& coef, float* w, float* a) {
  using Op = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<Op, float>, "FP8 states are stepped in float32");
  const AmosLayout& layout = L.amos->layout[t];
  const scalar_t* g = stream<scalar_t>(L.grad, t);  // (Low values with master weights)
  scalar_t* v = stream<scalar_t>(L.amos->v, t);
  scalar_t* b = stream<scalar_t>(L.amos->b, t);
  const int64_t numel = L.bucket.offsets[t + 1] - L.bucket.offsets[t];
  if (layout.kind == kSlotsRows) {
    const int64_t row = layout.row_len;
    for (int64_t r = first; r < last; ++r) {
      double sum;
      if constexpr (std::is_same_v<Low, NoLow>) {
        sum = amos_sum_squares<scalar_t, CLIP>(g + r * row, row, coef);
      } else {
        sum = amos_sum_squares<Low, CLIP, true>(reinterpret_cast<const Low*>(g) + r * row, row, coef);
      }
      amos_store_slot<scalar_t, true>(v + r, b + r, sum, row, coef.scalar, w[r], a[r]);
    }
    return;
  }
  // a general layout: all its slots at once (first = 0, last = num_slots), in memory order
  std::vector<double> sums(layout.num_slots, 0.0);
  amos_walk_general(layout, [&](int64_t e, int64_t s) {
    const Op x = amos_clip<CLIP>(amos_grad_at<scalar_t, Low>(g, e), coef.scalar);
    sums[s] += amos_square_term(x);
  });
  for (int64_t s = first; s < last; ++s)
    amos_store_slot<scalar_t, true>(v + s, b + s, sums[s], numel / layout.num_slots, coef.scalar, w[s], a[s]);
}

// Phase 1 of a bucket: the slots of its general-layout tensors, one tensor per
// task; each slot's sum is taken in memory order: the same at any thread count.
template <typename scalar_t, bool CLIP, typename Low>
void amos_fp8_all_slots(const Fp8Launch& L, const TileCoefs<AmosCoef, scalar_t>& coef,
                        const std::vector<int64_t>& first_slot, float* w, float* a) {
  struct Piece {
    int64_t t, first, last;
  };
  std::vector<Piece> pieces;
  for (int64_t t = 0; t < L.bucket.num_tensors; ++t) {
    const AmosLayout& layout = L.amos->layout[t];
    if (layout.kind == kSlotsGeneral && layout.num_slots > 0) pieces.push_back({t, 0, layout.num_slots});
  }
  parallel_for_as_caller(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Piece& piece = pieces[i];
      amos_fp8_slots<scalar_t, CLIP, Low>(L, piece.t, piece.first, piece.last, coef[piece.t],
                                          w + first_slot[piece.t], a + first_slot[piece.t]);
    }
  });
}

// The update of one block of an Amos tensor: x = (θ, g, mu) from element `begin`
// of the tensor.  Elementwise slots: v, b of the block's elements are read and
// written here; reduced slots: each element's (w, a), one pair for a block inside
// one slot (`uniform`: most blocks of rows of 256 elements or more), else gathered
// for the block.
template <typename scalar_t, bool CLIP>
struct AmosFp8BlockUpdate {
  using Vec = Vectorized<float>;
  const TileCoef<AmosCoef, scalar_t>* coef;
  scalar_t* v = nullptr;  // elementwise slots: the block's v and b; else null
  scalar_t* b = nullptr;
  bool uniform = false;   // every element's (w, a) is (w0, a0)
  float w0 = 0.0f, a0 = 0.0f;
  alignas(64) float w[kFp8Block];
  alignas(64) float a[kFp8Block];

  static Vec load(const scalar_t* src) {
    if constexpr (std::is_same_v<scalar_t, float>) return Vec::loadu(src); else return LowLanes<scalar_t>::load(src);
  }
  static void store(scalar_t* dst, const Vec& x) {
    if constexpr (std::is_same_v<scalar_t, float>) x.store(dst); else LowLanes<scalar_t>::store(dst, x);
  }

  template <typename X>
  void operator()(X& x, int64_t i) const {
    using V = typename X::value_type;
    const auto& c = coef->template get<V>();
    const V gg = amos_clip<CLIP>(x[1], c);
    if constexpr (std::is_same_v<V, Vec>) {
      if (v != nullptr) {
        V vv = load(v + i), bb = load(b + i), ww, aa;
        amos_slot(vv, bb, gg * gg, ww, aa, c);
        store(v + i, vv);
        store(b + i, bb);
        amos_element<true>(x[0], gg, x[2], ww, aa, c);
      } else if (uniform) {
        amos_element<true>(x[0], gg, x[2], Vec(w0), Vec(a0), c);
      } else {
        amos_element<true>(x[0], gg, x[2], Vec::loadu(w + i), Vec::loadu(a + i), c);
      }
    } else if (v != nullptr) {
      float vv = static_cast<float>(v[i]), bb = static_cast<float>(b[i]), ww, aa;
      amos_slot(vv, bb, gg * gg, ww, aa, c);
      v[i] = static_cast<scalar_t>(vv);
      b[i] = static_cast<scalar_t>(bb);
      amos_element<true>(x[0], gg, x[2], ww, aa, c);
    } else if (uniform) {
      amos_element<true>(x[0], gg, x[2], w0, a0, c);
    } else {
      amos_element<true>(x[0], gg, x[2], w[i], a[i], c);
    }
  }
};

template <typename scalar_t, bool CLIP, typename Low>
void amos_fp8_typed(const Fp8Launch& L) {
  const int64_t n = L.bucket.num_tensors;
  const auto* coefs = static_cast<const AmosCoef<double>*>(L.coef);
  TileCoefs<AmosCoef, scalar_t> coef(coefs, coefs + n);
  std::vector<int64_t> first_slot(n + 1, 0);  // tensor t's (w, a) are [first_slot[t], first_slot[t+1])
  for (int64_t t = 0; t < n; ++t) {
    const bool reduced = L.amos->layout[t].kind != kSlotsElementwise;
    first_slot[t + 1] = first_slot[t] + (reduced ? L.amos->layout[t].num_slots : 0);
  }
  std::vector<float> w(first_slot[n]), a(first_slot[n]);
  amos_fp8_all_slots<scalar_t, CLIP, Low>(L, coef, first_slot, w.data(), a.data());  // phase 1
  // a task starts at a block where a row starts too: lcm(row, 256) / 256 blocks apart
  auto blocks_per_cut = [&](int64_t t) {
    const AmosLayout& layout = L.amos->layout[t];
    return layout.kind == kSlotsRows ? layout.row_len / std::gcd(layout.row_len, kFp8Block) : int64_t(1);
  };
  fp8_blocks<scalar_t, 1, 0b0u, Low>(L, [&](int64_t t, int64_t begin, int64_t len) {
    AmosFp8BlockUpdate<scalar_t, CLIP> update;
    update.coef = &coef[t];
    const AmosLayout& layout = L.amos->layout[t];
    if (layout.kind == kSlotsElementwise) {
      update.v = stream<scalar_t>(L.amos->v, t) + begin;
      update.b = stream<scalar_t>(L.amos->b, t) + begin;
      return update;
    }
    float* slot_w = w.data() + first_slot[t];
    float* slot_a = a.data() + first_slot[t];
    if (layout.kind == kSlotsRows) {  // runs of one row each
      const int64_t row = layout.row_len;
      // the slots of the rows that start in this block (those that started before
      // were taken by this task: it started at a row start)
      const int64_t first_row = (begin + row - 1) / row, end_row = (begin + len + row - 1) / row;
      if (end_row > first_row) amos_fp8_slots<scalar_t, CLIP, Low>(L, t, first_row, end_row, coef[t], slot_w, slot_a);
      int64_t r = begin / row, left = row - (begin - r * row);
      if (len <= left) {
        update.uniform = true;
        update.w0 = slot_w[r];
        update.a0 = slot_a[r];
        return update;
      }
      for (int64_t k = 0; k < len; ++r, left = row) {
        const int64_t run = std::min(left, len - k);
        std::fill_n(update.w + k, run, slot_w[r]);
        std::fill_n(update.a + k, run, slot_a[r]);
        k += run;
      }
    } else {
      AmosSlotCursor cursor(layout, begin);
      for (int64_t k = 0; k < len; ++k, cursor.next()) {
        update.w[k] = slot_w[cursor.slot()];
        update.a[k] = slot_a[cursor.slot()];
      }
    }
    return update;
  }, blocks_per_cut);
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
