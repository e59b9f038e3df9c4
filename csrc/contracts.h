// The algorithms the step op runs, each described once: its hyper-parameters and
// coefficients (csrc/step_coefficients.h), its state lists and its per-tensor
// value.  Every backend's entry point and the Python layer read these (the
// `contract` op), so a new flag or state is one edit here, not one per backend.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "step_coefficients.h"

namespace amos_fused {

enum class Algorithm { kAdam, kRAdam, kLion, kAmos, kScaledAdam, kLamb };

// One state list of a step, in the order the op receives them (key-major).
struct StateSpec {
  const char* key;         // the key in optimizer.state[p]
  const char* list;        // its name in error messages
  bool slot;               // an Amos slot (not shaped like its param)
  const char* enabled_by;  // the hyper flag that enables it, or nullptr (always there)
};

struct Contract {
  Algorithm id;
  const char* name;        // the op's `algorithm` argument
  const char* op;          // the name errors use
  std::vector<StateSpec> states;
  const char* per_tensor;  // the per-tensor value's name, or nullptr
  std::vector<std::string> hyper;
  std::vector<std::string> columns;
};

// Per algorithm: its hyper-parameters, coefficient row and the ONE function that
// computes it.
#define AF_ALGORITHM(Traits, ID, HYPER, COEF, FN)                                       \
  struct Traits {                                                                      \
    static constexpr Algorithm kId = Algorithm::ID;                                    \
    using Hyper = HYPER;                                                               \
    using Coef = COEF;                                                                 \
    static Coef coefficients(const Hyper& h, double per_tensor, double step, double u) { \
      return FN(h, per_tensor, step, u);                                               \
    }                                                                                  \
  };

AF_ALGORITHM(AdamAlgorithm, kAdam, AdamHyper, AdamCoef<double>, adam_coefficients)
AF_ALGORITHM(RAdamAlgorithm, kRAdam, RAdamHyper, RAdamCoef<double>, radam_coefficients)
AF_ALGORITHM(LionAlgorithm, kLion, LionHyper, LionCoef<double>, lion_coefficients)
AF_ALGORITHM(AmosAlgorithm, kAmos, AmosHyper, AmosCoef<double>, amos_coefficients)
AF_ALGORITHM(ScaledAdamAlgorithm, kScaledAdam, ScaledAdamHyper, NormScaledCoef, scaled_adam_coefficients)
AF_ALGORITHM(LambAlgorithm, kLamb, LambHyper, NormScaledCoef, lamb_coefficients)

// The contract named `name` (ValueError listing the known ones otherwise).
const Contract& find_contract(c10::string_view name);

// The ops that hand the contracts to Python (csrc/contracts.cpp).
using ContractNames = std::tuple<std::vector<std::string>, std::vector<std::string>,
                                 std::vector<std::string>, std::vector<std::string>,
                                 std::vector<std::string>>;
ContractNames contract_op(c10::string_view algorithm);
std::tuple<bool, at::Tensor> begin_step_op(c10::string_view algorithm, at::TensorList params,
                                           at::TensorList grads, at::TensorList states,
                                           at::TensorList steps, at::ArrayRef<double> hyper,
                                           at::ArrayRef<double> per_tensor,
                                           const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& found_inf);

// f(Traits{}) for the contract's algorithm.
template <typename F>
decltype(auto) with_algorithm(const Contract& c, const F& f) {
  switch (c.id) {
    case Algorithm::kAdam: return f(AdamAlgorithm{});
    case Algorithm::kRAdam: return f(RAdamAlgorithm{});
    case Algorithm::kLion: return f(LionAlgorithm{});
    case Algorithm::kAmos: return f(AmosAlgorithm{});
    case Algorithm::kScaledAdam: return f(ScaledAdamAlgorithm{});
    case Algorithm::kLamb: return f(LambAlgorithm{});
  }
  TORCH_CHECK(false, "unknown algorithm");
}

}  // namespace amos_fused
