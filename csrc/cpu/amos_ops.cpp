// CPU entry point of the Amos op: check the bucket, work out each tensor's slot
// layout from its param and slot shapes, advance the steps, run the kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "../step_coefficients.h"
#include "kernel_api.h"

namespace amos_fused::cpu {
namespace {

constexpr const char* kOp = "amos_fused.amos_step";

// Slot layout of param p with slot tensor v: v is 0-dim (one slot) or has p's
// dims with each size equal to p's or 1 (reduced).
AmosLayout describe_slots(const at::Tensor& p, const at::Tensor& v, size_t index) {
  AmosLayout layout{};
  const int64_t numel = p.numel();
  layout.num_slots = v.numel();
  std::vector<bool> reduced(p.dim(), v.dim() == 0);
  if (v.dim() != 0) {
    TORCH_CHECK_VALUE(v.dim() == p.dim(), kOp, ": vs[", index, "] has shape ", v.sizes(),
                      ", not a slot shape of its param ", p.sizes());
    for (int64_t d = 0; d < p.dim(); ++d) {
      TORCH_CHECK_VALUE(v.size(d) == p.size(d) || v.size(d) == 1, kOp, ": vs[", index,
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
    layout.row_len = 1;
  } else if (kinds.back() && std::count(kinds.begin(), kinds.end(), true) == 1) {
    layout.row_len = sizes.back();
  } else {
    TORCH_CHECK_VALUE(static_cast<int>(sizes.size()) <= kAmosMaxDims, kOp, ": params[", index,
                      "] has too many dims");
    layout.row_len = 0;
    layout.ndim = static_cast<int>(sizes.size());
    int64_t stride = 1;
    for (int d = layout.ndim - 1; d >= 0; --d) {
      layout.sizes[d] = sizes[d];
      layout.slot_strides[d] = kinds[d] ? 0 : stride;
      if (!kinds[d]) stride *= sizes[d];
    }
  }
  return layout;
}

void check_slots(at::TensorList params, at::TensorList slots, const char* name) {
  TORCH_CHECK_VALUE(slots.size() == params.size(), kOp, ": ", params.size(), " params but ",
                    slots.size(), " ", name);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& s = slots[i];
    TORCH_CHECK_VALUE(s.scalar_type() == params[i].scalar_type() && s.device() == params[i].device() &&
                          s.is_contiguous(),
                      kOp, ": ", name, "[", i, "] must be a contiguous ", params[i].scalar_type(),
                      " tensor on ", params[i].device(), ", got ", s.scalar_type(), " on ", s.device());
    TORCH_CHECK_VALUE(params[i].is_contiguous(), kOp, ": params[", i, "] must be contiguous");
  }
}

void amos_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs,
                   at::TensorList bs, at::TensorList mus, at::TensorList steps,
                   at::ArrayRef<double> etas, double lr, double beta, std::optional<double> momentum,
                   std::optional<double> clip_value, double extra_l2, double d_coef, double c_coef,
                   double epsilon, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  check_bucket(kOp, params, grads, {{"mus", momentum ? mus : at::TensorList()}}, steps);
  TORCH_CHECK_VALUE(!steps.empty(), kOp, ": steps are required");
  TORCH_CHECK_VALUE(!momentum || !mus.empty(), kOp, ": momentum needs mus");
  TORCH_CHECK_VALUE(etas.size() == params.size(), kOp, ": ", params.size(), " params but ",
                    etas.size(), " etas");
  check_slots(params, vs, "vs");
  check_slots(params, bs, "bs");
  const size_t n = params.size();
  std::vector<AmosLayout> layouts;
  layouts.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(bs[i].sizes() == vs[i].sizes(), kOp, ": bs[", i, "] has shape ", bs[i].sizes(),
                      " but vs[", i, "] has ", vs[i].sizes());
    layouts.push_back(describe_slots(params[i], vs[i], i));
  }
  const GradScaling scaling = read_grad_scaling(kOp, grad_scale, found_inf);
  if (scaling.skip) return;
  // -- every check passed: from here on we write --
  std::vector<int64_t> offsets(n + 1, 0), general;
  std::vector<void*> param(n), grad(n), v(n), b(n), mu(n, nullptr);
  std::vector<AmosCoef<double>> coef;
  coef.reserve(n);
  const AmosHyper hyper{lr,     beta,   momentum.value_or(0.0), clip_value.value_or(0.0), extra_l2,
                        d_coef, c_coef, epsilon,                scaling.unscale};
  for (size_t i = 0; i < n; ++i) {
    const bool is_general = layouts[i].row_len == 0 && params[i].numel() > 0;
    if (is_general) general.push_back(static_cast<int64_t>(i));
    offsets[i + 1] = offsets[i] + (is_general ? 0 : params[i].numel());
    param[i] = params[i].data_ptr();
    grad[i] = grads[i].data_ptr();
    v[i] = vs[i].data_ptr();
    b[i] = bs[i].data_ptr();
    if (momentum) mu[i] = mus[i].data_ptr();
    float* step = steps[i].data_ptr<float>();
    *step += 1.0f;
    coef.push_back(amos_coefficients(hyper, etas[i], static_cast<double>(*step)));
  }
  AmosLaunch launch{{params[0].scalar_type(), static_cast<int64_t>(n), offsets.data()},
                    param.data(),
                    const_cast<const void* const*>(grad.data()),
                    v.data(),
                    b.data(),
                    mu.data(),
                    coef.data(),
                    layouts.data(),
                    general.data(),
                    static_cast<int64_t>(general.size()),
                    momentum.has_value(),
                    clip_value.has_value()};
  active_kernels().amos(launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("amos_step", &amos_step_cpu); }

}  // namespace amos_fused::cpu
