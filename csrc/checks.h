// Input checks of a step, run before anything is written.  They look only at
// tensor metadata, so they serve every device.  One copy: the Python layer calls
// them once per bucket per step (the `check_step` op) before any bucket is
// stepped, and the step ops call them again on the lists they are handed (cheap,
// and it keeps a direct call of an op memory-safe).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace amos_fused {

// What is wrong with a bucket (0 = nothing).  The Python layer turns the code
// into an error that names the param (amos_fused/checks.py mirrors these values).
enum class Problem : int64_t {
  kNone = 0,
  kGradSparse = 1,   // grad is not a strided tensor
  kGradDtype = 2,
  kGradDevice = 3,
  kGradShape = 4,
  kGradLayout = 5,   // same shape, other strides (the Python layer copies it)
  kParamDtype = 6,   // not float32/float64/bfloat16/float16
  kParamMixed = 7,   // dtype or device other than params[0]'s
  kParamLayout = 8,  // not dense (or, where required, not contiguous)
  kState = 9,        // a state tensor unlike its param (dtype, device, shape, strides)
  kSlot = 10,        // an Amos slot of another dtype or device, or (fused) not contiguous
  kStep = 11,        // a step counter that is not a float32 CPU scalar >= 0
  kOverlap = 12,     // two params share memory
  kStateShared = 13, // a state tensor shares memory with its param or an earlier state of it
  kStepShared = 14,  // one step counter for two params
  kSlotShared = 15,  // an Amos slot shares memory with its param, a state or an earlier slot of it
  kStepAliased = 16, // a step counter shares memory with its param, grad, a state or a slot of it
  kInference = 17,   // a tensor the step writes is an inference tensor (outside inference mode);
                     // list: 0 the param, 1 its step, 2 + k state k, 2 + #states + k slot k
  kLazy = 18,        // a tensor the step writes is a lazy view (lazy_view), list as for kInference;
                     // or (list -1) the grad is a ZeroTensor, which has no memory to read
};

// How the kernels walk a param: any strides (reference), dense in some dim
// order, or row-major contiguous.
enum class Walk : int64_t { kAny = 0, kDense = 1, kContiguous = 2 };

struct Found {
  int64_t index = -1;  // the param, or -1
  Problem problem = Problem::kNone;
  int64_t list = 0;    // which state / slot list, for kState / kSlot
};

// Dense: the elements fill one block of memory without gaps or overlap, in any
// dim order (0-element tensors are dense).
bool is_dense(const at::Tensor& t);

// A tensor whose memory does not hold its values as they read: a lazily negated
// or conjugated view (x.conj().imag, torch._neg_view) or a ZeroTensor (no memory).
// The kernels read and write raw memory, so the step refuses one before it writes.
bool lazy_view(const at::Tensor& t);

Found find_problem(at::TensorList params, at::TensorList grads,
                   at::ArrayRef<at::TensorList> states, at::ArrayRef<at::TensorList> slots,
                   at::TensorList steps, Walk walk, bool check_overlap);

// The op the Python layer calls: states and slots are key-major flat lists of
// len(params) tensors per key.  Returns (index, Problem, list).
std::tuple<int64_t, int64_t, int64_t> check_step(at::TensorList params, at::TensorList grads,
                                                 at::TensorList states, at::TensorList slots,
                                                 at::TensorList steps, int64_t walk);

// Two tensors of a step that share memory where one of them is written: the
// first `written` tensors of `tensors` are written in place by the step (params,
// masters, states, counters), the rest only read (grads, which may share memory
// with each other).  Byte spans are compared, per device (a written strided view
// that is not dense, stepped on the reference only, is left out; a read one is
// compared by the bytes it spans).
// Returns (i, j), i < j, indices into `tensors`, or (-1, -1).
std::tuple<int64_t, int64_t> first_written_overlap(at::TensorList tensors, int64_t written);

// Whether `s` is a step counter the host steps: a finite float32 CPU count >= 0 in
// one element (a negative, NaN or infinite count has no bias correction).
bool is_step_counter(const at::Tensor& s);

// The layouts of `tensors` (address, numel, ndim, then the strides of each, one
// tensor after another): equal signatures, the same memory in the same layouts.
// The optimizers compare it with the last step's to skip a full overlap check of
// their params when none was swapped (`p.data = ...`); they call it as
// amos_fused._C.layout_signature (csrc/host_checks_python.cpp), no op.
std::vector<int64_t> layout_signature(at::TensorList tensors);

// The FP8 state lists of a bucket (csrc/fp8_states.h), S lists of codes and S of
// absmax: codes[k][i] must be uint8 with param i's sizes and strides, on its
// device; absmax[k][i] a contiguous float32 tensor of one element per block of
// 256 on the same device.  Returns (i, k) of the first bad tensor (k < S: codes
// list k; S + k: absmax list k), or (-1, 0).
std::pair<int64_t, int64_t> find_fp8_problem(at::TensorList params, at::ArrayRef<at::TensorList> codes,
                                             at::ArrayRef<at::TensorList> absmax);

// The op form for the Python layer: codes and absmax are key-major flat lists.
std::tuple<int64_t, int64_t> check_fp8_states(at::TensorList params, at::TensorList codes,
                                              at::TensorList absmax);

using NamedList = std::pair<const char*, at::TensorList>;

// A step with master weights: params are float32 masters, low_params[i] the
// bfloat16 / float16 param written from params[i] (one dtype; params[i]'s sizes,
// strides and device; no memory shared with the masters), grads[i] its grad
// (low_params' dtype, sizes and strides).  Raises, naming `op`.
void check_low_params(const char* op, at::TensorList params, at::TensorList grads, at::TensorList low_params,
                      at::TensorList steps);

// The step ops' own check (through begin_step, csrc/step_prologue.h): raises
// (naming `op`) on any problem of find_problem with Walk::kDense.  `states` may
// hold empty lists (state not used by this call).
void check_bucket(const char* op, at::TensorList params, at::TensorList grads,
                  at::ArrayRef<NamedList> states, at::TensorList steps);

// GradScaler inputs of a step, read on the host: skip the step when found_inf is
// non-zero; otherwise multiply grads by `unscale` (1 without a scale).  Checks
// that each given tensor is a one-element floating tensor.
struct GradScaling {
  bool skip;
  double unscale;
};
GradScaling read_grad_scaling(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf);

}  // namespace amos_fused
