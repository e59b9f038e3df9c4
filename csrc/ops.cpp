// Registers the amos_fused ops (schemas here; device kernels in cpu/ and cuda/)
// and makes this library importable as the Python module amos_fused._C.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "checks.h"
#include "host_checks_python.h"
#include "amos_layout.h"
#include "contracts.h"
#include "cpu/kernel_api.h"

namespace {
bool built_with_cuda() {
#ifdef AMOS_FUSED_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

// Every step op takes the GradScaler inputs of torch's fused kernels: grads are
// multiplied by 1/grad_scale in the kernel, and a non-zero found_inf skips the
// whole step (no write at all, step counters included).
TORCH_LIBRARY(amos_fused, m) {
  // (index of the first bad param or -1, amos_fused::Problem, which state/slot list);
  // states and slots: key-major flat lists; walk: amos_fused::Walk.
  m.def("check_step(Tensor[] params, Tensor[] grads, Tensor[] states, Tensor[] slots, "
        "Tensor[] steps, int walk) -> (int, int, int)",
        &amos_fused::check_step);
  // (i, j) of two tensors sharing memory, one of them among the first `written`, or (-1, -1).
  m.def("first_written_overlap(Tensor[] tensors, int written) -> (int, int)", &amos_fused::first_written_overlap);
  m.def("cpu_capability() -> str", &amos_fused::cpu::cpu_capability);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("set_cpu_capability(str name) -> ()", &amos_fused::cpu::set_cpu_capability);
  // One step of `algorithm` over a bucket (its contract: csrc/contracts.h, and the
  // `contract` op below): states are the contract's enabled state lists,
  // key-major (len(params) tensors each); hyper its hyper-parameters in order;
  // per_tensor one value per param where the algorithm has one (Amos η,
  // scale-aware Adam's ‖ε0‖), else empty.  telemetry (optional): a contiguous
  // float64 [len(params), 2] tensor on the params' device; row t gets
  // (Σθ², Σ(Δθ)²) of param t as stored after the step, summed in a fixed order
  // (csrc/step_prologue.h: check_telemetry).  round_keys (optional, bfloat16
  // params only): one key per param; the params are then stored with stochastic
  // rounding (csrc/stochastic_round.h).  low_params (optional; algorithms of
  // master_algorithms(), CPU): bfloat16 or float16 tensors, one per param with its
  // sizes and strides; the params are then their float32 master weights, the
  // grads have the low_params' dtype, and each low param is written in the same
  // pass as its master rounded to nearest (even).
  m.def(
      "step(str algorithm, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, "
      "Tensor(c!)[] steps, float[] hyper, float[] per_tensor, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(d!)? telemetry=None, int[]? round_keys=None, "
      "Tensor(e!)[]? low_params=None) -> ()");
  // A capturable step (capturable=True; CUDA only): `step`'s bucket, states, hyper
  // (flags and the values the kernels branch on; lr may be a placeholder) and
  // per_tensor, with nothing read on the host, so it can be captured in a CUDA
  // graph.  coef: the contiguous float64 [len(params), columns] coefficient
  // table of this step (the `contract` op's columns), computed on the params'
  // device; found_inf: GradScaler's, one float32 element there: the kernels
  // return without writing when it is non-zero.  No step counters: the caller
  // advances them (by 1 − found_inf) after the launch.
  m.def(
      "step_capturable(str algorithm, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, "
      "float[] hyper, float[] per_tensor, Tensor coef, Tensor? found_inf=None) -> ()");
  // The algorithms whose CPU step op takes low_params.
  m.def("master_algorithms() -> str[]", &amos_fused::master_algorithms_op);
  // (hyper names, state keys, the flag enabling each state or "", [per-tensor
  // value name] or [], coefficient column names) of an algorithm.
  m.def("contract(str algorithm) -> (str[], str[], str[], str[], str[])", &amos_fused::contract_op);
  // Every Amos tensor's slot layout (csrc/amos_layout.h), one int64 row each:
  // (kind, num_slots, row_len, ndim, sizes[16], slot_strides[16]); checks the slots.
  m.def("amos_slot_layouts(str op, Tensor[] params, Tensor[] vs, Tensor[] bs) -> Tensor",
        &amos_fused::amos_slot_layouts_op);
  // The names of every algorithm of the step op.
  m.def("algorithms() -> str[]", &amos_fused::algorithms_op);
  // The step op of the optimizers with block-scaled FP8 states (csrc/fp8_states.h):
  // `step`'s arguments, with the coded state lists as codes (uint8, shaped like the
  // params: exp_avg[, exp_avg_sq as sqrt], or Amos's mu) and absmax (float32, one
  // per block of 256), key-major; `states` and `per_tensor`: those of the states
  // kept in full precision and the per-tensor values (Amos: vs, bs and etas; none
  // for the others).  Algorithms: fp8_algorithms() (on CUDA:
  // cuda_fp8_algorithms()).  low_params (CPU): as step's.
  m.def(
      "step_fp8(str algorithm, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, "
      "Tensor(c!)[] absmax, Tensor(d!)[] steps, float[] hyper, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(e!)? telemetry=None, int[]? round_keys=None, "
      "Tensor(f!)[]? low_params=None, Tensor(g!)[]? states=None, float[]? per_tensor=None) -> ()");
  m.def("fp8_algorithms() -> str[]", &amos_fused::fp8_algorithms_op);
  m.def("cuda_fp8_algorithms() -> str[]", &amos_fused::cuda_fp8_algorithms_op);
  // After a backend's launch (the Triton backend's): every step counter (a finite
  // float32 CPU scalar >= 0) plus one, in float32 as torch.optim adds it, its version
  // counter bumped as torch's in-place ops do.  Refuses a bad counter before it
  // writes any.
  m.def("advance_steps(Tensor(a!)[] steps) -> ()");
  // begin_step for step_fp8: its checks and coefficient table, nothing written.
  m.def(
      "begin_step_fp8(str algorithm, Tensor[] params, Tensor[] grads, Tensor[] codes, Tensor[] absmax, "
      "Tensor[] steps, float[] hyper, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor(a!)? telemetry=None, int[]? round_keys=None, Tensor[]? states=None, "
      "float[]? per_tensor=None) -> (bool, Tensor)",
      &amos_fused::begin_step_fp8_op);
  // (index of the first param whose FP8 states do not fit it or -1, which list:
  // k for codes list k, S + k for absmax list k); codes and absmax key-major.
  m.def("check_fp8_states(Tensor[] params, Tensor[] codes, Tensor[] absmax) -> (int, int)",
        &amos_fused::check_fp8_states);
  // The checks and coefficients of `step` without the kernels: (false, empty)
  // when found_inf skips the step, else (true, the float64 coefficient table at
  // the next step counts, one row per param).  Writes nothing: the caller launches
  // and then advances the step counters (and, on a skipped step, zeroes the
  // telemetry's update column).  Used by the Triton backend.
  m.def(
      "begin_step(str algorithm, Tensor[] params, Tensor[] grads, Tensor[] states, "
      "Tensor[] steps, float[] hyper, float[] per_tensor, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(a!)? telemetry=None, int[]? round_keys=None) -> (bool, Tensor)",
      &amos_fused::begin_step_op);
}

namespace {

// The step ops write their params, states and counters in place: like torch's
// in-place ops, they bump the version counter of every tensor the schema marks
// written (once the kernels have run), so that autograd refuses a backward
// through a graph that saved a param the step has since changed.
bool is_written(const c10::Argument& argument) {
  const c10::AliasInfo* alias = argument.alias_info();
  if (alias == nullptr) return false;
  if (alias->isWrite()) return true;
  for (const c10::AliasInfo& element : alias->containedTypes())  // (Tensor(a!)[]: on the elements)
    if (element.isWrite()) return true;
  return false;
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  const size_t first = stack->size() - num_arguments;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < num_arguments; ++i) {
    if (!is_written(schema.arguments()[i])) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) written.push_back(t);
    }
  }
  // A step that found_inf skips writes nothing (read here when it is on the host, as
  // the kernels read it; one on a device is not read: the versions are bumped)
  bool skipped = false;
  for (size_t i = 0; i < num_arguments; ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (schema.arguments()[i].name() == "found_inf" && value.isTensor()) {
      const at::Tensor& found_inf = value.toTensor();
      // (a traced call's fake or functional tensor has no value to read: bumped)
      const c10::DispatchKeySet found_keys = found_inf.defined() ? found_inf.key_set() : c10::DispatchKeySet();
      const bool has_value = found_inf.defined() && !found_keys.has(c10::DispatchKey::Python) &&
                             !found_keys.has(c10::DispatchKey::Functionalize) && found_inf.has_storage();
      skipped = has_value && found_inf.is_cpu() && found_inf.numel() == 1 && found_inf.layout() == c10::kStrided &&
                found_inf.item<double>() != 0.0;
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (skipped) return;
  for (const at::Tensor& t : written)
    if (t.defined() && !t.is_inference()) torch::autograd::increment_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(amos_fused, CompositeExplicitAutograd, m) {
  m.impl("advance_steps", &amos_fused::advance_steps_op);  // (versions: bump_written_versions)
}

TORCH_LIBRARY_IMPL(amos_fused, ADInplaceOrView, m) {
  for (const char* name : {"step", "step_fp8", "step_capturable", "advance_steps"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          amos_fused::host_check_methods()};
  return PyModule_Create(&module_def);
}
