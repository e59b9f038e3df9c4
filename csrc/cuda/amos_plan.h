// How a bucket of Amos tensors is cut into thread blocks, and the
// device table that tells each block what to do.  Each tensor gets a kind from its
// slot layout (csrc/amos_layout.h):
//   kElementwise  one slot per element: chunks of `chunk` elements, one pass;
//   kWarpRows     trailing reduced axes, rows of ≤ 32·row_packs packs: a warp owns a
//                 row (a block several), the row stays in registers: one pass;
//   kBlockRows    rows of ≤ kAmosThreads·row_packs packs: the block owns a row: one pass;
//   kLongRows     longer rows: per-chunk partial sums of g², then per-row slot math,
//                 then an elementwise pass (two phases);
//   kGeneral      reduced axes that are not trailing: per-(slot, piece) partial sums,
//                 then per-slot math, then an elementwise pass (two phases).
// Launches: `main` (one-pass kinds + the partial sums of two-phase kinds), and only
// when a two-phase tensor is present, `slots` (kAmosWarps slots per block) and
// `apply` (chunks).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../amos_layout.h"
#include "../step_math.h"
#include "device_table.h"
#include "fast_divisor.h"
#include "multi_tensor_apply.cuh"
#include "op_support.h"
#include "param_rounding.cuh"

namespace amos_fused::cuda {

constexpr int kAmosThreads = 256;
constexpr int kAmosWarps = kAmosThreads / 32;
// 16-byte packs of a row each thread holds in registers (g, θ, mu): 16 elements of
// 4-byte types, 16 of 2-byte types (2 packs, keeping registers in check), 8 doubles.
constexpr int row_packs(int64_t pack_width) { return pack_width >= 8 ? 2 : 4; }
constexpr int64_t kRowTaskElements = 32768;    // a row block covers about this many elements
constexpr int64_t kPieceLength = 256;          // general layouts: elements one thread sums

enum AmosKind : int32_t {
  kAmosSkip = 0,  // no elements
  kElementwise,
  kWarpRows,
  kBlockRows,
  kLongRows,
  kGeneral,
};

struct AmosTensor {
  int64_t numel;
  int64_t row_len;        // elements per slot (every kind but kElementwise)
  int64_t num_slots;
  int64_t rows_per_task;  // row kinds: rows per block
  int64_t pieces;         // two-phase kinds: partial sums per slot
  int64_t partial_base;   // two-phase kinds: the tensor's first partial sum
  int64_t slot_base;      // two-phase kinds: the tensor's first (w, a) pair
  int32_t kind;
  int32_t general;        // kGeneral: index into AmosTable::general
};

// One coalesced dim of a general layout as a digit of an index n:
// (n / inner) % size, which adds digit·stride to the mapped index.
struct AmosDigit {
  FastDivisor inner, size;
  int64_t stride;
};

// Σ over `count` digits of n of digit·stride (0 ≤ n < 2^63).
__host__ __device__ __forceinline__ int64_t map_digits(const AmosDigit* digits, int count, int64_t n) {
  int64_t out = 0;
  for (int i = 0; i < count; ++i) {
    const AmosDigit& d = digits[i];
    const int64_t q = d.inner.div(n);
    out += (q - d.size.div(q) * d.size.divisor) * d.stride;
  }
  return out;
}

// Coalesced dims alternate between kept and reduced, so each kind has at most half.
constexpr int kAmosMaxHalfDims = (kAmosMaxDims + 1) / 2;

// A general layout (the coalesced dims of amos_layout.h), as the divisors its
// index maps need, outermost dims first:
//   element e -> its slot            Σ_kept    (e / element stride % size)·slot stride
//   slot s -> its first element      Σ_kept    (s / slot stride % size)·element stride
//   r-th element of a slot -> offset Σ_reduced (r / inner reduced count % size)·element stride
struct AmosGeneralLayout {
  int32_t num_kept, num_reduced;
  FastDivisor num_slots;
  AmosDigit element_slot[kAmosMaxHalfDims];
  AmosDigit slot_base[kAmosMaxHalfDims];
  AmosDigit reduced[kAmosMaxHalfDims];
};

enum AmosArray : int { kParam = 0, kGrad, kV, kB, kMu, kAmosArrays };

// The device view of the table (a kernel argument).
template <typename Op>
struct AmosTable {
  void* const* address[kAmosArrays];  // p, g, v, b, mu (mu only with momentum)
  const AmosTensor* tensor;
  const AmosGeneralLayout* general;
  const int32_t* coef_index;
  const AmosCoef<Op>* coefs;
  const BlockTask* main_tasks;
  const BlockTask* slot_tasks;
  const BlockTask* apply_tasks;
  const RoundKey* round;  // per tensor with stochastic rounding, else null
  const float* skip;      // capturable steps: found_inf on the device, else null
  int64_t chunk;  // elements per chunk
};

inline AmosGeneralLayout general_layout(const AmosLayout& layout, int64_t num_slots) {
  AmosGeneralLayout g{};
  std::vector<AmosDigit> kept_slot, kept_base, reduced;  // inner dims first
  int64_t element_stride = 1, slot_stride = 1, reduced_count = 1;
  for (int d = layout.ndim - 1; d >= 0; --d) {
    const int64_t size = layout.sizes[d];
    if (layout.slot_strides[d] == 0) {
      reduced.push_back({FastDivisor::of(reduced_count), FastDivisor::of(size), element_stride});
      reduced_count *= size;
    } else {
      TORCH_CHECK(layout.slot_strides[d] == slot_stride, "Amos general layout: unexpected slot stride");
      kept_slot.push_back({FastDivisor::of(element_stride), FastDivisor::of(size), slot_stride});
      kept_base.push_back({FastDivisor::of(slot_stride), FastDivisor::of(size), element_stride});
      slot_stride *= size;
    }
    element_stride *= size;
  }
  TORCH_CHECK(static_cast<int>(kept_slot.size()) <= kAmosMaxHalfDims &&
                  static_cast<int>(reduced.size()) <= kAmosMaxHalfDims,
              "Amos general layout: dims do not alternate");
  g.num_kept = static_cast<int32_t>(kept_slot.size());
  g.num_reduced = static_cast<int32_t>(reduced.size());
  g.num_slots = FastDivisor::of(num_slots);
  std::copy(kept_slot.rbegin(), kept_slot.rend(), g.element_slot);
  std::copy(kept_base.rbegin(), kept_base.rend(), g.slot_base);
  std::copy(reduced.rbegin(), reduced.rend(), g.reduced);
  return g;
}

// Host side: the table image of one bucket.  `telemetry`: with the ranges of
// block sums per tensor; `round` (StepCall::round_or_null, per tensor): with the
// tensors' RoundKeys (θ stored with stochastic rounding).
template <typename Op>
class AmosPlan {
 public:
  AmosPlan(const char* op, at::TensorList params, at::TensorList grads, at::TensorList vs,
           at::TensorList bs, at::TensorList mus, const std::vector<AmosLayout>& layouts,
           const CoefTable<AmosCoef<Op>>& coefs, bool telemetry = false,
           const StochasticRound* round = nullptr)
      : rounds_(round != nullptr), coefs_(coefs) {
    const int64_t n = static_cast<int64_t>(params.size());
    check_tensor_count(op, params.size());
    num_tensors = n;
    const int64_t width = 16 / params[0].element_size();  // elements per 16-byte pack
    const int64_t warp_row_capacity = 32 * row_packs(width) * width;
    const int64_t block_row_capacity = kAmosThreads * row_packs(width) * width;
    int64_t total = 0;
    for (const at::Tensor& p : params) total += p.numel();
    chunk = elementwise_chunk(total);

    std::vector<AmosTensor> info(n);
    std::vector<AmosGeneralLayout> generals;
    std::vector<BlockTask> main, slot, apply;
    auto add_tasks = [&](std::vector<BlockTask>& list, int64_t t, int64_t count) {
      check_chunks(op, count);
      for (int64_t c = 0; c < count; ++c) list.push_back({static_cast<int32_t>(t), static_cast<uint32_t>(c)});
    };
    std::vector<int64_t> main_first(n + 1, 0), apply_first(n + 1, 0);  // tensor t's tasks: [first[t], first[t+1])
    for (int64_t t = 0; t < n; ++t) {
      main_first[t] = static_cast<int64_t>(main.size());
      apply_first[t] = static_cast<int64_t>(apply.size());
      AmosTensor& x = info[t];
      const AmosLayout& layout = layouts[t];
      x.numel = params[t].numel();
      x.general = -1;
      x.num_slots = layout.num_slots;
      if (x.numel == 0) {
        x.kind = kAmosSkip;
      } else if (layout.row_len == 1) {
        x.kind = kElementwise;
        add_tasks(main, t, ceil_div(x.numel, chunk));
      } else if (layout.row_len > 1) {
        x.row_len = layout.row_len;
        x.num_slots = x.numel / x.row_len;
        if (x.row_len <= block_row_capacity) {
          const bool warp = x.row_len <= warp_row_capacity;
          x.kind = warp ? kWarpRows : kBlockRows;
          x.rows_per_task = std::max<int64_t>(warp ? kAmosWarps : 1, kRowTaskElements / x.row_len);
          add_tasks(main, t, ceil_div(x.num_slots, x.rows_per_task));
        } else {
          x.kind = kLongRows;
          x.pieces = ceil_div(x.row_len, chunk);
          add_two_phase(x, x.num_slots * x.pieces);
          add_tasks(main, t, x.num_slots * x.pieces);
          add_tasks(slot, t, ceil_div(x.num_slots, kAmosWarps));
          add_tasks(apply, t, x.num_slots * x.pieces);
        }
      } else {
        x.kind = kGeneral;
        x.row_len = x.numel / x.num_slots;
        x.pieces = ceil_div(x.row_len, kPieceLength);
        x.general = static_cast<int32_t>(generals.size());
        generals.push_back(general_layout(layout, x.num_slots));
        add_two_phase(x, x.num_slots * x.pieces);
        add_tasks(main, t, ceil_div(x.num_slots * x.pieces, kAmosThreads));
        add_tasks(slot, t, ceil_div(x.num_slots, kAmosWarps));
        add_tasks(apply, t, ceil_div(x.numel, chunk));
      }
    }
    main_first[n] = static_cast<int64_t>(main.size());
    apply_first[n] = static_cast<int64_t>(apply.size());
    main_tasks = static_cast<int64_t>(main.size());
    slot_tasks = static_cast<int64_t>(slot.size());
    apply_tasks = static_cast<int64_t>(apply.size());
    check_grid(op, std::max({main_tasks, slot_tasks, apply_tasks}));

    // Sections that change from step to step first, so one upload covers them.
    coefs_section_ = image.add<AmosCoef<Op>>(n);
    if (rounds_) round_section_ = image.add<RoundKey>(n);
    const at::TensorList arrays[kAmosArrays] = {params, grads, vs, bs, mus};
    for (int a = 0; a < kAmosArrays; ++a) address_section_[a] = image.add<void*>(n);
    coef_index_section_ = image.add<int32_t>(n);
    tensor_section_ = image.add<AmosTensor>(n);
    general_section_ = image.add<AmosGeneralLayout>(static_cast<int64_t>(generals.size()));
    main_section_ = image.add<BlockTask>(main_tasks);
    slot_section_ = image.add<BlockTask>(slot_tasks);
    apply_section_ = image.add<BlockTask>(apply_tasks);
    if (telemetry) telemetry_section_ = image.add<int64_t>(2 * n);
    image.allocate();

    image.set_used(coefs_section_, static_cast<int64_t>(coefs.unique.size()));
    if (coefs.device_columns == nullptr)  // (a capturable step's stay zero bytes: filled on the device)
      std::copy(coefs.unique.begin(), coefs.unique.end(), image.data<AmosCoef<Op>>(coefs_section_));
    if (rounds_) {
      RoundKey* keys = image.data<RoundKey>(round_section_);
      for (int64_t t = 0; t < n; ++t) keys[t] = round_key(round[t]);
    }
    for (int a = 0; a < kAmosArrays; ++a) {
      void** out = image.data<void*>(address_section_[a]);
      for (int64_t t = 0; t < n; ++t) out[t] = arrays[a].empty() ? nullptr : arrays[a][t].data_ptr();
    }
    std::copy(coefs.index.begin(), coefs.index.end(), image.data<int32_t>(coef_index_section_));
    std::copy(info.begin(), info.end(), image.data<AmosTensor>(tensor_section_));
    std::copy(generals.begin(), generals.end(), image.data<AmosGeneralLayout>(general_section_));
    std::copy(main.begin(), main.end(), image.data<BlockTask>(main_section_));
    std::copy(slot.begin(), slot.end(), image.data<BlockTask>(slot_section_));
    std::copy(apply.begin(), apply.end(), image.data<BlockTask>(apply_section_));
    if (telemetry) {  // θ of tensor t is written by its main blocks, or its apply blocks (two-phase kinds)
      int64_t* begin = image.data<int64_t>(telemetry_section_);
      int64_t* end = begin + n;
      for (int64_t t = 0; t < n; ++t) {
        const bool two_phase = info[t].kind == kLongRows || info[t].kind == kGeneral;
        const std::vector<int64_t>& first = two_phase ? apply_first : main_first;
        const int64_t offset = two_phase ? main_tasks : 0;
        begin[t] = offset + first[t];
        end[t] = offset + first[t + 1];
      }
    }
  }

  // With telemetry: tensor t's pairs of block sums are [begin[t], end[t]) of one
  // buffer of main_tasks + apply_tasks pairs, the main launch's blocks first, then
  // the apply launch's (device arrays of the table at base).
  const int64_t* telemetry_begin(const uint8_t* base) const {
    return device_section<int64_t>(base, image, telemetry_section_);
  }
  const int64_t* telemetry_end(const uint8_t* base) const {
    return telemetry_begin(base) + num_tensors;
  }

  AmosTable<Op> view(const uint8_t* base) const {
    AmosTable<Op> v;
    for (int a = 0; a < kAmosArrays; ++a)
      v.address[a] = device_section<void*>(base, image, address_section_[a]);
    v.tensor = device_section<AmosTensor>(base, image, tensor_section_);
    v.general = device_section<AmosGeneralLayout>(base, image, general_section_);
    v.coef_index = device_section<int32_t>(base, image, coef_index_section_);
    v.coefs = device_section<AmosCoef<Op>>(base, image, coefs_section_);
    v.main_tasks = device_section<BlockTask>(base, image, main_section_);
    v.slot_tasks = device_section<BlockTask>(base, image, slot_section_);
    v.apply_tasks = device_section<BlockTask>(base, image, apply_section_);
    v.round = rounds_ ? device_section<RoundKey>(base, image, round_section_) : nullptr;
    v.skip = coefs_.skip;
    v.chunk = chunk;
    return v;
  }

  // A capturable step's coefficients, computed into the table at `base` on the
  // device (device_coefficients.cuh); nothing for host-computed ones.  Call after
  // the upload, before the step's kernels.
  void fill_device_coefficients(const uint8_t* base, cudaStream_t stream) const {
    cuda::fill_device_coefficients(coefs_, view(base).coefs, num_tensors, stream);
  }

  bool rounds() const { return rounds_; }

  TableImage image;
  int64_t chunk = 0;
  int64_t main_tasks = 0, slot_tasks = 0, apply_tasks = 0;
  int64_t num_partials = 0;  // two-phase: partial sums of g²
  int64_t num_slots = 0;     // two-phase: (w, a) pairs
  int64_t num_tensors = 0;

 private:
  void add_two_phase(AmosTensor& x, int64_t partials) {
    x.partial_base = num_partials;
    num_partials += partials;
    x.slot_base = num_slots;
    num_slots += x.num_slots;
  }

  bool rounds_;
  const CoefTable<AmosCoef<Op>>& coefs_;  // (outlives the plan: the launch's)
  int coefs_section_, address_section_[kAmosArrays], coef_index_section_, tensor_section_,
      general_section_, main_section_, slot_section_, apply_section_, telemetry_section_ = -1,
      round_section_ = -1;
};

}  // namespace amos_fused::cuda
