// CUDA scale-aware Adam and LAMB: the update of a tensor is scaled by
// its norms, so a bucket takes three launches, all on the current stream and with
// no host synchronization:
//   1. moments: m, v ← moments; each block reduces Σu² (and Σθ² for LAMB) over its
//      chunk and writes them to its own slot of `partials`;
//   2. scales:  one warp per tensor adds its blocks' partials in a fixed order (in
//      double: per-tensor work, like the host's coefficients) and turns the norms
//      into k and ρ;
//   3. apply:   θ ← θ − (k·u + ρ·θ), u recomputed from the stored m, v; with
//      telemetry (a compile-time variant) also each block's Σθ², Σ(Δθ)², added
//      per tensor by a fourth, small launch (telemetry.cuh); with stochastic
//      rounding (another, bfloat16 only) θ is stored rounded (param_rounding.cuh).
// bfloat16/float16: m, v rounded to storage between the phases would give phase 3
// another u than the one normed (in fp16 v underflows to 0 and u explodes), so
// phase 1 only reads and phase 3 updates the moments again from the old m, v and
// g in float32 and writes them (like the CPU kernels).
// Deterministic: no atomics.  The per-element math is step_math.h's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "block_reduce.cuh"
#include "multi_tensor_apply.cuh"
#include "step_launch.h"
#include "telemetry.cuh"

namespace amos_fused::cuda {
namespace {

constexpr int kWarpsPerBlock = kElementwiseThreads / kWarpSize;

// Coefficients of a tensor at one step.
template <typename Op>
struct NormCoef {
  MomentCoef<Op> moments;
  double scale;  // scale-aware Adam: α0·s(t), so k = scale·‖ε0‖/‖u‖;  LAMB: η
  double rho;    // scale-aware Adam: ρ_t = α0²/(2q)·s(t);  LAMB: 0

  // A row of the coefficient table (CoefColumns<NormScaledCoef>: the moments'
  // columns, scale, rho, init_norm), for capturable steps (device_coefficients.cuh).
  __host__ __device__ static NormCoef from_columns(const double* row) {
    constexpr int kMoments = MomentCoef<Op>::kColumns;
    return {MomentCoef<Op>::from_columns(row), row[kMoments], row[kMoments + 1]};
  }
};

// Arrays of the table: p, g, m, v.
template <typename Op>
using NormTable = ElementwiseTable<NormCoef<Op>, 4>;

// Whether m, v are written by the apply phase (storage narrower than the math).
template <typename scalar_t>
constexpr bool kMomentsInApply = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

// LAMB's phase-1 walk over 2-byte params in 8-byte packs (4 elements a load): its
// per-element math (three IEEE divisions and a square root, each with a slow-path
// call) over a 16-byte pack of 8 kept one value in local memory in the loop
// (ptxas -v: an 8-byte stack frame; tools/ptxas_resources.py).
template <typename scalar_t>
constexpr int kLambMomentPack = sizeof(scalar_t) == 2 ? 8 : 16;

// Phase 1: moments, and this block's Σu², Σθ² into partials[2·block], [2·block + 1].
template <typename scalar_t, bool LAMB>
__global__ void __launch_bounds__(kElementwiseThreads)
    norm_moments_kernel(NormTable<at::opmath_type<scalar_t>> table, at::opmath_type<scalar_t>* partials) {
  using Op = at::opmath_type<scalar_t>;
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.tasks[blockIdx.x];
  scalar_t* ptr[4];
  int64_t begin, end;
  chunk_of(table, task, ptr, begin, end);
  const MomentCoef<Op> c = table.coefs[table.coef_index[task.tensor]].moments;
  constexpr unsigned kMomentMask = kMomentsInApply<scalar_t> ? 0u : 0b11u;  // m, v bits
  Op u_sq(0), theta_sq(0);
  if (LAMB) {  // (2-byte params in 8-byte packs: kLambMomentPack)
    map_elements<scalar_t, 4, (kMomentMask << 2), kLambMomentPack<scalar_t>>(ptr, begin, end, threadIdx.x,
                                                                            kElementwiseThreads,
                                       [&](Op (&x)[4], int64_t) {  // θ, g, m, v
                                         update_moments(x[1], x[2], x[3], c);
                                         const Op u = adam_direction<true>(x[0], x[2], x[3], c);
                                         u_sq += u * u;
                                         theta_sq += x[0] * x[0];
                                       });
  } else {  // θ is not read
    scalar_t* const gmv[3] = {ptr[1], ptr[2], ptr[3]};
    map_elements<scalar_t, 3, (kMomentMask << 1)>(gmv, begin, end, threadIdx.x, kElementwiseThreads,
                                      [&](Op (&x)[3], int64_t) {  // g, m, v
                                        update_moments(x[0], x[1], x[2], c);
                                        const Op u = adam_direction<false>(Op(0), x[1], x[2], c);
                                        u_sq += u * u;
                                      });
  }
  __shared__ Op buffer[2][kWarpsPerBlock];
  u_sq = block_sum<kElementwiseThreads>(u_sq, buffer[0]);
  if (LAMB) theta_sq = block_sum<kElementwiseThreads>(theta_sq, buffer[1]);
  if (threadIdx.x == 0) {
    partials[2 * static_cast<int64_t>(blockIdx.x)] = u_sq;
    partials[2 * static_cast<int64_t>(blockIdx.x) + 1] = theta_sq;
  }
}

// Phase 2: one warp per tensor; k_rho[2t] = k, k_rho[2t + 1] = ρ:
//   scale-aware Adam: k = α0·‖ε0‖·s(t)/‖u‖ (0 when ‖u‖ = 0), ρ = α0²/(2q)·s(t)
//   LAMB:             k = η·‖θ‖/‖u‖ (η when a norm is 0),     ρ = 0
template <typename Op>
__global__ void __launch_bounds__(kElementwiseThreads)
    norm_scales_kernel(NormTable<Op> table, const double* init_norm, const Op* partials,
                       int64_t num_tensors, bool lamb, Op* k_rho) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (t >= num_tensors || step_skipped(table.skip)) return;  // whole warps
  double u_sq, theta_sq;
  warp_sum_pairs(partials, table.first_task[t], table.first_task[t + 1], lane, u_sq, theta_sq);
  if (lane != 0) return;
  const NormCoef<Op>& c = table.coefs[table.coef_index[t]];
  const double u_norm = ::sqrt(u_sq), theta_norm = ::sqrt(theta_sq);
  double k, rho;
  if (lamb) {
    // (x <= DBL_MAX: finite, for the norms, which are >= 0 or NaN)
    k = c.scale * (u_norm > 0.0 && theta_norm > 0.0 && u_norm <= DBL_MAX && theta_norm <= DBL_MAX
                   ? theta_norm / u_norm : 1.0);
    rho = 0.0;
  } else {
    k = u_norm > 0.0 ? c.scale * init_norm[t] / u_norm : 0.0;
    rho = c.rho;
  }
  k_rho[2 * t] = static_cast<Op>(k);
  k_rho[2 * t + 1] = static_cast<Op>(rho);
}

// Phase 3: θ ← θ − (k·u + ρ·θ) (narrow storage: the moments are updated and stored here).
// TELEMETRY: also this block's Σθ², Σ(Δθ)² into telemetry_partials[2·block], [2·block + 1].
// ROUND: θ stored with stochastic rounding (table.round).  With both, compiled
// for 3 blocks per SM (≤ 85 registers) like the elementwise kernel: left to
// itself ptxas squeezes the bfloat16 variants into 64 registers, with spills.
template <typename scalar_t, bool LAMB, bool TELEMETRY, bool ROUND>
__global__ void __launch_bounds__(kElementwiseThreads, (kElementwiseMinBlocks<TELEMETRY, ROUND>))
    norm_apply_kernel(NormTable<at::opmath_type<scalar_t>> table, const at::opmath_type<scalar_t>* k_rho,
                      double* telemetry_partials) {
  using Op = at::opmath_type<scalar_t>;
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.tasks[blockIdx.x];
  scalar_t* ptr[4];
  int64_t begin, end;
  chunk_of(table, task, ptr, begin, end);
  const MomentCoef<Op> c = table.coefs[table.coef_index[task.tensor]].moments;
  const Op k = k_rho[2 * static_cast<int64_t>(task.tensor)];
  const Op rho = k_rho[2 * static_cast<int64_t>(task.tensor) + 1];
  const ParamRounding<ROUND> rounding(table.round, task.tensor);
  [[maybe_unused]] TelemetrySums<scalar_t> sums;
  if constexpr (kMomentsInApply<scalar_t>) {
    map_elements<scalar_t, 4, 0b1101u>(ptr, begin, end, threadIdx.x, kElementwiseThreads,
                                       [&](Op (&x)[4], int64_t e) {  // θ, g, m, v
                                         [[maybe_unused]] const Op before = x[0];
                                         update_moments(x[1], x[2], x[3], c);
                                         const Op u = adam_direction<LAMB>(x[0], x[2], x[3], c);
                                         scaled_update(x[0], u, k, rho);
                                         x[0] = rounding(x[0], e);
                                         if constexpr (TELEMETRY) sums.add(x[0], before);
                                       });
  } else {
    scalar_t* const pmv[3] = {ptr[0], ptr[2], ptr[3]};
    map_elements<scalar_t, 3, 0b1u>(pmv, begin, end, threadIdx.x, kElementwiseThreads,
                                    [&](Op (&x)[3], int64_t e) {  // θ, m, v
                                      [[maybe_unused]] const Op before = x[0];
                                      const Op u = adam_direction<LAMB>(x[0], x[1], x[2], c);
                                      scaled_update(x[0], u, k, rho);
                                      x[0] = rounding(x[0], e);
                                      if constexpr (TELEMETRY) sums.add(x[0], before);
                                    });
  }
  if constexpr (TELEMETRY) {
    store_block_telemetry<kElementwiseThreads>(sums, telemetry_partials + 2 * static_cast<int64_t>(blockIdx.x));
  }
}

// `telemetry` (null: off): the step's [n][Σθ², Σ(Δθ)²] output, from phase 3's block
// sums (telemetry.cuh).
template <typename scalar_t, bool LAMB>
void launch_norm_scaled(const TableKey& key, ElementwisePlan<NormCoef<at::opmath_type<scalar_t>>, 4>& plan,
                        int init_norm_section, const at::Device& device, double* telemetry) {
  using Op = at::opmath_type<scalar_t>;
  const int64_t n = static_cast<int64_t>(plan.first_task.size()) - 1;
  // partials: 2 per block; k_rho: 2 per tensor.
  const at::Tensor scratch =
      at::empty({2 * (plan.num_tasks + n)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<Op>::value).device(device));
  Op* partials = scratch.data_ptr<Op>();
  Op* k_rho = partials + 2 * plan.num_tasks;
  at::Tensor telemetry_scratch;
  if (telemetry != nullptr) telemetry_scratch = telemetry_partials(plan.num_tasks, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_device_table(key, plan.image, [&](const uint8_t* base) {
    plan.fill_device_coefficients(base, stream);
    const NormTable<Op> table = plan.view(base);
    const unsigned blocks = static_cast<unsigned>(plan.num_tasks);
    norm_moments_kernel<scalar_t, LAMB><<<blocks, kElementwiseThreads, 0, stream>>>(table, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norm_scales_kernel<Op><<<static_cast<unsigned>(ceil_div(n, kWarpsPerBlock)), kElementwiseThreads, 0, stream>>>(
        table, device_section<double>(base, plan.image, init_norm_section), partials, n, LAMB, k_rho);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_rounding<scalar_t>("amos_fused norm-scaled step", plan.rounds(), [&](auto round_flag) {
      constexpr bool kRound = decltype(round_flag)::value;
      if (telemetry != nullptr) {
        double* const block_sums = telemetry_scratch.data_ptr<double>();
        norm_apply_kernel<scalar_t, LAMB, true, kRound>
            <<<blocks, kElementwiseThreads, 0, stream>>>(table, k_rho, block_sums);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        combine_telemetry(block_sums, table.first_task, table.first_task + 1, n, telemetry, stream);
      } else {
        norm_apply_kernel<scalar_t, LAMB, false, kRound>
            <<<blocks, kElementwiseThreads, 0, stream>>>(table, k_rho, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// Both rules: the per-tensor ‖ε0‖ (scale-aware Adam) go to a table section of
// their own (they never change); the coefficients depend on the step only.
template <typename A>
void norm_scaled_step(const StepCall<A>& call, bool lamb) {
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  const at::TensorList params = call.params;
  const TableKey key = table_key(call.op, params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_norm_scaled_cuda", [&] {
    using Op = at::opmath_type<scalar_t>;
    const CoefTable<NormCoef<Op>> coefs =
        call.device_columns != nullptr
            ? device_coefficient_table<NormCoef<Op>>(params.size(), call.device_columns, call.device_width, call.skip)
            : fold_coefficients<NormCoef<Op>>(
                  params.size(), [&](size_t t) { return call.steps[t]; },
                  [&](size_t t) {
                    const NormScaledCoef& c = call.coef[t];
                    return NormCoef<Op>{to_opmath<Op>(c.moments), c.scale, c.rho};
                  });
    ElementwisePlan<NormCoef<Op>, 4> plan(call.op, {params, call.grads, call.states[0], call.states[1]},
                                          coefs, call.round_or_null());
    if (plan.num_tasks == 0) {
      if (call.telemetry != nullptr) zero_telemetry(call.telemetry, plan.num_tensors(), params[0].device());
      return;
    }
    const int init_norm_section = plan.image.add<double>(static_cast<int64_t>(params.size()));
    plan.fill();
    double* norms = plan.image.data<double>(init_norm_section);
    for (size_t t = 0; t < params.size(); ++t) norms[t] = call.per_tensor.empty() ? 0.0 : call.per_tensor[t];
    if (lamb) {
      launch_norm_scaled<scalar_t, true>(key, plan, init_norm_section, params[0].device(), call.telemetry);
    } else {
      launch_norm_scaled<scalar_t, false>(key, plan, init_norm_section, params[0].device(), call.telemetry);
    }
  });
}

}  // namespace

// Scale-aware Adam: θ ← θ − (α_t·u + ρ_t·θ), α_t = α0·‖ε0‖/‖u‖·s(t), ρ_t = α0²/(2q)·s(t).
void launch(const StepCall<ScaledAdamAlgorithm>& call) { norm_scaled_step(call, false); }

// LAMB: θ ← θ − η·(‖θ‖/‖u‖)·u, u = m̂/(sqrt(v̂)+ε) + λθ, ratio 1 when a norm is 0, NaN or Inf.
void launch(const StepCall<LambAlgorithm>& call) { norm_scaled_step(call, true); }

}  // namespace amos_fused::cuda
