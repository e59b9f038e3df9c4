#include "checks.h"

#include "fp8_states.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace amos_fused {
namespace {

bool supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Strides only matter to the kernels that walk memory (not to the reference).
Problem grad_problem(const at::Tensor& param, const at::Tensor& grad, Walk walk) {
  if (grad.is_sparse() || grad.layout() != c10::kStrided) return Problem::kGradSparse;
  if (grad.scalar_type() != param.scalar_type()) return Problem::kGradDtype;
  if (grad.device() != param.device()) return Problem::kGradDevice;
  if (grad.sizes() != param.sizes()) return Problem::kGradShape;
  if (walk != Walk::kAny && grad.numel() > 1 && grad.strides() != param.strides())
    return Problem::kGradLayout;
  return Problem::kNone;
}

bool walkable(const at::Tensor& p, Walk walk) {
  switch (walk) {
    case Walk::kAny: return true;
    case Walk::kDense: return is_dense(p);
    case Walk::kContiguous: return p.numel() == 0 || p.is_contiguous();
  }
  return false;
}

bool like_param(const at::Tensor& s, const at::Tensor& p, Walk walk) {
  return s.layout() == c10::kStrided && s.scalar_type() == p.scalar_type() &&
         s.device() == p.device() && s.sizes() == p.sizes() &&
         (walk == Walk::kAny || s.numel() <= 1 || s.strides() == p.strides());
}

// The bytes from t's lowest to its highest element, [first, last) (any strides;
// t has elements).  data_ptr() gives a copy-on-write tensor (torch._lazy_clone)
// memory of its own first, as the step's write would: two such clones of one
// tensor are then not taken to share memory.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const intptr_t size = static_cast<intptr_t>(t.element_size());
  const uintptr_t base = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.is_contiguous()) return {base, base + static_cast<uintptr_t>(t.numel() * size)};
  intptr_t low = 0, high = 0;
  const c10::IntArrayRef sizes = t.sizes(), strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    const intptr_t reach = static_cast<intptr_t>((sizes[d] - 1) * strides[d]) * size;
    (reach < 0 ? low : high) += reach;
  }
  return {base + low, base + high + size};
}

// Whether a and b may share memory: their byte spans intersect (exact for two
// dense tensors; interleaved strided views count as sharing).
bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device() || a.is_meta() ||
      a.layout() != c10::kStrided || b.layout() != c10::kStrided)
    return false;
  const auto [a_first, a_last] = byte_span(a);
  const auto [b_first, b_last] = byte_span(b);
  return a_first < b_last && b_first < a_last;
}

// Index of a tensor whose memory overlaps another's (the later of the first pair
// found), or -1: first_written_overlap with every tensor written.
int64_t first_overlap(at::TensorList tensors) {
  return std::get<1>(first_written_overlap(tensors, static_cast<int64_t>(tensors.size())));
}

// A tensor of a subclass that handles its ops in Python (__torch_dispatch__: a
// DTensor, whose values live in its local shard): no memory of its own to read or
// write.
bool dispatches_in_python(const at::Tensor& t) { return t.key_set().has(c10::DispatchKey::Python); }

}  // namespace

bool is_step_counter(const at::Tensor& s) {
  return s.layout() == c10::kStrided && !s.is_mkldnn() && !dispatches_in_python(s) && s.numel() == 1 &&
         s.scalar_type() == at::kFloat &&
         s.device().is_cpu() && *s.data_ptr<float>() >= 0.0f && std::isfinite(*s.data_ptr<float>());
}

bool is_dense(const at::Tensor& t) { return t.numel() == 0 || t.is_non_overlapping_and_dense(); }

bool lazy_view(const at::Tensor& t) { return t.is_neg() || t.is_conj() || t._is_zerotensor(); }

Found find_problem(at::TensorList params, at::TensorList grads,
                   at::ArrayRef<at::TensorList> states, at::ArrayRef<at::TensorList> slots,
                   at::TensorList steps, Walk walk, bool check_overlap) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "amos_fused: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK_VALUE(steps.empty() || steps.size() == n, "amos_fused: ", n, " params but ",
                    steps.size(), " steps");
  for (const at::TensorList& list : states)
    TORCH_CHECK_VALUE(list.empty() || list.size() == n, "amos_fused: ", n, " params but ",
                      list.size(), " state tensors");
  for (const at::TensorList& list : slots)
    TORCH_CHECK_VALUE(list.empty() || list.size() == n, "amos_fused: ", n, " params but ",
                      list.size(), " slot tensors");
  // torch refuses in-place updates of inference tensors outside inference mode
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t at = static_cast<int64_t>(i);
    // (first: a lazy step counter's memory is not its count)
    if (lazy_view(p)) return {at, Problem::kLazy, 0};
    if (!steps.empty() && lazy_view(steps[i])) return {at, Problem::kLazy, 1};
    for (size_t k = 0; k < states.size(); ++k)
      if (!states[k].empty() && lazy_view(states[k][i])) return {at, Problem::kLazy, int64_t(2 + k)};
    for (size_t k = 0; k < slots.size(); ++k)
      if (!slots[k].empty() && lazy_view(slots[k][i])) return {at, Problem::kLazy, int64_t(2 + states.size() + k)};
    if (grads[i]._is_zerotensor()) return {at, Problem::kLazy, -1};
    if (!supported_dtype(p.scalar_type())) return {at, Problem::kParamDtype, 0};
    if (p.scalar_type() != params[0].scalar_type() || p.device() != params[0].device())
      return {at, Problem::kParamMixed, 0};
    if (!walkable(p, walk)) return {at, Problem::kParamLayout, 0};
    const Problem grad = grad_problem(p, grads[i], walk);
    if (grad != Problem::kNone) return {at, grad, 0};
    for (size_t k = 0; k < states.size(); ++k) {
      if (states[k].empty()) continue;
      const at::Tensor& s = states[k][i];
      if (!like_param(s, p, walk) || dispatches_in_python(s)) return {at, Problem::kState, int64_t(k)};
      bool shared = may_share_memory(s, p);  // (state['exp_avg'] = p.data, or exp_avg_sq itself)
      for (size_t j = 0; j < k && !shared; ++j) shared = !states[j].empty() && may_share_memory(s, states[j][i]);
      if (shared) return {at, Problem::kStateShared, int64_t(k)};
    }
    for (size_t k = 0; k < slots.size(); ++k) {
      if (slots[k].empty()) continue;
      const at::Tensor& s = slots[k][i];
      if (s.scalar_type() != p.scalar_type() || s.device() != p.device() || dispatches_in_python(s) ||
          (walk != Walk::kAny && !s.is_contiguous()))
        return {at, Problem::kSlot, int64_t(k)};
      bool shared = may_share_memory(s, p);
      for (size_t j = 0; j < states.size() && !shared; ++j) shared = !states[j].empty() && may_share_memory(s, states[j][i]);
      for (size_t j = 0; j < k && !shared; ++j) shared = !slots[j].empty() && may_share_memory(s, slots[j][i]);
      if (shared) return {at, Problem::kSlotShared, int64_t(k)};
    }
    if (!steps.empty()) {
      const at::Tensor& s = steps[i];
      if (!is_step_counter(s)) return {at, Problem::kStep, 0};
      bool aliased = may_share_memory(s, p) || may_share_memory(s, grads[i]);
      for (const at::TensorList& list : states) aliased = aliased || (!list.empty() && may_share_memory(s, list[i]));
      for (const at::TensorList& list : slots) aliased = aliased || (!list.empty() && may_share_memory(s, list[i]));
      if (aliased) return {at, Problem::kStepAliased, 0};
    }
    if (!inference_mode) {
      if (p.is_inference()) return {at, Problem::kInference, 0};
      if (!steps.empty() && steps[i].is_inference()) return {at, Problem::kInference, 1};
      for (size_t k = 0; k < states.size(); ++k)
        if (!states[k].empty() && states[k][i].is_inference()) return {at, Problem::kInference, int64_t(2 + k)};
      for (size_t k = 0; k < slots.size(); ++k)
        if (!slots[k].empty() && slots[k][i].is_inference())
          return {at, Problem::kInference, int64_t(2 + states.size() + k)};
    }
  }
  if (!steps.empty()) {
    const int64_t shared = first_overlap(steps);  // (one-element counters: the same tensor)
    if (shared >= 0) return {shared, Problem::kStepShared, 0};
  }
  if (check_overlap && walk != Walk::kAny) {
    const int64_t overlap = first_overlap(params);
    if (overlap >= 0) return {overlap, Problem::kOverlap, 0};
  }
  return {};
}

std::tuple<int64_t, int64_t, int64_t> check_step(at::TensorList params, at::TensorList grads,
                                                 at::TensorList states, at::TensorList slots,
                                                 at::TensorList steps, int64_t walk) {
  const size_t n = params.size();
  auto split = [n](at::TensorList flat) {
    std::vector<at::TensorList> lists;
    if (n == 0) return lists;
    TORCH_CHECK_VALUE(flat.size() % n == 0, "amos_fused.check_step: ", flat.size(),
                      " tensors is not a whole number of lists of ", n);
    for (size_t k = 0; k < flat.size() / n; ++k) lists.push_back(flat.slice(k * n, n));
    return lists;
  };
  TORCH_CHECK_VALUE(walk >= 0 && walk <= 2, "amos_fused.check_step: walk must be 0, 1 or 2");
  const std::vector<at::TensorList> state_lists = split(states), slot_lists = split(slots);
  const Found found = find_problem(params, grads, state_lists, slot_lists, steps,
                                   static_cast<Walk>(walk), /*check_overlap=*/true);
  return {found.index, static_cast<int64_t>(found.problem), found.list};
}

std::tuple<int64_t, int64_t> first_written_overlap(at::TensorList tensors, int64_t written) {
  TORCH_CHECK_VALUE(written >= 0 && written <= static_cast<int64_t>(tensors.size()),
                    "amos_fused.first_written_overlap: written must be in [0, ", tensors.size(), "]");
  struct Span {
    int64_t device_key;
    uintptr_t first, last;
    int64_t index;
  };
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    // (written strided views that are not dense, which only the reference steps, one
    // param after another, may interleave without sharing an element: not compared; a
    // grad that is not dense is compared by the bytes it spans, which may refuse a grad
    // interleaved with another param's memory without sharing an element of it)
    const bool is_read = static_cast<int64_t>(i) >= written;
    if (!t.defined() || t.numel() == 0 || t.is_meta() || t.layout() != c10::kStrided || (!is_read && !is_dense(t)))
      continue;
    const auto [first, last] = byte_span(t);
    const int64_t device_key = static_cast<int64_t>(t.device().type()) * 65536 + t.device().index() + 1;
    spans.push_back({device_key, first, last, static_cast<int64_t>(i)});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.device_key != b.device_key ? a.device_key < b.device_key : a.first < b.first;
  });
  // Sweep in address order: an earlier span overlapping this one reaches past its
  // start, so the farthest-reaching earlier span (of any kind, or of a written
  // tensor) finds it.
  const Span* reach_any = nullptr;
  const Span* reach_written = nullptr;
  for (const Span& span : spans) {
    if (reach_any != nullptr && reach_any->device_key != span.device_key) reach_any = reach_written = nullptr;
    const bool is_written = span.index < written;
    const Span* other = is_written ? reach_any : reach_written;
    if (other != nullptr && span.first < other->last)
      return {std::min(other->index, span.index), std::max(other->index, span.index)};
    if (reach_any == nullptr || span.last > reach_any->last) reach_any = &span;
    if (is_written && (reach_written == nullptr || span.last > reach_written->last)) reach_written = &span;
  }
  return {-1, -1};
}

std::vector<int64_t> layout_signature(at::TensorList tensors) {
  size_t words = 0;
  for (const at::Tensor& t : tensors) words += 3 + static_cast<size_t>(t.dim());
  std::vector<int64_t> out;
  out.reserve(words);
  for (const at::Tensor& t : tensors) {
    out.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.has_storage() ? t.data_ptr() : nullptr)));
    out.push_back(t.numel());
    out.push_back(t.dim());
    out.insert(out.end(), t.strides().begin(), t.strides().end());
  }
  return out;
}

std::pair<int64_t, int64_t> find_fp8_problem(at::TensorList params, at::ArrayRef<at::TensorList> codes,
                                             at::ArrayRef<at::TensorList> absmax) {
  const size_t n = params.size();
  const int64_t lists = static_cast<int64_t>(codes.size());
  TORCH_CHECK_VALUE(absmax.size() == codes.size(), "amos_fused: ", codes.size(), " code lists but ",
                    absmax.size(), " absmax lists");
  for (int64_t k = 0; k < lists; ++k) {
    TORCH_CHECK_VALUE(codes[k].size() == n && absmax[k].size() == n, "amos_fused: ", n, " params but ",
                      codes[k].size(), " codes and ", absmax[k].size(), " absmax tensors");
  }
  // (an inference tensor cannot be written outside inference mode: torch refuses it half-way through a step)
  const bool in_inference_mode = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t blocks = (p.numel() + kFp8Block - 1) / kFp8Block;
    for (int64_t k = 0; k < lists; ++k) {
      const at::Tensor& c = codes[k][i];
      if (lazy_view(c) || (c.is_inference() && !in_inference_mode) ||
          !(c.layout() == c10::kStrided && c.scalar_type() == at::kByte && c.device() == p.device() &&
            c.sizes() == p.sizes() && (c.numel() <= 1 || c.strides() == p.strides())))
        return {static_cast<int64_t>(i), k};
      const at::Tensor& a = absmax[k][i];
      if (lazy_view(a) || (a.is_inference() && !in_inference_mode) ||
          !(a.layout() == c10::kStrided && a.scalar_type() == at::kFloat && a.device() == p.device() &&
            a.dim() == 1 && a.numel() == blocks && a.is_contiguous()))
        return {static_cast<int64_t>(i), lists + k};
    }
  }
  return {-1, 0};
}

std::tuple<int64_t, int64_t> check_fp8_states(at::TensorList params, at::TensorList codes,
                                              at::TensorList absmax) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(n > 0 && codes.size() % n == 0 && codes.size() == absmax.size(),
                    "amos_fused.check_fp8_states: ", codes.size(), " codes and ", absmax.size(),
                    " absmax tensors are not whole lists of ", n);
  std::vector<at::TensorList> code_lists, absmax_lists;
  for (size_t k = 0; k < codes.size() / n; ++k) {
    code_lists.push_back(codes.slice(k * n, n));
    absmax_lists.push_back(absmax.slice(k * n, n));
  }
  const auto found = find_fp8_problem(params, code_lists, absmax_lists);
  return {found.first, found.second};
}

void check_bucket(const char* op, at::TensorList params, at::TensorList grads,
                  at::ArrayRef<NamedList> states, at::TensorList steps) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": empty bucket");
  std::vector<at::TensorList> lists;
  std::vector<const char*> names;
  for (const NamedList& state : states) {
    names.push_back(state.first);
    lists.push_back(state.second);
  }
  const Found f = find_problem(params, grads, lists, {}, steps, Walk::kDense, /*check_overlap=*/false);
  if (f.problem == Problem::kNone) return;
  const at::Tensor& p = params[f.index];
  const std::string where = std::string(op) + ": params[" + std::to_string(f.index) + "]";
  switch (f.problem) {
    case Problem::kParamDtype:
      TORCH_CHECK_TYPE(false, where, " has dtype ", p.scalar_type(),
                       ", which is not supported (float32, float64, bfloat16, float16)");
    case Problem::kParamMixed:
      TORCH_CHECK_TYPE(false, where, " (", p.scalar_type(), " on ", p.device(),
                       ") is unlike params[0] (", params[0].scalar_type(), " on ",
                       params[0].device(), ")");
    case Problem::kParamLayout:
      TORCH_CHECK_VALUE(false, where, " is not dense in memory (a strided view?)");
    case Problem::kState:
      TORCH_CHECK_VALUE(false, op, ": ", names[f.list], "[", f.index, "] (",
                        lists[f.list][f.index].scalar_type(), " ", lists[f.list][f.index].sizes(),
                        ") does not match its param (", p.scalar_type(), " ", p.sizes(), ")");
    case Problem::kStep:
      TORCH_CHECK_VALUE(false, op, ": steps[", f.index, "] must be a finite float32 CPU scalar >= 0");
    case Problem::kStateShared:
      TORCH_CHECK_VALUE(false, op, ": ", names[f.list], "[", f.index, "] shares memory with its param or ",
                        "another of its states");
    case Problem::kStepShared:
      TORCH_CHECK_VALUE(false, op, ": steps[", f.index, "] is also another param's step counter");
    case Problem::kStepAliased:
      TORCH_CHECK_VALUE(false, op, ": steps[", f.index, "] shares memory with its param, grad or a state");
    case Problem::kInference:
      TORCH_CHECK(false, op, ": ", f.list == 0 ? "params" : f.list == 1 ? "steps" : names[f.list - 2], "[",
                  f.index, "] is an inference tensor, which cannot be updated in place outside inference mode");
    case Problem::kLazy:
      TORCH_CHECK_VALUE(false, op, ": ", f.list < 0 ? "grads" : f.list == 0 ? "params" : f.list == 1 ? "steps" : names[f.list - 2],
                        "[", f.index, "] is a lazily negated or conjugated view or a ZeroTensor; resolve it first");
    default:
      TORCH_CHECK_VALUE(false, op, ": grads[", f.index, "] (", grads[f.index].scalar_type(), " ",
                        grads[f.index].sizes(), " on ", grads[f.index].device(),
                        ") does not match its param (", p.scalar_type(), " ", p.sizes(), " on ",
                        p.device(), ")");
  }
}

void check_low_params(const char* op, at::TensorList params, at::TensorList grads, at::TensorList low_params,
                      at::TensorList steps) {
  TORCH_CHECK_VALUE(low_params.size() == params.size(), op, ": ", params.size(), " params but ",
                    low_params.size(), " low_params");
  TORCH_CHECK_VALUE(!params.empty(), op, ": empty bucket");
  const at::ScalarType low = low_params[0].scalar_type();
  TORCH_CHECK_TYPE(low == at::kBFloat16 || low == at::kHalf, op,
                   ": low_params must be bfloat16 or float16, got ", low);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& q = low_params[i];
    TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat, op, ": params[", i, "] must be a float32 master, got ",
                     p.scalar_type());
    TORCH_CHECK_VALUE(!lazy_view(q) && q.layout() == at::kStrided && q.scalar_type() == low && q.device() == p.device() &&
                          q.sizes() == p.sizes() && q.strides() == p.strides(),
                      op, ": low_params[", i, "] (", q.scalar_type(), " ", q.sizes(), " strides ", q.strides(),
                      " on ", q.device(), ") must be ", low, " with the sizes and strides of params[", i, "] (",
                      p.sizes(), " strides ", p.strides(), " on ", p.device(), ")");
    const int64_t bytes = p.numel() * 4;
    const auto* a = static_cast<const char*>(p.data_ptr());
    const auto* b = static_cast<const char*>(q.data_ptr());
    TORCH_CHECK_VALUE(p.numel() == 0 || b + p.numel() * 2 <= a || a + bytes <= b, op, ": low_params[", i,
                      "] shares memory with its master");
  }
  // the grads against the low params (dtype, sizes, strides, density)
  check_bucket(op, low_params, grads, {}, steps);
}

GradScaling read_grad_scaling(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  GradScaling out{false, 1.0};
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->is_floating_point(), op,
                      ": found_inf must be a one-element floating tensor, got ",
                      found_inf->scalar_type(), " ", found_inf->sizes());
    out.skip = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->is_floating_point(), op,
                      ": grad_scale must be a one-element floating tensor, got ",
                      grad_scale->scalar_type(), " ", grad_scale->sizes());
    out.unscale = 1.0 / grad_scale->item<double>();
  }
  return out;
}

}  // namespace amos_fused
