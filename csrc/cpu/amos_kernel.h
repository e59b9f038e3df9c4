// The Amos CPU kernel (math: csrc/step_math.h).  Three ways to walk a tensor:
//  - elementwise slots: one vectorized pass, slot math per element;
//  - trailing reduced axes (torch's Linear/Conv/Embedding layouts): each slot is
//    a contiguous row; a row's g² is summed and the row updated straight away,
//    while it is still in cache: one pass over memory;
//  - any other reduced axes: two passes over the tensor (sums, then update).
#pragma once

#include <ATen/Dispatch.h>

#include <vector>

#include "bucket_loop.h"

namespace amos_fused::cpu {
inline namespace CPU_CAPABILITY {

// One element's g², added in double: squared in float as the reference squares,
// or in double where a finite g's float square overflows (as the reference takes it).
template <typename Op>
inline double amos_square_term(Op x) {
  const Op square = x * x;
  return std::isinf(square) && std::isfinite(x) ? static_cast<double>(x) * static_cast<double>(x)
                                                : static_cast<double>(square);
}

// Σ clip(g)² over n contiguous elements: float lanes within blocks of kBlock
// elements, blocks in double.  A block whose float lanes overflow (finite grads
// past ~2.3e18) is summed again in double, element by element, as the reference
// sums; one with a non-finite grad stays NaN / Inf.  grad_t: the grads' type, the
// params' or, with master weights (AS_FLOAT32), the low params': then the tiles
// and blocks are those of float32 grads, so the sum is bitwise a float32 param's.
template <typename grad_t, bool CLIP, bool AS_FLOAT32 = false, typename Coef>
double amos_sum_squares(const grad_t* g, int64_t n, const Coef& coef) {
  using scalar_t = grad_t;
  using IO = std::conditional_t<AS_FLOAT32, TileIO<float>, TileIO<scalar_t>>;
  using Vec = typename IO::Vec;
  using Op = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = 64 * IO::kTile;
  double total = 0.0;
  int64_t i = 0;
  while (i < n) {
    const int64_t first = i, stop = std::min(n, i + kBlock);
    Vec acc(Op(0));
    for (; i + IO::kTile <= stop; i += IO::kTile) {
      Vec tile[IO::kParts];
      if constexpr (AS_FLOAT32 && !std::is_same_v<scalar_t, float>) {  // Vec::size() low values, as floats
        tile[0] = LowLanes<scalar_t>::load(g + i);
      } else {
        IO::load(g + i, tile);
      }
      for (int part = 0; part < IO::kParts; ++part) {
        const Vec x = amos_clip<CLIP>(tile[part], coef.vec);
        acc = acc + x * x;
      }
    }
    Op lanes[Vec::size()];
    acc.store(lanes);
    double block = 0.0;
    for (int64_t k = 0; k < Vec::size(); ++k) block += lanes[k];
    for (; i < stop; ++i) {
      const Op x = amos_clip<CLIP>(static_cast<Op>(g[i]), coef.scalar);
      block += static_cast<double>(x * x);
    }
    if (!std::isfinite(block)) [[unlikely]] {
      block = 0.0;
      for (int64_t k = first; k < stop; ++k) {
        const double x = static_cast<double>(amos_clip<CLIP>(static_cast<Op>(g[k]), coef.scalar));
        block += x * x;
      }
    }
    total += block;
  }
  return total;
}

template <typename scalar_t, bool MOMENTUM>
inline void amos_store_slot(scalar_t* v, scalar_t* b, double sum, int64_t count,
                            const AmosCoef<at::opmath_type<scalar_t>>& c,
                            at::opmath_type<scalar_t>& w, at::opmath_type<scalar_t>& a) {
  using Op = at::opmath_type<scalar_t>;
  Op vv = static_cast<Op>(*v), bb = static_cast<Op>(*b);
  amos_slot(vv, bb, static_cast<Op>(sum / static_cast<double>(count)), w, a, c);  // g2 = mean g²
  *v = static_cast<scalar_t>(vv);
  *b = static_cast<scalar_t>(bb);
}

// Updates elements [begin, end) of a tensor (one row) given its slot's (w, a);
// with master weights (Low), g points to Low grads and `low` gets the params.
template <typename scalar_t, bool MOMENTUM, bool CLIP, typename Low>
void amos_update_row(scalar_t* p, scalar_t* g, scalar_t* mu, int64_t begin, int64_t end,
                     at::opmath_type<scalar_t> w, at::opmath_type<scalar_t> a,
                     const TileCoef<AmosCoef, scalar_t>& coef, PieceSums<scalar_t>* acc,
                     const StochasticRound* round, Low* low) {
  using Vec = typename TileIO<scalar_t>::Vec;
  const Vec wv(w), av(a);
  auto update = [&](auto& x) {
    using V = typename std::decay_t<decltype(x)>::value_type;
    const auto& c = coef.template get<V>();
    const V gg = amos_clip<CLIP>(x[1], c);
    if constexpr (std::is_same_v<V, Vec>) {
      amos_element<MOMENTUM>(x[0], gg, x[MOMENTUM ? 2 : 0], wv, av, c);
    } else {
      amos_element<MOMENTUM>(x[0], gg, x[MOMENTUM ? 2 : 0], w, a, c);
    }
  };
  if constexpr (MOMENTUM) {
    map_streams_summed<scalar_t, 3, 0b101u>({p, g, mu}, begin, end, update, acc, round, low);
  } else {
    map_streams_summed<scalar_t, 2, 0b1u>({p, g}, begin, end, update, acc, round, low);
  }
}

// Element e of a tensor's grads: of the param's type, or of Low (master weights).
template <typename scalar_t, typename Low>
inline at::opmath_type<scalar_t> amos_grad_at(const scalar_t* g, int64_t e) {
  if constexpr (std::is_same_v<Low, NoLow>) {
    return static_cast<at::opmath_type<scalar_t>>(g[e]);
  } else {
    return static_cast<at::opmath_type<scalar_t>>(reinterpret_cast<const Low*>(g)[e]);
  }
}

// Visits every element of a general-layout tensor in memory order with its slot.
template <typename F>
void amos_walk_general(const AmosLayout& L, const F& f) {
  if (L.ndim == 0) {
    f(int64_t(0), int64_t(0));
    return;
  }
  const int last = L.ndim - 1;
  int64_t outer = 1;
  for (int d = 0; d < last; ++d) outer *= L.sizes[d];
  int64_t index[kAmosMaxDims] = {0};
  int64_t slot_base = 0, element = 0;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t j = 0; j < L.sizes[last]; ++j) f(element++, slot_base + j * L.slot_strides[last]);
    for (int d = last - 1; d >= 0; --d) {
      slot_base += L.slot_strides[d];
      if (++index[d] < L.sizes[d]) break;
      slot_base -= L.slot_strides[d] * L.sizes[d];
      index[d] = 0;
    }
  }
}

template <typename scalar_t, bool MOMENTUM, bool CLIP, typename Low>
void amos_general_tensor(const AmosLaunch& L, int64_t t) {
  using Op = at::opmath_type<scalar_t>;
  const AmosLayout& layout = L.layout[t];
  const TileCoef<AmosCoef, scalar_t> coef(L.coef[t]);
  auto* p = stream<scalar_t>(L.param, t);
  auto* g = stream<scalar_t>(L.grad, t);
  auto* v = stream<scalar_t>(L.v, t);
  auto* b = stream<scalar_t>(L.b, t);
  auto* mu = MOMENTUM ? stream<scalar_t>(L.mu, t) : nullptr;
  Low* low = low_stream<Low>(L.bucket, t);
  const int64_t slots = layout.num_slots;
  int64_t numel = 1;
  for (int d = 0; d < layout.ndim; ++d) numel *= layout.sizes[d];
  std::vector<double> sums(slots, 0.0);
  amos_walk_general(layout, [&](int64_t e, int64_t s) {  // phase 1: Σ g² per slot
    const Op x = amos_clip<CLIP>(amos_grad_at<scalar_t, Low>(g, e), coef.scalar);
    sums[s] += amos_square_term(x);
  });
  std::vector<Op> w(slots), a(slots);
  for (int64_t s = 0; s < slots; ++s)
    amos_store_slot<scalar_t, MOMENTUM>(v + s, b + s, sums[s], numel / slots, coef.scalar, w[s], a[s]);
  Telemetry sums_;
  std::optional<TensorRounding> rounding;
  if (L.round != nullptr) rounding.emplace(L.round[t]);
  amos_walk_general(layout, [&](int64_t e, int64_t s) {  // phase 2: elementwise update
    const Op before = static_cast<Op>(p[e]);
    Op pp = before;
    Op mm = MOMENTUM ? static_cast<Op>(mu[e]) : Op(0);
    const Op gg = amos_clip<CLIP>(amos_grad_at<scalar_t, Low>(g, e), coef.scalar);
    amos_element<MOMENTUM>(pp, gg, mm, w[s], a[s], coef.scalar);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (rounding) pp = rounding->scalar(pp, e);
    }
    p[e] = static_cast<scalar_t>(pp);
    if constexpr (!std::is_same_v<Low, NoLow>) low[e] = static_cast<Low>(pp);  // rounded to nearest even
    if (MOMENTUM) mu[e] = static_cast<scalar_t>(mm);
    if (L.telemetry != nullptr) {  // in memory order, in double
      const Op after = static_cast<Op>(p[e]);
      sums_.weight_sq += static_cast<double>(after) * static_cast<double>(after);
      sums_.update_sq += static_cast<double>(after - before) * static_cast<double>(after - before);
    }
  });
  if (L.telemetry != nullptr) {
    L.telemetry[2 * t] = sums_.weight_sq;
    L.telemetry[2 * t + 1] = sums_.update_sq;
  }
}

template <typename scalar_t, bool MOMENTUM, bool CLIP, typename Low>
void amos_typed(const AmosLaunch& L) {
  using Op = at::opmath_type<scalar_t>;
  // (general-layout tensors own no elements of the bucket: their telemetry rows,
  // written as zeros here, are filled by amos_general_tensor)
  for_each_tracked_segment(L.bucket, L.telemetry, [&](int64_t t, int64_t begin, int64_t end, Telemetry* sums) {
    const TileCoef<AmosCoef, scalar_t> coef(L.coef[t]);
    auto* p = stream<scalar_t>(L.param, t);
    auto* g = stream<scalar_t>(L.grad, t);
    auto* v = stream<scalar_t>(L.v, t);
    auto* b = stream<scalar_t>(L.b, t);
    auto* mu = MOMENTUM ? stream<scalar_t>(L.mu, t) : nullptr;
    const int64_t row = L.layout[t].row_len;
    const StochasticRound* round = L.round ? &L.round[t] : nullptr;
    Low* low = low_stream<Low>(L.bucket, t);
    if (row == 1) {  // elementwise slots: slot math per element
      auto update = [&](auto& x) {
        using V = typename std::decay_t<decltype(x)>::value_type;
        const auto& c = coef.template get<V>();
        const V gg = amos_clip<CLIP>(x[1], c);
        V w, a;
        amos_slot(x[2], x[3], gg * gg, w, a, c);
        amos_element<MOMENTUM>(x[0], gg, x[MOMENTUM ? 4 : 0], w, a, c);
      };
      if constexpr (MOMENTUM) {
        map_streams<scalar_t, 5, 0b11101u>({p, g, v, b, mu}, begin, end, update, sums, round, low);
      } else {
        map_streams<scalar_t, 4, 0b1101u>({p, g, v, b}, begin, end, update, sums, round, low);
      }
      return;
    }
    // Rows whose first element lies in [begin, end): reduce, then update, in cache.
    PieceSums<scalar_t> acc;  // telemetry of the rows, flushed once for the piece
    for (int64_t r = (begin + row - 1) / row; r * row < end; ++r) {
      const int64_t start = r * row;
      Op w, a;
      double sum;
      if constexpr (std::is_same_v<Low, NoLow>) {
        sum = amos_sum_squares<scalar_t, CLIP>(g + start, row, coef);
      } else {
        sum = amos_sum_squares<Low, CLIP, true>(reinterpret_cast<const Low*>(g) + start, row, coef);
      }
      amos_store_slot<scalar_t, MOMENTUM>(v + r, b + r, sum, row, coef.scalar, w, a);
      amos_update_row<scalar_t, MOMENTUM, CLIP>(p, g, mu, start, start + row, w, a, coef,
                                                sums != nullptr ? &acc : nullptr, round, low);
    }
    if (sums != nullptr) acc.flush(sums);
  });
  parallel_for_as_caller(0, L.num_general, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) amos_general_tensor<scalar_t, MOMENTUM, CLIP, Low>(L, L.general[i]);
  });
}

inline void amos_kernel(const AmosLaunch& L) {
  dispatch_streams(L.bucket, "amos_fused_amos", [&](auto storage, auto low) {
    using scalar_t = decltype(storage);
    using Low = decltype(low);
    if (L.momentum) {
      L.clip ? amos_typed<scalar_t, true, true, Low>(L) : amos_typed<scalar_t, true, false, Low>(L);
    } else {
      L.clip ? amos_typed<scalar_t, false, true, Low>(L) : amos_typed<scalar_t, false, false, Low>(L);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace amos_fused::cpu
