// CUDA Amos.  amos_plan.h cuts a bucket into blocks by slot layout;
// the kernels here only walk memory and call step_math.h (amos_clip, amos_slot,
// amos_element):
//   main   elementwise chunks and row blocks in one pass (a row's g, θ, mu are
//          loaded once into registers, Σg² is reduced and the slot updated, then
//          the row is updated from registers and stored: ~12 B/param in fp32
//          without momentum), plus the partial sums of g² of the two-phase tensors;
//   slots  two-phase tensors: one warp per slot adds its partial sums (fixed order)
//          and runs the slot math, keeping (w, a) for the elementwise pass;
//   apply  two-phase tensors: Δ = w·θ − a·g per element.
// With telemetry (a compile-time variant of main and apply) the kernels that write
// θ also sum θ² and (Δθ)² per block, and a last small launch adds them per tensor
// (telemetry.cuh).  With stochastic rounding (another variant of main and apply,
// bfloat16 only) they store θ rounded (param_rounding.cuh); telemetry then sums
// the rounded values.
// Deterministic: no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "amos_plan.h"
#include "block_reduce.cuh"
#include "step_launch.h"
#include "telemetry.cuh"

namespace amos_fused::cuda {
namespace {

template <typename scalar_t>
struct AmosArrays {
  scalar_t *p, *g, *v, *b, *mu;
};

template <typename scalar_t, typename Op>
__device__ __forceinline__ AmosArrays<scalar_t> arrays_of(const AmosTable<Op>& table, int64_t t) {
  return {static_cast<scalar_t*>(table.address[kParam][t]), static_cast<scalar_t*>(table.address[kGrad][t]),
          static_cast<scalar_t*>(table.address[kV][t]), static_cast<scalar_t*>(table.address[kB][t]),
          static_cast<scalar_t*>(table.address[kMu][t])};
}

// g ← g·unscale, clamped when clipping (a block-uniform flag).
template <typename Op>
__device__ __forceinline__ Op clipped(Op g, bool clip, const AmosCoef<Op>& c) {
  return clip ? amos_clip<true>(g, c) : amos_clip<false>(g, c);
}

template <typename scalar_t>
__device__ __forceinline__ bool aligned16(const scalar_t* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Elements [begin, end) of p, g (, mu) with the slot values (w, a) of each element
// given by wa_of(e): Δ = w·θ − a·g, optional EMA, θ ← θ + Δ.  TELEMETRY: θ², (Δθ)²
// into `sums`; θ stored through `rounding` (here and in the step_* functions below).
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND, typename WA>
__device__ __forceinline__ void apply_slots(const AmosArrays<scalar_t>& x, int64_t begin, int64_t end,
                                            bool clip, const AmosCoef<at::opmath_type<scalar_t>>& c,
                                            const WA& wa_of, TelemetrySums<scalar_t>& sums,
                                            const ParamRounding<ROUND>& rounding) {
  using Op = at::opmath_type<scalar_t>;
  if constexpr (MOMENTUM) {
    scalar_t* const ptr[3] = {x.p, x.g, x.mu};
    map_elements<scalar_t, 3, 0b101u>(ptr, begin, end, threadIdx.x, kAmosThreads,
                                      [&](Op (&y)[3], int64_t e) {
                                        const std::pair<Op, Op> wa = wa_of(e);
                                        [[maybe_unused]] const Op before = y[0];
                                        amos_element<true>(y[0], clipped(y[1], clip, c), y[2], wa.first, wa.second, c);
                                        y[0] = rounding(y[0], e);
                                        if constexpr (TELEMETRY) sums.add(y[0], before);
                                      });
  } else {
    scalar_t* const ptr[2] = {x.p, x.g};
    map_elements<scalar_t, 2, 0b1u>(ptr, begin, end, threadIdx.x, kAmosThreads,
                                    [&](Op (&y)[2], int64_t e) {
                                      const std::pair<Op, Op> wa = wa_of(e);
                                      Op unused(0);
                                      [[maybe_unused]] const Op before = y[0];
                                      amos_element<false>(y[0], clipped(y[1], clip, c), unused, wa.first, wa.second, c);
                                      y[0] = rounding(y[0], e);
                                      if constexpr (TELEMETRY) sums.add(y[0], before);
                                    });
  }
}

// kElementwise: one slot per element, slot math and update in one pass.
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND>
__device__ __forceinline__ void step_elementwise(const AmosArrays<scalar_t>& x, int64_t begin, int64_t end,
                                                 bool clip, const AmosCoef<at::opmath_type<scalar_t>>& c,
                                                 TelemetrySums<scalar_t>& sums,
                                                 const ParamRounding<ROUND>& rounding) {
  using Op = at::opmath_type<scalar_t>;
  auto update = [&](Op& p, Op g, Op& v, Op& b, Op& mu, int64_t e) {
    const Op gc = clipped(g, clip, c);
    Op w, a;
    amos_slot(v, b, gc * gc, w, a, c);
    [[maybe_unused]] const Op before = p;
    amos_element<MOMENTUM>(p, gc, mu, w, a, c);
    p = rounding(p, e);
    if constexpr (TELEMETRY) sums.add(p, before);
  };
  if constexpr (MOMENTUM) {
    scalar_t* const ptr[5] = {x.p, x.g, x.v, x.b, x.mu};
    map_elements<scalar_t, 5, 0b11101u>(ptr, begin, end, threadIdx.x, kAmosThreads,
                                        [&](Op (&y)[5], int64_t e) { update(y[0], y[1], y[2], y[3], y[4], e); });
  } else {
    scalar_t* const ptr[4] = {x.p, x.g, x.v, x.b};
    map_elements<scalar_t, 4, 0b1101u>(ptr, begin, end, threadIdx.x, kAmosThreads, [&](Op (&y)[4], int64_t e) {
      Op unused(0);
      update(y[0], y[1], y[2], y[3], unused, e);
    });
  }
}

// kWarpRows (kGroup = 32: each warp owns rows in turn) and kBlockRows (kGroup =
// kAmosThreads): each thread loads its part of a row (up to row_packs(W) 16-byte
// packs of g, θ and mu, all loads in flight at once) into registers; Σ clip(g)²
// over the group → slot math → the row is updated from registers and stored.
// Rows whose packs are not 16-byte aligned go element by element (g held).
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND, int kGroup>
__device__ __forceinline__ void step_rows(const AmosArrays<scalar_t>& x, const AmosTensor& info,
                                          uint32_t chunk, bool clip,
                                          const AmosCoef<at::opmath_type<scalar_t>>& c,
                                          TelemetrySums<scalar_t>& sums, const ParamRounding<ROUND>& rounding) {
  using Op = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t>;
  constexpr int W = P::kWidth;
  constexpr int kRowPacks = row_packs(W);
  constexpr int kHeld = kRowPacks * W;
  constexpr int kGroups = kAmosThreads / kGroup;
  const int64_t L = info.row_len;
  const int64_t first_row = static_cast<int64_t>(chunk) * info.rows_per_task;
  int64_t last_row = first_row + info.rows_per_task;
  if (last_row > info.num_slots) last_row = info.num_slots;
  const int rank = threadIdx.x % kGroup;
  assume_global(x.p);
  assume_global(x.g);
  assume_global(x.v);
  assume_global(x.b);
  if constexpr (MOMENTUM) assume_global(x.mu);
  __shared__ Op warp_sums[2][kAmosWarps];  // kBlockRows: alternate per row
  int parity = 0;
  // Row r's slot from this thread's Σ clip(g)²: every thread of the group reads the
  // old v, b before the group's sum is complete, runs the same slot math (g2 = the
  // mean of g² over the row), and the group's first thread writes v, b.
  auto update_slot = [&](int64_t r, Op sum_sq, Op& w, Op& a) {
    Op v = static_cast<Op>(x.v[r]), b = static_cast<Op>(x.b[r]);
    Op total;
    if constexpr (kGroup == kWarpSize) {
      total = warp_sum(sum_sq);
      __syncwarp();
    } else {
      total = block_sum<kAmosThreads>(sum_sq, warp_sums[parity]);
      parity ^= 1;
    }
    amos_slot(v, b, total / static_cast<Op>(L), w, a, c);
    if (rank == 0) {
      x.v[r] = static_cast<scalar_t>(v);
      x.b[r] = static_cast<scalar_t>(b);
    }
  };
  const bool vec = L % W == 0 && aligned16(x.p) && aligned16(x.g) && (!MOMENTUM || aligned16(x.mu));
  if (vec) {
    for (int64_t r = first_row + threadIdx.x / kGroup; r < last_row; r += kGroups) {
      scalar_t* const p_row = x.p + r * L;
      const scalar_t* const g_row = x.g + r * L;
      scalar_t* const mu_row = MOMENTUM ? x.mu + r * L : nullptr;
      P g_pack[kRowPacks], p_pack[kRowPacks];
      [[maybe_unused]] P mu_pack[kRowPacks];
#pragma unroll
      for (int j = 0; j < kRowPacks; ++j) {
        const int64_t e = (static_cast<int64_t>(j) * kGroup + rank) * W;
        if (e >= L) continue;
        g_pack[j] = *reinterpret_cast<const P*>(g_row + e);
        p_pack[j] = *reinterpret_cast<const P*>(p_row + e);
        if constexpr (MOMENTUM) mu_pack[j] = *reinterpret_cast<const P*>(mu_row + e);
      }
      Op sum_sq(0);
#pragma unroll
      for (int j = 0; j < kRowPacks; ++j) {
        if ((static_cast<int64_t>(j) * kGroup + rank) * W >= L) continue;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const Op gc = clipped(static_cast<Op>(g_pack[j].lane[k]), clip, c);
          sum_sq += gc * gc;
        }
      }
      Op w, a;
      update_slot(r, sum_sq, w, a);
#pragma unroll
      for (int j = 0; j < kRowPacks; ++j) {
        const int64_t e = (static_cast<int64_t>(j) * kGroup + rank) * W;
        if (e >= L) continue;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          Op p = static_cast<Op>(p_pack[j].lane[k]);
          [[maybe_unused]] const Op before = p;
          Op mu = Op(0);
          if constexpr (MOMENTUM) mu = static_cast<Op>(mu_pack[j].lane[k]);
          amos_element<MOMENTUM>(p, clipped(static_cast<Op>(g_pack[j].lane[k]), clip, c), mu, w, a, c);
          p = rounding(p, r * L + e + k);
          if constexpr (TELEMETRY) sums.add(p, before);
          p_pack[j].lane[k] = static_cast<scalar_t>(p);
          if constexpr (MOMENTUM) mu_pack[j].lane[k] = static_cast<scalar_t>(mu);
        }
        *reinterpret_cast<P*>(p_row + e) = p_pack[j];
        if constexpr (MOMENTUM) *reinterpret_cast<P*>(mu_row + e) = mu_pack[j];
      }
    }
  } else {
    for (int64_t r = first_row + threadIdx.x / kGroup; r < last_row; r += kGroups) {
      const int64_t start = r * L;
      Op held[kHeld];  // clip(g) of elements i·kGroup + rank
      Op sum_sq(0);
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int64_t e = static_cast<int64_t>(i) * kGroup + rank;
        held[i] = e < L ? clipped(static_cast<Op>(x.g[start + e]), clip, c) : Op(0);
        sum_sq += held[i] * held[i];
      }
      Op w, a;
      update_slot(r, sum_sq, w, a);
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int64_t e = static_cast<int64_t>(i) * kGroup + rank;
        if (e >= L) continue;
        Op p = static_cast<Op>(x.p[start + e]);
        [[maybe_unused]] const Op before = p;
        Op mu = MOMENTUM ? static_cast<Op>(x.mu[start + e]) : Op(0);
        amos_element<MOMENTUM>(p, held[i], mu, w, a, c);
        p = rounding(p, start + e);
        if constexpr (TELEMETRY) sums.add(p, before);
        x.p[start + e] = static_cast<scalar_t>(p);
        if constexpr (MOMENTUM) x.mu[start + e] = static_cast<scalar_t>(mu);
      }
    }
  }
}

// kLongRows, phase 1: Σ clip(g)² over chunk `chunk` (= row·pieces + piece) of a row.
template <typename scalar_t>
__device__ __forceinline__ void long_row_partial(const AmosArrays<scalar_t>& x, const AmosTensor& info,
                                                 uint32_t chunk, int64_t chunk_len, bool clip,
                                                 const AmosCoef<at::opmath_type<scalar_t>>& c,
                                                 at::opmath_type<scalar_t>* partials) {
  using Op = at::opmath_type<scalar_t>;
  const int64_t row = chunk / info.pieces, piece = chunk % info.pieces;
  const int64_t begin = row * info.row_len + piece * chunk_len;
  int64_t end = begin + chunk_len;
  if (end > (row + 1) * info.row_len) end = (row + 1) * info.row_len;
  Op sum_sq(0);
  scalar_t* const ptr[1] = {x.g};
  map_elements<scalar_t, 1, 0u>(ptr, begin, end, threadIdx.x, kAmosThreads, [&](Op (&y)[1], int64_t) {
    const Op gc = clipped(y[0], clip, c);
    sum_sq += gc * gc;
  });
  __shared__ Op buffer[kAmosWarps];
  sum_sq = block_sum<kAmosThreads>(sum_sq, buffer);
  if (threadIdx.x == 0) partials[info.partial_base + chunk] = sum_sq;
}

// kGeneral, phase 1: one thread per (slot s, piece): Σ clip(g)² over elements
// [piece·kPieceLength, …) of the slot (in the order of its reduced dims), into
// partials[piece·num_slots + s].  Neighbouring threads take neighbouring slots.
// The offset of the slot's r-th element steps along the innermost reduced dim and
// is mapped afresh from r where that dim wraps.
template <typename scalar_t>
__device__ __forceinline__ void general_partial(const AmosArrays<scalar_t>& x, const AmosTensor& info,
                                                const AmosGeneralLayout& layout, uint32_t chunk, bool clip,
                                                const AmosCoef<at::opmath_type<scalar_t>>& c,
                                                at::opmath_type<scalar_t>* partials) {
  using Op = at::opmath_type<scalar_t>;
  const int64_t item = static_cast<int64_t>(chunk) * kAmosThreads + threadIdx.x;
  const int64_t slots = info.num_slots;
  if (item >= slots * info.pieces) return;
  const int64_t piece = layout.num_slots.div(item), slot = item - piece * slots;
  assume_global(x.g);
  const scalar_t* const g = x.g + map_digits(layout.slot_base, layout.num_kept, slot);
  const int64_t first = piece * kPieceLength;
  const int64_t last = first + kPieceLength < info.row_len ? first + kPieceLength : info.row_len;
  const AmosDigit& inner = layout.reduced[layout.num_reduced - 1];
  const int64_t inner_size = inner.size.divisor, inner_stride = inner.stride;
  int64_t offset = map_digits(layout.reduced, layout.num_reduced, first);
  int64_t inner_index = first - inner.size.div(first) * inner_size;
  Op sum_sq(0);
  for (int64_t r = first; r < last; ++r) {
    const Op gc = clipped(static_cast<Op>(g[offset]), clip, c);
    sum_sq += gc * gc;
    if (++inner_index < inner_size) {  // next element of the slot
      offset += inner_stride;
    } else {
      inner_index = 0;
      offset = map_digits(layout.reduced, layout.num_reduced, r + 1);
    }
  }
  partials[info.partial_base + piece * slots + slot] = sum_sq;
}

// Blocks per SM the main kernel is compiled for (0: no minimum).  The telemetry
// variants without momentum in float math ask for 3 (≤ 85 registers), the
// occupancy of their plain kernels (73-77 registers): left to itself ptxas
// squeezes the half-precision one into 64 registers, with spills.
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND>
constexpr int kMainMinBlocks = TELEMETRY && !MOMENTUM && sizeof(at::opmath_type<scalar_t>) == 4 ? 3 : 0;

// TELEMETRY: blocks of one-pass tensors also write their Σθ², Σ(Δθ)² to
// telemetry_partials[2·block], [2·block + 1].  ROUND: θ stored with stochastic
// rounding (table.round).
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND>
__global__ void __launch_bounds__(kAmosThreads, (kMainMinBlocks<scalar_t, MOMENTUM, TELEMETRY, ROUND>))
    amos_main_kernel(AmosTable<at::opmath_type<scalar_t>> table, bool clip, at::opmath_type<scalar_t>* partials,
                     double* telemetry_partials) {
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.main_tasks[blockIdx.x];
  const AmosTensor info = table.tensor[task.tensor];
  const AmosCoef<at::opmath_type<scalar_t>> c = table.coefs[table.coef_index[task.tensor]];
  const AmosArrays<scalar_t> x = arrays_of<scalar_t>(table, task.tensor);
  [[maybe_unused]] TelemetrySums<scalar_t> sums;
  switch (info.kind) {
    case kElementwise: {
      const int64_t begin = static_cast<int64_t>(task.chunk) * table.chunk;
      const int64_t end = begin + table.chunk < info.numel ? begin + table.chunk : info.numel;
      step_elementwise<scalar_t, MOMENTUM, TELEMETRY>(x, begin, end, clip, c, sums,
                                                      ParamRounding<ROUND>(table.round, task.tensor));
      break;
    }
    case kWarpRows:
      step_rows<scalar_t, MOMENTUM, TELEMETRY, ROUND, kWarpSize>(x, info, task.chunk, clip, c, sums,
                                                                 ParamRounding<ROUND>(table.round, task.tensor));
      break;
    case kBlockRows:
      step_rows<scalar_t, MOMENTUM, TELEMETRY, ROUND, kAmosThreads>(x, info, task.chunk, clip, c, sums,
                                                                    ParamRounding<ROUND>(table.round, task.tensor));
      break;
    case kLongRows:
      long_row_partial(x, info, task.chunk, table.chunk, clip, c, partials);
      break;
    case kGeneral:
      general_partial(x, info, table.general[info.general], task.chunk, clip, c, partials);
      break;
    default:
      break;
  }
  if constexpr (TELEMETRY) {  // a block-uniform condition: the block steps one tensor
    if (info.kind == kElementwise || info.kind == kWarpRows || info.kind == kBlockRows)
      store_block_telemetry<kAmosThreads>(sums, telemetry_partials + 2 * static_cast<int64_t>(blockIdx.x));
  }
}

// Two-phase tensors: one warp per slot; wa[2·(slot_base + s)] = w, [… + 1] = a.
template <typename scalar_t>
__global__ void __launch_bounds__(kAmosThreads)
    amos_slots_kernel(AmosTable<at::opmath_type<scalar_t>> table, const at::opmath_type<scalar_t>* partials,
                      at::opmath_type<scalar_t>* wa) {
  using Op = at::opmath_type<scalar_t>;
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.slot_tasks[blockIdx.x];
  const AmosTensor info = table.tensor[task.tensor];
  const int64_t s = static_cast<int64_t>(task.chunk) * kAmosWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (s >= info.num_slots) return;  // whole warps
  // kLongRows: a row's chunks are consecutive; kGeneral: piece-major.
  const bool rows = info.kind == kLongRows;
  const int64_t first = info.partial_base + (rows ? s * info.pieces : s);
  const int64_t stride = rows ? 1 : info.num_slots;
  Op sum_sq(0);
  for (int64_t i = lane; i < info.pieces; i += kWarpSize) sum_sq += partials[first + i * stride];
  sum_sq = warp_sum(sum_sq);
  if (lane != 0) return;
  const AmosArrays<scalar_t> x = arrays_of<scalar_t>(table, task.tensor);
  assume_global(x.v);
  assume_global(x.b);
  const AmosCoef<Op> c = table.coefs[table.coef_index[task.tensor]];
  Op v = static_cast<Op>(x.v[s]), b = static_cast<Op>(x.b[s]), w, a;
  amos_slot(v, b, sum_sq / static_cast<Op>(info.row_len), w, a, c);  // g2 = mean of g² over the slot
  x.v[s] = static_cast<scalar_t>(v);
  x.b[s] = static_cast<scalar_t>(b);
  wa[2 * (info.slot_base + s)] = w;
  wa[2 * (info.slot_base + s) + 1] = a;
}

// Blocks per SM the apply kernel is compiled for (0: no minimum).  The variants
// with momentum and stochastic rounding ask for 3 (≤ 85 registers), the occupancy
// they have at 74 registers: left to itself ptxas squeezes them into 64, with
// spills (as kMainMinBlocks above).
template <bool MOMENTUM, bool ROUND>
constexpr int kApplyMinBlocks = MOMENTUM && ROUND ? 3 : 0;

// Two-phase tensors: the elementwise update with each element's slot (w, a).
// TELEMETRY: also this block's Σθ², Σ(Δθ)² into telemetry_partials[2·block], [2·block + 1].
// ROUND: θ stored with stochastic rounding (table.round).
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND>
__global__ void __launch_bounds__(kAmosThreads, (kApplyMinBlocks<MOMENTUM, ROUND>))
    amos_apply_kernel(AmosTable<at::opmath_type<scalar_t>> table, bool clip, const at::opmath_type<scalar_t>* wa,
                      double* telemetry_partials) {
  using Op = at::opmath_type<scalar_t>;
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.apply_tasks[blockIdx.x];
  const AmosTensor info = table.tensor[task.tensor];
  const AmosCoef<Op> c = table.coefs[table.coef_index[task.tensor]];
  const AmosArrays<scalar_t> x = arrays_of<scalar_t>(table, task.tensor);
  const Op* slot_wa = wa + 2 * info.slot_base;
  const ParamRounding<ROUND> rounding(table.round, task.tensor);
  [[maybe_unused]] TelemetrySums<scalar_t> sums;
  if (info.kind == kLongRows) {
    const int64_t row = task.chunk / info.pieces, piece = task.chunk % info.pieces;
    const int64_t begin = row * info.row_len + piece * table.chunk;
    int64_t end = begin + table.chunk;
    if (end > (row + 1) * info.row_len) end = (row + 1) * info.row_len;
    const std::pair<Op, Op> row_wa(slot_wa[2 * row], slot_wa[2 * row + 1]);
    apply_slots<scalar_t, MOMENTUM, TELEMETRY>(x, begin, end, clip, c, [&](int64_t) { return row_wa; }, sums,
                                               rounding);
  } else {
    const AmosGeneralLayout& layout = table.general[info.general];
    const int64_t begin = static_cast<int64_t>(task.chunk) * table.chunk;
    const int64_t end = begin + table.chunk < info.numel ? begin + table.chunk : info.numel;
    apply_slots<scalar_t, MOMENTUM, TELEMETRY>(
        x, begin, end, clip, c,
        [&](int64_t e) {
          const int64_t s = map_digits(layout.element_slot, layout.num_kept, e);
          return std::pair<Op, Op>(slot_wa[2 * s], slot_wa[2 * s + 1]);
        },
        sums, rounding);
  }
  if constexpr (TELEMETRY) {
    store_block_telemetry<kAmosThreads>(sums, telemetry_partials + 2 * static_cast<int64_t>(blockIdx.x));
  }
}

// `telemetry` (null: off): the step's [n][Σθ², Σ(Δθ)²] output (telemetry.cuh),
// from the block sums of the main launch (one-pass tensors) and of the apply
// launch (two-phase tensors); the plan was built with telemetry ranges.  ROUND:
// θ stored with stochastic rounding (the plan was built with round keys).
template <typename scalar_t, bool MOMENTUM, bool TELEMETRY, bool ROUND>
void launch_amos(const TableKey& key, AmosPlan<at::opmath_type<scalar_t>>& plan, bool clip,
                 const at::Device& device, double* telemetry) {
  using Op = at::opmath_type<scalar_t>;
  if (plan.main_tasks == 0) {
    if constexpr (TELEMETRY) zero_telemetry(telemetry, plan.num_tensors, device);
    return;
  }
  at::Tensor scratch;  // partial sums, then (w, a) pairs
  Op* partials = nullptr;
  Op* wa = nullptr;
  if (plan.slot_tasks > 0) {
    scratch = at::empty({plan.num_partials + 2 * plan.num_slots},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<Op>::value).device(device));
    partials = scratch.data_ptr<Op>();
    wa = partials + plan.num_partials;
  }
  at::Tensor telemetry_scratch;  // block sums: the main launch's, then the apply launch's
  double* main_sums = nullptr;
  double* apply_sums = nullptr;
  if constexpr (TELEMETRY) {
    telemetry_scratch = telemetry_partials(plan.main_tasks + plan.apply_tasks, device);
    main_sums = telemetry_scratch.data_ptr<double>();
    apply_sums = main_sums + 2 * plan.main_tasks;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_device_table(key, plan.image, [&](const uint8_t* base) {
    plan.fill_device_coefficients(base, stream);
    const AmosTable<Op> table = plan.view(base);
    amos_main_kernel<scalar_t, MOMENTUM, TELEMETRY, ROUND>
        <<<static_cast<unsigned>(plan.main_tasks), kAmosThreads, 0, stream>>>(table, clip, partials, main_sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.slot_tasks > 0) {
      amos_slots_kernel<scalar_t>
          <<<static_cast<unsigned>(plan.slot_tasks), kAmosThreads, 0, stream>>>(table, partials, wa);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      amos_apply_kernel<scalar_t, MOMENTUM, TELEMETRY, ROUND>
          <<<static_cast<unsigned>(plan.apply_tasks), kAmosThreads, 0, stream>>>(table, clip, wa, apply_sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if constexpr (TELEMETRY) {
      combine_telemetry(main_sums, plan.telemetry_begin(base), plan.telemetry_end(base), plan.num_tensors,
                        telemetry, stream);
    }
  });
}

}  // namespace

void launch(const StepCall<AmosAlgorithm>& call) {
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  const at::TensorList params = call.params;
  const bool momentum = call.hyper.use_momentum != 0, clip = call.hyper.clip != 0;
  const TableKey key = table_key(call.op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_amos_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<AmosCoef<Op>> coefs = opmath_coefficients<Op, AmosCoef>(call);  // (outlives the plan)
    const bool telemetry = call.telemetry != nullptr;
    AmosPlan<Op> plan(call.op, params, call.grads, call.states[0], call.states[1],
                      momentum ? call.states[2] : at::TensorList(), call.layouts, coefs, telemetry,
                      call.round_or_null());
    with_flag(momentum, [&](auto momentum_flag) {
      constexpr bool kMomentum = decltype(momentum_flag)::value;
      with_rounding<scalar_t>(call.op, plan.rounds(), [&](auto round_flag) {
        constexpr bool kRound = decltype(round_flag)::value;
        if (telemetry) {
          launch_amos<scalar_t, kMomentum, true, kRound>(key, plan, clip, params[0].device(), call.telemetry);
        } else {
          launch_amos<scalar_t, kMomentum, false, kRound>(key, plan, clip, params[0].device(), nullptr);
        }
      });
    });
  });
}

}  // namespace amos_fused::cuda
