// Registers the amos_fused ops (schemas here; device kernels in cpu/ and cuda/)
// and makes this library importable as the Python module amos_fused._C.
#include <Python.h>
#include <torch/library.h>

#include "checks.h"
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
  m.def("cpu_capability() -> str", &amos_fused::cpu::cpu_capability);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("set_cpu_capability(str name) -> ()", &amos_fused::cpu::set_cpu_capability);
  // Adam / AdamW (decoupled), amsgrad, optional bias correction.
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
      "bool bias_correction, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // RAdam, L2 or decoupled decay.
  m.def(
      "radam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, float rectify_threshold, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Lion / SignSGDM-W.
  m.def(
      "lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] steps, float lr, "
      "float beta1, float beta2, float weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // Amos; slot layout of each tensor read off the shapes of its v / b.
  m.def(
      "amos_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] vs, Tensor(c!)[] bs, "
      "Tensor(d!)[] mus, Tensor(e!)[] steps, float[] etas, float lr, float beta, float? momentum, "
      "float? clip_value, float extra_l2, float d_coef, float c_coef, float epsilon, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Scale-aware Adam (Su Jianlin, kexue.fm, 2022-11-22): two phases, per-tensor ‖u‖.
  m.def(
      "scaled_adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float[] init_norms, float lr, float beta1, "
      "float beta2, float eps, float p, bool inverse_time, float q, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // LAMB: two phases, per-tensor ‖u‖ and ‖θ‖.
  m.def(
      "lamb_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool bias_correction, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
