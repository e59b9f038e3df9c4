// The plain-data interface between the CPU ops (cpu/*_ops.cpp) and the kernels,
// which are compiled once per instruction set (cpu/kernels_*.cpp) and chosen at
// run time (cpu/dispatch.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../amos_layout.h"  // AmosLayout
#include "../contracts.h"
#include "../step_math.h"
#include "../stochastic_round.h"

namespace amos_fused::cpu {

// Every launch may carry `telemetry`: then it also writes, per tensor t,
// telemetry[2t] = Σθ² and telemetry[2t+1] = Σ(Δθ)² of the param as stored after
// the step (bucket_loop.h: for_each_tracked_segment); and `round`: bfloat16
// params stored with stochastic rounding, round[t] for tensor t
// (csrc/stochastic_round.h).

// One bucket: tensor t owns elements [offsets[t], offsets[t+1]) of the virtual
// concatenation; its streams are at the addresses below (all of one dtype but
// for master weights).
// With master weights, the streams are float32 masters, except the grads, which
// have low_dtype like low_params (the bfloat16 / float16 params, written from the
// masters rounded to nearest even in the same pass).
struct BucketView {
  c10::ScalarType dtype;
  int64_t num_tensors;
  const int64_t* offsets;  // num_tensors + 1 prefix sums of numel
  c10::ScalarType low_dtype = c10::ScalarType::Undefined;
  void* const* low_params = nullptr;  // per tensor, or null without master weights
};

struct AdamLaunch {
  BucketView bucket;
  void* const* param;
  const void* const* grad;
  void* const* exp_avg;
  void* const* exp_avg_sq;
  void* const* max_exp_avg_sq;  // only read when amsgrad
  const AdamCoef<double>* coef;  // per tensor
  bool amsgrad;
  bool l2;
  double* telemetry;  // [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;  // per tensor, or null
};

struct RAdamLaunch {
  BucketView bucket;
  void* const* param;
  const void* const* grad;
  void* const* exp_avg;
  void* const* exp_avg_sq;
  const RAdamCoef<double>* coef;  // per tensor
  bool l2;
  double* telemetry;  // [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;  // per tensor, or null
};

// An elementwise algorithm A (csrc/contracts.h): streams param, grad, then its
// states; its coefficients, one CoefOf<double> per tensor.
struct ElementwiseLaunch {
  BucketView bucket;
  void* const* param;
  const void* const* grad;
  void* const* states[kMaxStateLists];
  const void* coef;
  double* telemetry;  // [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;  // per tensor, or null
};

using ElementwiseKernel = void (*)(const ElementwiseLaunch&);

struct AmosLaunch {
  BucketView bucket;  // general-layout tensors count 0 elements here
  void* const* param;
  const void* const* grad;
  void* const* v;
  void* const* b;
  void* const* mu;  // only read with momentum
  const AmosCoef<double>* coef;  // per tensor
  const AmosLayout* layout;      // per tensor
  const int64_t* general;        // indices of the general-layout tensors
  int64_t num_general;
  bool momentum;
  bool clip;
  double* telemetry;  // [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;  // per tensor, or null
};

// Scale-aware Adam and LAMB: phase 1 updates m, v and reduces Σu² (and
// Σθ² for LAMB) per tensor; phase 2 recomputes u and writes θ ← θ − (k·u + ρ·θ).
struct NormScaledLaunch {
  BucketView bucket;
  void* const* param;
  const void* const* grad;
  void* const* exp_avg;
  void* const* exp_avg_sq;
  const MomentCoef<double>* coef;  // per tensor
  bool lamb;                       // u includes λθ; Σθ² is reduced too
  double* telemetry;               // phase 2: [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;    // phase 2: per tensor, or null
};

// The optimizers with block-scaled FP8 states (csrc/fp8_states.h): Adam(W) and
// RAdam (exp_avg, then exp_avg_sq stored as sqrt), Lion (exp_avg) and Amos with
// momentum (mu; its slots v, b in full precision: Fp8AmosSlots).
enum class Fp8Algorithm { kAdam, kRAdam, kLion, kAmos };

// Amos's full-precision part of an FP8 step: per tensor, its slots (of the
// params' dtype) and slot layout.
struct Fp8AmosSlots {
  void* const* v;
  void* const* b;
  const AmosLayout* layout;
  bool clip;
};

struct Fp8Launch {
  BucketView bucket;
  void* const* param;
  const void* const* grad;
  uint8_t* const* codes[2];  // per state: per tensor, the param's layout
  float* const* absmax[2];   // per state: per tensor, one per block of kFp8Block
  Fp8Algorithm algorithm;
  const void* coef;          // per tensor: AdamCoef<double>, RAdamCoef<double>, LionCoef<double> or AmosCoef<double>
  bool l2;                   // Adam, RAdam: L2 (coupled) decay
  double* telemetry;         // [n][Σθ², Σ(Δθ)²] or null
  const StochasticRound* round;  // per tensor, or null
  const Fp8AmosSlots* amos = nullptr;  // Amos only
};

struct KernelTable {
  const char* name;
  void (*adam)(const AdamLaunch&);
  void (*radam)(const RAdamLaunch&);
  void (*amos)(const AmosLaunch&);
  // Fills u_sq[t] = Σu² and (LAMB) theta_sq[t] = Σθ² for every tensor t.
  void (*norm_scaled_phase1)(const NormScaledLaunch&, double* u_sq, double* theta_sq);
  // k[t], rho[t] per tensor.
  void (*norm_scaled_phase2)(const NormScaledLaunch&, const double* k, const double* rho);
  // The elementwise algorithms, in the order of ElementwiseAlgorithms.
  ElementwiseKernel elementwise[Count<ElementwiseAlgorithms>::value];
  void (*fp8)(const Fp8Launch&);
};

// One table per instruction set, and the one in use.
const KernelTable& kernels_default();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512_bf16();
const KernelTable& active_kernels();
std::string cpu_capability();
void set_cpu_capability(const std::string& name);

}  // namespace amos_fused::cpu
