// The algorithms the step op runs, each described once, here: its name, its
// state lists, its per-tensor value, its hyper-parameters and coefficients
// (csrc/step_coefficients.h) and, for the elementwise ones, which streams its
// per-element update reads and writes.  Every backend's entry point and the
// Python layer (the `contract` op) read these, so a new algorithm, flag or state
// is one edit here, not one per backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "step_coefficients.h"

namespace amos_fused {

// The most state lists an algorithm has.
constexpr size_t kMaxStateLists = 3;

// One state list of a step, in the order the op receives them (key-major).
struct StateSpec {
  const char* key;         // the key in optimizer.state[p]
  const char* list;        // its name in error messages
  bool slot;               // an Amos slot (not shaped like its param)
  const char* enabled_by;  // the hyper flag that enables it, or nullptr (always there)
};

inline std::vector<StateSpec> adam_moments() {
  return {{"exp_avg", "exp_avgs", false, nullptr}, {"exp_avg_sq", "exp_avg_sqs", false, nullptr}};
}

// Per algorithm (traits): kName (the op's `algorithm` argument), kOp (the name
// errors use), kPerTensor (the per-tensor value's list name, or nullptr),
// states(), Hyper, CoefOf<T> and the ONE function computing its coefficients.
// Elementwise algorithms (ElementwiseAlgorithms below) also give kStreams (param,
// grad, then their states), kWriteMask (the streams written back) and update(x, c),
// which every backend's generic elementwise walk calls.
// The members every traits struct starts with; COEF<T> is the coefficient row
// (NormScaledCoef, not a template, for the two-phase rules).
#define AF_ALGORITHM_BASICS(NAME, OP, PER_TENSOR, HYPER, FN)                               \
  static constexpr const char* kName = NAME;                                              \
  static constexpr const char* kOp = OP;                                                  \
  static constexpr const char* kPerTensor = PER_TENSOR;                                   \
  using Hyper = HYPER;                                                                     \
  static auto coefficients(const Hyper& h, double per_tensor, double step, double unscale) { \
    return FN(h, per_tensor, step, unscale);                                               \
  }

struct AdamAlgorithm {
  AF_ALGORITHM_BASICS("adam", "amos_fused.adam_step", nullptr, AdamHyper, adam_coefficients)
  template <typename T>
  using CoefOf = AdamCoef<T>;
  static std::vector<StateSpec> states() {
    std::vector<StateSpec> out = adam_moments();
    out.push_back({"max_exp_avg_sq", "max_exp_avg_sqs", false, "amsgrad"});
    return out;
  }
};

struct RAdamAlgorithm {
  AF_ALGORITHM_BASICS("radam", "amos_fused.radam_step", nullptr, RAdamHyper, radam_coefficients)
  template <typename T>
  using CoefOf = RAdamCoef<T>;
  static std::vector<StateSpec> states() { return adam_moments(); }
};

struct LionAlgorithm {
  AF_ALGORITHM_BASICS("lion", "amos_fused.lion_step", nullptr, LionHyper, lion_coefficients)
  template <typename T>
  using CoefOf = LionCoef<T>;
  static std::vector<StateSpec> states() { return {{"exp_avg", "exp_avgs", false, nullptr}}; }
  // streams: param, grad, exp_avg; written: param, exp_avg
  static constexpr int kStreams = 3;
  static constexpr unsigned kWriteMask = 0b101u;
  template <typename X, typename C>
  static AF_HD void update(X& x, const C& c) {
    lion_update(x[0], x[1], x[2], c);
  }
};

struct AmosAlgorithm {
  AF_ALGORITHM_BASICS("amos", "amos_fused.amos_step", "etas", AmosHyper, amos_coefficients)
  template <typename T>
  using CoefOf = AmosCoef<T>;
  static std::vector<StateSpec> states() {
    return {{"v", "vs", true, nullptr}, {"b", "bs", true, nullptr}, {"mu", "mus", false, "use_momentum"}};
  }
};

struct ScaledAdamAlgorithm {
  AF_ALGORITHM_BASICS("scaled_adam", "amos_fused.scaled_adam_step", "init_norms", ScaledAdamHyper,
                      scaled_adam_coefficients)
  static std::vector<StateSpec> states() { return adam_moments(); }
};

struct LambAlgorithm {
  AF_ALGORITHM_BASICS("lamb", "amos_fused.lamb_step", nullptr, LambHyper, lamb_coefficients)
  static std::vector<StateSpec> states() { return adam_moments(); }
};

template <typename... A>
struct TypeList {};

// Every algorithm of the step op; the elementwise ones run through the generic
// elementwise walk of every backend (no backend code of their own).
using Algorithms = TypeList<AdamAlgorithm, RAdamAlgorithm, LionAlgorithm, AmosAlgorithm,
                            ScaledAdamAlgorithm, LambAlgorithm>;
using ElementwiseAlgorithms = TypeList<LionAlgorithm>;
// The algorithms the step_fp8 op runs with block-scaled FP8 states (csrc/fp8_states.h):
// Amos keeps its momentum in FP8, its slots (v, b) in full precision.
using Fp8Algorithms = TypeList<AdamAlgorithm, RAdamAlgorithm, LionAlgorithm, AmosAlgorithm>;
// Those with an FP8 step on CUDA (csrc/cuda/fp8.cu).
using CudaFp8Algorithms = TypeList<AdamAlgorithm, RAdamAlgorithm, LionAlgorithm>;
// The algorithms whose CPU step writes low-precision params from float32 masters
// in the same pass (the step op's low_params).
using MasterAlgorithms = TypeList<AdamAlgorithm, RAdamAlgorithm, LionAlgorithm, AmosAlgorithm, ScaledAdamAlgorithm,
                                  LambAlgorithm>;

// The coefficient row of algorithm A.
template <typename A>
using CoefRow = decltype(A::coefficients(std::declval<typename A::Hyper>(), 0.0, 0.0, 0.0));

template <typename A, typename List>
struct Contains;
template <typename A, typename... B>
struct Contains<A, TypeList<B...>> : std::bool_constant<(std::is_same_v<A, B> || ...)> {};

template <typename A>
constexpr bool kIsElementwise = Contains<A, ElementwiseAlgorithms>::value;

// Index of A in a type list (the CPU kernel tables are indexed by it).
template <typename A, typename List>
struct IndexOf;
template <typename A, typename... B>
struct IndexOf<A, TypeList<A, B...>> : std::integral_constant<size_t, 0> {};
template <typename A, typename C, typename... B>
struct IndexOf<A, TypeList<C, B...>> : std::integral_constant<size_t, 1 + IndexOf<A, TypeList<B...>>::value> {};

template <typename List>
struct Count;
template <typename... A>
struct Count<TypeList<A...>> : std::integral_constant<size_t, sizeof...(A)> {};

// The description of algorithm A handed to Python and used by the shared prologue.
struct Contract {
  const char* name;
  const char* op;
  std::vector<StateSpec> states;
  const char* per_tensor;
  std::vector<std::string> hyper;
  std::vector<std::string> columns;
};

template <typename A>
const Contract& contract_of() {
  static const Contract c{A::kName, A::kOp, A::states(), A::kPerTensor, A::Hyper::names(),
                          CoefColumns<CoefRow<A>>::names()};
  return c;
}

// Calls f(A{}) for the algorithm A named `name`; ValueError listing the known
// ones otherwise.
template <typename F, typename... A>
void with_algorithm_in(TypeList<A...>, c10::string_view name, const F& f) {
  const bool found = ((name == A::kName ? (f(A{}), true) : false) || ...);
  if (!found) {
    std::string known;
    ((known += (known.empty() ? "" : ", ") + std::string(A::kName)), ...);
    TORCH_CHECK_VALUE(false, "amos_fused: unknown algorithm '", std::string(name), "' (known: ", known, ")");
  }
}

template <typename F>
void with_algorithm(c10::string_view name, const F& f) {
  with_algorithm_in(Algorithms{}, name, f);
}

// The ops that hand the contracts to Python (csrc/contracts.cpp, registered in ops.cpp).
using ContractNames = std::tuple<std::vector<std::string>, std::vector<std::string>,
                                 std::vector<std::string>, std::vector<std::string>,
                                 std::vector<std::string>>;
ContractNames contract_op(c10::string_view algorithm);
std::vector<std::string> algorithms_op();
std::vector<std::string> fp8_algorithms_op();
std::vector<std::string> cuda_fp8_algorithms_op();
std::vector<std::string> master_algorithms_op();
// After a launch that begin_step_op prepared: every counter plus one (commit_steps),
// each checked first (is_step_counter), so a bad one is refused before any is written.
void advance_steps_op(at::TensorList steps);
std::tuple<bool, at::Tensor> begin_step_op(c10::string_view algorithm, at::TensorList params,
                                           at::TensorList grads, at::TensorList states,
                                           at::TensorList steps, at::ArrayRef<double> hyper,
                                           at::ArrayRef<double> per_tensor,
                                           const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& found_inf,
                                           const std::optional<at::Tensor>& telemetry,
                                           at::OptionalIntArrayRef round_keys);
std::tuple<bool, at::Tensor> begin_step_fp8_op(c10::string_view algorithm, at::TensorList params,
                                               at::TensorList grads, at::TensorList codes,
                                               at::TensorList absmax, at::TensorList steps,
                                               at::ArrayRef<double> hyper,
                                               const std::optional<at::Tensor>& grad_scale,
                                               const std::optional<at::Tensor>& found_inf,
                                               const std::optional<at::Tensor>& telemetry,
                                               at::OptionalIntArrayRef round_keys,
                                               const std::optional<at::TensorList>& states,
                                               const std::optional<at::ArrayRef<double>>& per_tensor);

}  // namespace amos_fused
