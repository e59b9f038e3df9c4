// The generic multi-tensor launcher: ONE launch steps a whole bucket,
// whatever its tensor count.  Nothing per tensor travels as a kernel argument: the
// bucket's metadata is a table in device memory (device_table.h), cached per bucket
// and re-uploaded only where it changed:
//   address[s][t]   element address of array s (param, grad, state …) of tensor t
//   numel[t], first_task[t]   elements, and the first block of tensor t
//   coef_index[t] → coefs     per-tensor coefficients (step_math.h), folded
//   tasks[block]    block → (tensor, chunk of `chunk` elements)
// Each block walks its chunk with element_walk.cuh and calls the algorithm's
// functor f(x, coef) on the opmath values x[0..S) of every element; with
// telemetry (a compile-time variant) it also sums θ² and (Δθ)² of array 0, with
// stochastic rounding (another, bfloat16 only: param_rounding.cuh) it stores
// array 0 rounded with round[t] (a table section only then):
//   round[t]        tensor t's RoundKey
// A capturable step's coefficients are computed on the device into the coefs
// section, and its kernels return at once when found_inf (skip) is set
// (device_coefficients.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <vector>

#include "device_coefficients.cuh"
#include "device_table.h"
#include "element_walk.cuh"
#include "op_support.h"
#include "param_rounding.cuh"
#include "telemetry.cuh"

namespace amos_fused::cuda {

constexpr int kElementwiseThreads = 256;

// Elements per block: 65536, or less (down to 4096) when that leaves fewer than
// ~1024 blocks, so a small bucket still spreads over every SM.  A power of two,
// so every chunk of a 16-byte aligned array starts 16-byte aligned.
inline int64_t elementwise_chunk(int64_t total_elements) {
  int64_t chunk = 65536;
  while (chunk > 4096 && total_elements / chunk < 1024) chunk /= 2;
  return chunk;
}

// The device view of a bucket's table, passed by value to the kernels.
template <typename Coef, int S>
struct ElementwiseTable {
  void* const* address[S];
  const int64_t* numel;
  const int64_t* first_task;  // num_tensors + 1 prefix sums of blocks per tensor
  const int32_t* coef_index;
  const Coef* coefs;
  const BlockTask* tasks;
  const RoundKey* round;  // per tensor with stochastic rounding, else null
  const float* skip;      // capturable steps: found_inf on the device, else null
  int64_t chunk;  // elements per block
};

// Host side: the per-tensor sections of every bucket table (the elementwise
// launcher's below, the FP8 step's in fp8.cu): the coefficients (runs folded) and
// each tensor's index into them, its stochastic-rounding key (only when `round`,
// StepCall::round_or_null, is given; kept until fill), the addresses of its A
// arrays and its numel (array 0's).  declare() adds them to an image, first (they
// change from step to step, so one upload covers them); fill() writes them once
// the image is allocated; view_into() sets the matching fields of a device view.
template <typename Coef, int A>
class TensorSections {
 public:
  TensorSections(const std::array<at::TensorList, A>& arrays, const CoefTable<Coef>& coefs,
                 const StochasticRound* round)
      : arrays_(arrays), coefs_(coefs), round_(round), n_(static_cast<int64_t>(arrays[0].size())) {}

  void declare(TableImage& image) {
    coefs_section_ = image.add<Coef>(n_);
    if (round_ != nullptr) round_section_ = image.add<RoundKey>(n_);
    for (int a = 0; a < A; ++a) address_section_[a] = image.add<void*>(n_);
    coef_index_section_ = image.add<int32_t>(n_);
    numel_section_ = image.add<int64_t>(n_);
  }

  void fill(TableImage& image) const {
    image.set_used(coefs_section_, static_cast<int64_t>(coefs_.unique.size()));
    if (coefs_.device_columns == nullptr)  // (a capturable step's stay zero bytes: filled on the device)
      std::copy(coefs_.unique.begin(), coefs_.unique.end(), image.data<Coef>(coefs_section_));
    std::copy(coefs_.index.begin(), coefs_.index.end(), image.data<int32_t>(coef_index_section_));
    if (round_ != nullptr) {
      RoundKey* keys = image.data<RoundKey>(round_section_);
      for (int64_t t = 0; t < n_; ++t) keys[t] = round_key(round_[t]);
    }
    for (int a = 0; a < A; ++a) {
      void** out = image.data<void*>(address_section_[a]);
      for (int64_t t = 0; t < n_; ++t) out[t] = arrays_[a][t].data_ptr();
    }
    int64_t* numel = image.data<int64_t>(numel_section_);
    for (int64_t t = 0; t < n_; ++t) numel[t] = arrays_[0][t].numel();
  }

  // View: a device table with fields address[A], numel, coef_index, coefs, round.
  template <typename View>
  void view_into(const uint8_t* base, const TableImage& image, View& v) const {
    for (int a = 0; a < A; ++a) v.address[a] = device_section<void*>(base, image, address_section_[a]);
    v.numel = device_section<int64_t>(base, image, numel_section_);
    v.coef_index = device_section<int32_t>(base, image, coef_index_section_);
    v.coefs = device_section<Coef>(base, image, coefs_section_);
    v.round = round_ != nullptr ? device_section<RoundKey>(base, image, round_section_) : nullptr;
  }

  int64_t num_tensors() const { return n_; }
  bool rounds() const { return round_ != nullptr; }
  const std::array<at::TensorList, A>& arrays() const { return arrays_; }
  const CoefTable<Coef>& coefficients() const { return coefs_; }

 private:
  std::array<at::TensorList, A> arrays_;
  const CoefTable<Coef>& coefs_;
  const StochasticRound* round_;
  int64_t n_;
  int coefs_section_, address_section_[A], coef_index_section_, numel_section_, round_section_ = -1;
};

// Host side: the table image of a bucket whose tensors each have S arrays of one
// dtype and one memory layout.  Construct (declares the sections), optionally add
// sections of your own to `image`, then fill().  `round` (StepCall::round_or_null,
// per tensor; kept until fill): array 0 stored with stochastic rounding.
template <typename Coef, int S>
class ElementwisePlan {
 public:
  ElementwisePlan(const char* op, const std::array<at::TensorList, S>& arrays,
                  const CoefTable<Coef>& coefs, const StochasticRound* round = nullptr)
      : tensors_(arrays, coefs, round), n_(static_cast<int64_t>(arrays[0].size())) {
    check_tensor_count(op, arrays[0].size());
    int64_t total = 0;
    for (int64_t t = 0; t < n_; ++t) total += arrays[0][t].numel();
    chunk = elementwise_chunk(total);
    first_task.assign(n_ + 1, 0);
    for (int64_t t = 0; t < n_; ++t) {
      const int64_t chunks = ceil_div(arrays[0][t].numel(), chunk);
      check_chunks(op, chunks);
      first_task[t + 1] = first_task[t] + chunks;
    }
    num_tasks = first_task[n_];
    check_grid(op, num_tasks);
    tensors_.declare(image);
    first_task_section_ = image.add<int64_t>(n_ + 1);
    tasks_section_ = image.add<BlockTask>(num_tasks);
  }

  void fill() {
    image.allocate();
    tensors_.fill(image);
    std::copy(first_task.begin(), first_task.end(), image.data<int64_t>(first_task_section_));
    BlockTask* tasks = image.data<BlockTask>(tasks_section_);
    for (int64_t t = 0; t < n_; ++t) {
      for (int64_t c = 0; c < first_task[t + 1] - first_task[t]; ++c)
        *tasks++ = {static_cast<int32_t>(t), static_cast<uint32_t>(c)};
    }
  }

  ElementwiseTable<Coef, S> view(const uint8_t* base) const {
    ElementwiseTable<Coef, S> v;
    tensors_.view_into(base, image, v);
    v.first_task = device_section<int64_t>(base, image, first_task_section_);
    v.tasks = device_section<BlockTask>(base, image, tasks_section_);
    v.skip = tensors_.coefficients().skip;
    v.chunk = chunk;
    return v;
  }

  // A capturable step's coefficients, computed into the table at `base` on the
  // device (device_coefficients.cuh); nothing for host-computed ones.  Call after
  // the upload, before the step's kernels.
  void fill_device_coefficients(const uint8_t* base, cudaStream_t stream) const {
    cuda::fill_device_coefficients(tensors_.coefficients(), view(base).coefs, n_, stream);
  }

  int64_t num_tensors() const { return n_; }
  bool rounds() const { return tensors_.rounds(); }
  at::Device device() const { return tensors_.arrays()[0][0].device(); }

  TableImage image;
  std::vector<int64_t> first_task;
  int64_t num_tasks = 0;
  int64_t chunk = 0;

 private:
  TensorSections<Coef, S> tensors_;
  int64_t n_;
  int first_task_section_, tasks_section_;
};

// The arrays of block `task` of tensor task.tensor, typed, and its element range.
template <typename scalar_t, typename Coef, int S>
__device__ __forceinline__ void chunk_of(const ElementwiseTable<Coef, S>& table, const BlockTask& task,
                                         scalar_t* (&ptr)[S], int64_t& begin, int64_t& end) {
#pragma unroll
  for (int s = 0; s < S; ++s) ptr[s] = static_cast<scalar_t*>(table.address[s][task.tensor]);
  begin = static_cast<int64_t>(task.chunk) * table.chunk;
  end = begin + table.chunk;
  const int64_t numel = table.numel[task.tensor];
  if (end > numel) end = numel;
}

// Blocks per SM the elementwise kernel is compiled for (0: no minimum).  With
// both telemetry and stochastic rounding 3 (≤ 85 registers): left to itself ptxas
// squeezes the Adam variants into 64 registers, with spills.
template <bool TELEMETRY, bool ROUND>
constexpr int kElementwiseMinBlocks = TELEMETRY && ROUND ? 3 : 0;

// TELEMETRY: also this block's Σθ², Σ(Δθ)² of array 0 (the params) into
// telemetry_partials[2·block], [2·block + 1] (telemetry.cuh).  ROUND: array 0
// stored with stochastic rounding (table.round), telemetry of the rounded values.
template <typename scalar_t, int S, unsigned kWriteMask, bool TELEMETRY, bool ROUND, typename Coef,
          typename Functor>
__global__ void __launch_bounds__(kElementwiseThreads, (kElementwiseMinBlocks<TELEMETRY, ROUND>))
    elementwise_kernel(ElementwiseTable<Coef, S> table, Functor f, double* telemetry_partials) {
  using Op = at::opmath_type<scalar_t>;
  static_assert(!ROUND || (kWriteMask & 1u), "stochastic rounding applies to array 0, the (written) params");
  if (step_skipped(table.skip)) return;
  const BlockTask task = table.tasks[blockIdx.x];
  scalar_t* ptr[S];
  int64_t begin, end;
  chunk_of(table, task, ptr, begin, end);
  const Coef coef = table.coefs[table.coef_index[task.tensor]];
  const ParamRounding<ROUND> rounding(table.round, task.tensor);
  if constexpr (TELEMETRY) {
    static_assert(kWriteMask & 1u, "telemetry tracks array 0, which must be the (written) params");
    TelemetrySums<scalar_t> sums;
    map_elements<scalar_t, S, kWriteMask>(ptr, begin, end, threadIdx.x, kElementwiseThreads,
                                          [&](Op (&x)[S], int64_t e) {
                                            const Op before = x[0];
                                            f(x, coef);
                                            x[0] = rounding(x[0], e);
                                            sums.add(x[0], before);
                                          });
    store_block_telemetry<kElementwiseThreads>(sums, telemetry_partials + 2 * static_cast<int64_t>(blockIdx.x));
  } else {
    map_elements<scalar_t, S, kWriteMask>(ptr, begin, end, threadIdx.x, kElementwiseThreads,
                                          [&](Op (&x)[S], int64_t e) {
                                            f(x, coef);
                                            x[0] = rounding(x[0], e);
                                          });
  }
}

// Uploads the plan's table (what changed) and steps the bucket in one launch on
// the current stream.  `telemetry` (null: off): the [n][Σθ², Σ(Δθ)²] output of
// the step (telemetry.cuh), written by a second, small launch.  Stochastic
// rounding when the plan was built with round keys.
template <typename scalar_t, int S, unsigned kWriteMask, typename Coef, typename Functor>
void launch_elementwise(const TableKey& key, ElementwisePlan<Coef, S>& plan, const Functor& f,
                        double* telemetry = nullptr) {
  if (plan.num_tasks == 0) {
    if (telemetry != nullptr) zero_telemetry(telemetry, plan.num_tensors(), plan.device());
    return;
  }
  plan.fill();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor partials;
  if (telemetry != nullptr) partials = telemetry_partials(plan.num_tasks, plan.device());
  with_device_table(key, plan.image, [&](const uint8_t* base) {
    plan.fill_device_coefficients(base, stream);
    const ElementwiseTable<Coef, S> table = plan.view(base);
    const unsigned blocks = static_cast<unsigned>(plan.num_tasks);
    with_rounding<scalar_t>("amos_fused elementwise step", plan.rounds(), [&](auto round_flag) {
      constexpr bool kRound = decltype(round_flag)::value;
      if (telemetry != nullptr) {
        elementwise_kernel<scalar_t, S, kWriteMask, true, kRound>
            <<<blocks, kElementwiseThreads, 0, stream>>>(table, f, partials.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        combine_telemetry(partials.data_ptr<double>(), table.first_task, table.first_task + 1,
                          plan.num_tensors(), telemetry, stream);
      } else {
        elementwise_kernel<scalar_t, S, kWriteMask, false, kRound>
            <<<blocks, kElementwiseThreads, 0, stream>>>(table, f, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace amos_fused::cuda
