// Amos slot layouts: how a tensor's elements map to the entries of
// its v / b slots, read off the shapes of v and the param.  Shared by the CPU and
// CUDA ops; everything here only checks and describes, it never writes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace amos_fused {

// How an Amos tensor's elements map to its slots: the three kinds every backend
// walks (how a backend schedules long or short rows is its own business).
enum AmosSlotKind : int32_t {
  kSlotsElementwise = 0,  // one slot per element (no reduced axis, or ≤ 1 element)
  kSlotsRows = 1,         // the reduced axes are trailing: each slot owns a contiguous row
  kSlotsGeneral = 2,      // any other layout
};

constexpr int kAmosMaxDims = 16;
struct AmosLayout {
  int32_t kind;  // AmosSlotKind
  // Elements per slot for kSlotsRows, 1 for kSlotsElementwise, 0 for kSlotsGeneral.
  int64_t row_len;
  // Rows and general layouts: dims after dropping size-1 dims and merging
  // neighbours, with the slot stride of each (0 for reduced dims).
  int ndim;
  int64_t sizes[kAmosMaxDims];
  int64_t slot_strides[kAmosMaxDims];
  int64_t num_slots;
};

// Slot layout of param p with slot tensor v: v is 0-dim (one slot) or has p's
// dims with each size equal to p's or 1 (reduced).
inline AmosLayout describe_amos_slots(const char* op, const at::Tensor& p, const at::Tensor& v,
                                      size_t index) {
  AmosLayout layout{};
  const int64_t numel = p.numel();
  layout.num_slots = v.numel();
  std::vector<bool> reduced(p.dim(), v.dim() == 0);
  if (v.dim() != 0) {
    TORCH_CHECK_VALUE(v.dim() == p.dim(), op, ": vs[", index, "] has shape ", v.sizes(),
                      ", not a slot shape of its param ", p.sizes());
    for (int64_t d = 0; d < p.dim(); ++d) {
      TORCH_CHECK_VALUE(v.size(d) == p.size(d) || v.size(d) == 1, op, ": vs[", index,
                        "] has shape ", v.sizes(), ", not a slot shape of its param ", p.sizes());
      reduced[d] = v.size(d) == 1 && p.size(d) != 1;
    }
  }
  // Coalesce: drop size-1 dims, merge neighbours that are both reduced or both kept.
  std::vector<int64_t> sizes;
  std::vector<bool> kinds;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) == 1) continue;
    if (!kinds.empty() && kinds.back() == reduced[d]) {
      sizes.back() *= p.size(d);
    } else {
      sizes.push_back(p.size(d));
      kinds.push_back(reduced[d]);
    }
  }
  const bool any_reduced = std::find(kinds.begin(), kinds.end(), true) != kinds.end();
  if (!any_reduced || numel <= 1) {
    layout.kind = kSlotsElementwise;
    layout.row_len = 1;
    return layout;
  }
  TORCH_CHECK_VALUE(static_cast<int>(sizes.size()) <= kAmosMaxDims, op, ": params[", index,
                    "] has too many dims");
  const bool rows = kinds.back() && std::count(kinds.begin(), kinds.end(), true) == 1;
  layout.kind = rows ? kSlotsRows : kSlotsGeneral;
  layout.row_len = rows ? sizes.back() : 0;
  layout.ndim = static_cast<int>(sizes.size());
  int64_t stride = 1;
  for (int d = layout.ndim - 1; d >= 0; --d) {
    layout.sizes[d] = sizes[d];
    layout.slot_strides[d] = kinds[d] ? 0 : stride;
    if (!kinds[d]) stride *= sizes[d];
  }
  return layout;
}

// Each slot tensor is contiguous, of its param's dtype and device; params are contiguous.
inline void check_amos_slots(const char* op, at::TensorList params, at::TensorList slots,
                             const char* name) {
  TORCH_CHECK_VALUE(slots.size() == params.size(), op, ": ", params.size(), " params but ",
                    slots.size(), " ", name);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& s = slots[i];
    TORCH_CHECK_VALUE(s.scalar_type() == params[i].scalar_type() && s.device() == params[i].device() &&
                          s.is_contiguous(),
                      op, ": ", name, "[", i, "] must be a contiguous ", params[i].scalar_type(),
                      " tensor on ", params[i].device(), ", got ", s.scalar_type(), " on ", s.device());
    TORCH_CHECK_VALUE(params[i].is_contiguous(), op, ": params[", i, "] must be contiguous");
  }
}

// Checks vs and bs against the params and returns every tensor's slot layout.
inline std::vector<AmosLayout> amos_slot_layouts(const char* op, at::TensorList params,
                                                 at::TensorList vs, at::TensorList bs) {
  check_amos_slots(op, params, vs, "vs");
  check_amos_slots(op, params, bs, "bs");
  std::vector<AmosLayout> layouts;
  layouts.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(bs[i].sizes() == vs[i].sizes(), op, ": bs[", i, "] has shape ", bs[i].sizes(),
                      " but vs[", i, "] has ", vs[i].sizes());
    layouts.push_back(describe_amos_slots(op, params[i], vs[i], i));
  }
  return layouts;
}

// The op form of amos_slot_layouts (for the Triton backend): one int64 row per
// tensor, (kind, num_slots, row_len, ndim, sizes[kAmosMaxDims], slot_strides[kAmosMaxDims]).
at::Tensor amos_slot_layouts_op(c10::string_view op, at::TensorList params, at::TensorList vs,
                                at::TensorList bs);

}  // namespace amos_fused
