// The CUDA step op of the optimizers with block-scaled FP8 states
// (csrc/fp8_states.h): the device checks, the FP8 prologue (csrc/fp8_prologue.h),
// then ONE launch of fp8_step.cuh over every FP8 block of the bucket (plus the
// telemetry combine, telemetry.cuh), then the step counters, as the CPU op does.
// The bucket's table (device_table.h) holds per tensor its addresses, numel,
// first block and coefficients, and one tensor index per kFp8GroupBlocks blocks.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include "../fp8_prologue.h"
#include "fp8_step.cuh"
#include "step_launch.h"

namespace amos_fused::cuda {
namespace {

// Host side: the table image of a checked FP8 step.  Construct (declares the
// sections), fill(), then view(device base).
template <typename Coef, int S>
class Fp8Plan {
 public:
  static constexpr int kArrays = Fp8Table<Coef, S>::kArrays;

  Fp8Plan(const char* op, const std::array<at::TensorList, kArrays>& arrays, const CoefTable<Coef>& coefs,
          const StochasticRound* round)
      : tensors_(arrays, coefs, round), n_(static_cast<int64_t>(arrays[0].size())) {
    check_tensor_count(op, arrays[0].size());
    first_block.assign(n_ + 1, 0);
    for (int64_t t = 0; t < n_; ++t) first_block[t + 1] = first_block[t] + ceil_div(arrays[0][t].numel(), kFp8Block);
    num_blocks = first_block[n_];
    check_grid(op, num_blocks);
    groups_ = ceil_div(num_blocks, kFp8GroupBlocks);
    tensors_.declare(image);
    first_block_section_ = image.add<int64_t>(n_ + 1);
    group_tensor_section_ = image.add<int32_t>(groups_ + 1);
  }

  void fill() {
    image.allocate();
    tensors_.fill(image);
    std::copy(first_block.begin(), first_block.end(), image.data<int64_t>(first_block_section_));
    int32_t* group_tensor = image.data<int32_t>(group_tensor_section_);
    for (int64_t t = 0; t < n_; ++t) {  // group g starts at block g·kFp8GroupBlocks
      for (int64_t g = ceil_div(first_block[t], kFp8GroupBlocks); g * kFp8GroupBlocks < first_block[t + 1]; ++g)
        group_tensor[g] = static_cast<int32_t>(t);
    }
    group_tensor[groups_] = static_cast<int32_t>(n_ - 1);
  }

  Fp8Table<Coef, S> view(const uint8_t* base) const {
    Fp8Table<Coef, S> v;
    tensors_.view_into(base, image, v);
    v.first_block = device_section<int64_t>(base, image, first_block_section_);
    v.group_tensor = device_section<int32_t>(base, image, group_tensor_section_);
    return v;
  }

  bool rounds() const { return tensors_.rounds(); }

  TableImage image;
  std::vector<int64_t> first_block;
  int64_t num_blocks = 0;

 private:
  TensorSections<Coef, kArrays> tensors_;
  int64_t n_, groups_ = 0;
  int first_block_section_, group_tensor_section_;
};

// Uploads the table (what changed) and launches the kernel over every block, then
// (telemetry) the per-tensor combine of the blocks' pairs, on the current stream.
template <typename scalar_t, typename Coef, typename Update>
void launch_fp8(const char* op, const TableKey& key, Fp8Plan<Coef, Update::kStates>& plan, const Update& update,
                const at::Device& device, double* telemetry) {
  const int64_t n = static_cast<int64_t>(plan.first_block.size()) - 1;
  if (plan.num_blocks == 0) {
    if (telemetry != nullptr) zero_telemetry(telemetry, n, device);
    return;
  }
  plan.fill();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor partials;
  if (telemetry != nullptr) partials = telemetry_partials(plan.num_blocks, device);
  with_device_table(key, plan.image, [&](const uint8_t* base) {
    const Fp8Table<Coef, Update::kStates> table = plan.view(base);
    const unsigned blocks = static_cast<unsigned>(plan.num_blocks);
    with_rounding<scalar_t>(op, plan.rounds(), [&](auto round_flag) {
      constexpr bool kRound = decltype(round_flag)::value;
      if (telemetry != nullptr) {
        double* const pairs = partials.data_ptr<double>();
        fp8_step_kernel<scalar_t, true, kRound><<<blocks, kFp8Threads, 0, stream>>>(table, update, pairs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        combine_telemetry(pairs, table.first_block, table.first_block + 1, n, telemetry, stream);
      } else {
        fp8_step_kernel<scalar_t, false, kRound><<<blocks, kFp8Threads, 0, stream>>>(table, update, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// One launch of a checked step: the arrays, the coefficients in float32 (runs of
// equal rows folded) and the algorithm's update.
template <typename scalar_t, typename A>
void launch_fp8_step(const Fp8StepCall<A>& ready) {
  const StepCall<A>& call = ready.call;
  constexpr int S = Fp8States<A>::kCount;
  std::array<at::TensorList, 2 + 2 * S> arrays;
  arrays[0] = call.params;
  arrays[1] = call.grads;
  for (int k = 0; k < S; ++k) {
    arrays[2 + k] = ready.codes[k];
    arrays[2 + S + k] = ready.absmax[k];
  }
  TableKey key = table_key(call.op, call.params);
  key.op += " fp8";  // not the table of a full-precision step of the same params
  const auto coefs = opmath_coefficients<float, A::template CoefOf>(call);
  Fp8Plan<typename A::template CoefOf<float>, S> plan(call.op, arrays, coefs, call.round_or_null());
  const at::Device device = call.params[0].device();
  if constexpr (std::is_same_v<A, AdamAlgorithm>) {
    const bool l2 = call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0;
    with_flag(l2, [&](auto l2_flag) {
      launch_fp8<scalar_t>(call.op, key, plan, Fp8AdamUpdate<decltype(l2_flag)::value>{}, device, call.telemetry);
    });
  } else if constexpr (std::is_same_v<A, RAdamAlgorithm>) {
    const bool l2 = call.hyper.decoupled == 0 && call.hyper.weight_decay != 0.0;
    with_flag(l2, [&](auto l2_flag) {
      launch_fp8<scalar_t>(call.op, key, plan, Fp8RAdamUpdate<decltype(l2_flag)::value>{}, device, call.telemetry);
    });
  } else {
    launch_fp8<scalar_t>(call.op, key, plan, Fp8LionUpdate{}, device, call.telemetry);
  }
}

template <typename A>
void run_fp8_step(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                  at::TensorList steps, at::ArrayRef<double> hyper,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys) {
  // The device checks first, as the step op's (step_prologue.h: before found_inf is read on the host).
  if (!params.empty()) cuda_checks(contract_of<A>().op, params)();
  auto ready = begin_fp8_step<A>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf, telemetry,
                                 round_keys);
  if (!ready) {  // skipped by found_inf: nothing moved
    if (telemetry) telemetry->select(1, 1).zero_();
    return;
  }
  // -- every check passed: from here on we write --
  if (!params.empty()) {
    const c10::cuda::CUDAGuard guard(params[0].device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "amos_fused_fp8_cuda", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        TORCH_CHECK(false, "amos_fused: FP8 states are not kept for float64 params");
      } else {
        launch_fp8_step<scalar_t>(*ready);
      }
    });
  }
  commit_steps(steps);
}

void step_fp8(c10::string_view algorithm, at::TensorList params, at::TensorList grads, at::TensorList codes,
              at::TensorList absmax, at::TensorList steps, at::ArrayRef<double> hyper,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& telemetry, at::OptionalIntArrayRef round_keys,
              const std::optional<at::TensorList>& low_params, const std::optional<at::TensorList>& states,
              const std::optional<at::ArrayRef<double>>& per_tensor) {
  TORCH_CHECK_VALUE(!low_params, "amos_fused: step_fp8 on CUDA does not take low_params (master weights are "
                                 "copied into their params after the step)");
  TORCH_CHECK_VALUE(algorithm != "amos", "amos_fused: step_fp8 on CUDA has no Amos kernel (Amos's FP8 momentum "
                                         "is stepped by the 'cpu' and 'triton' backends)");
  TORCH_CHECK_VALUE((!states || states->empty()) && (!per_tensor || per_tensor->empty()),
                    "amos_fused: step_fp8 on CUDA takes no full-precision states or per-tensor values");
  with_algorithm_in(CudaFp8Algorithms{}, algorithm, [&](auto traits) {
    run_fp8_step<decltype(traits)>(params, grads, codes, absmax, steps, hyper, grad_scale, found_inf, telemetry,
                                   round_keys);
  });
}

}  // namespace
}  // namespace amos_fused::cuda

TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) { m.impl("step_fp8", &amos_fused::cuda::step_fp8); }
