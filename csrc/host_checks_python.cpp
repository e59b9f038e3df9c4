// Host-only functions of the amos_fused._C module: the optimizers' per-step checks
// (csrc/checks.h: check_step, first_written_overlap, and the swap check's
// layout_signature, which has no op) and the Triton backend's prologues
// (csrc/contracts.h: begin_step, begin_step_fp8, which write nothing but a skipped
// step's telemetry column), beside the torch.ops.amos_fused ops of the same names.
// A call through the dispatcher boxes every tensor of a list into an IValue list
// and back, about 200 ns per tensor with the checks (torch 2.13): most of a step's
// host time over many small params, each passed through these once per step.  Here
// each list is unpacked straight from the Python objects (about 80 ns per tensor
// with the checks).  Same results and errors as the ops.  The optimizers step
// eagerly (torch._disable_dynamo), so nothing here is traced; the ops that write
// params and states (step, step_fp8, advance_steps) stay dispatched.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "contracts.h"
#include "host_checks_python.h"

namespace amos_fused {
namespace {

int64_t int_of(PyObject* arg, const char* fn, const char* name);

// convert(item, i) of every item of the Python list or tuple `arg` (argument `name`
// of `fn`, a list of `what`).
template <typename T, typename Convert>
std::vector<T> list_of(PyObject* arg, const char* fn, const char* name, const char* what, const Convert& convert) {
  TORCH_CHECK_TYPE(PyList_Check(arg) || PyTuple_Check(arg), "amos_fused._C.", fn, ": ", name, " must be a list of ",
                   what, ", got ", Py_TYPE(arg)->tp_name);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arg);
  PyObject** items = PySequence_Fast_ITEMS(arg);
  std::vector<T> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(convert(items[i], i));
  return out;
}

std::vector<at::Tensor> tensors_of(PyObject* arg, const char* fn, const char* name) {
  return list_of<at::Tensor>(arg, fn, name, "tensors", [&](PyObject* item, Py_ssize_t i) {
    TORCH_CHECK_TYPE(THPVariable_Check(item), "amos_fused._C.", fn, ": ", name, "[", i, "] must be a tensor, got ",
                     Py_TYPE(item)->tp_name);
    return THPVariable_Unpack(item);
  });
}

// Hyper-parameters, per-tensor values.
std::vector<double> floats_of(PyObject* arg, const char* fn, const char* name) {
  return list_of<double>(arg, fn, name, "floats", [&](PyObject* item, Py_ssize_t i) {
    TORCH_CHECK_TYPE(PyFloat_Check(item) || PyLong_Check(item), "amos_fused._C.", fn, ": ", name, "[", i,
                     "] must be a float, got ", Py_TYPE(item)->tp_name);
    const double value = PyFloat_AsDouble(item);
    if (value == -1.0 && PyErr_Occurred()) throw python_error();
    return value;
  });
}

// An optional tensor (None: absent).
std::optional<at::Tensor> optional_tensor_of(PyObject* arg, const char* fn, const char* name) {
  if (arg == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(arg), "amos_fused._C.", fn, ": ", name, " must be a tensor or None, got ",
                   Py_TYPE(arg)->tp_name);
  return THPVariable_Unpack(arg);
}

// An optional int list (None: absent).
std::optional<std::vector<int64_t>> optional_ints_of(PyObject* arg, const char* fn, const char* name) {
  if (arg == Py_None) return std::nullopt;
  return list_of<int64_t>(arg, fn, name, "ints or None",
                          [&](PyObject* item, Py_ssize_t) { return int_of(item, fn, name); });
}

// A str argument's UTF-8 text (alive as long as the str).
const char* str_of(PyObject* arg, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(PyUnicode_Check(arg), "amos_fused._C.", fn, ": ", name, " must be a str, got ",
                   Py_TYPE(arg)->tp_name);
  const char* text = PyUnicode_AsUTF8(arg);
  if (text == nullptr) throw python_error();
  return text;
}

// A prologue's result as Python's (bool, Tensor).
PyObject* run_and_table(bool run, const at::Tensor& table) {
  PyObject* wrapped = THPVariable_Wrap(table);
  if (wrapped == nullptr) return nullptr;
  return Py_BuildValue("(ON)", run ? Py_True : Py_False, wrapped);
}

int64_t int_of(PyObject* arg, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(arg), "amos_fused._C.", fn, ": ", name, " must be an int, got ",
                   Py_TYPE(arg)->tp_name);
  const long long value = PyLong_AsLongLong(arg);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return static_cast<int64_t>(value);
}

// check_step(params, grads, states, slots, steps, walk) -> (index, problem, which)
PyObject* py_check_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params, *grads, *states, *slots, *steps, *walk;
  if (!PyArg_UnpackTuple(args, "check_step", 6, 6, &params, &grads, &states, &slots, &steps, &walk))
    return nullptr;
  const auto found = check_step(tensors_of(params, "check_step", "params"),
                                tensors_of(grads, "check_step", "grads"),
                                tensors_of(states, "check_step", "states"),
                                tensors_of(slots, "check_step", "slots"),
                                tensors_of(steps, "check_step", "steps"), int_of(walk, "check_step", "walk"));
  return Py_BuildValue("(LLL)", static_cast<long long>(std::get<0>(found)),
                       static_cast<long long>(std::get<1>(found)), static_cast<long long>(std::get<2>(found)));
  END_HANDLE_TH_ERRORS
}

// first_written_overlap(tensors, written) -> (first, second)
PyObject* py_first_written_overlap(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensors, *written;
  if (!PyArg_UnpackTuple(args, "first_written_overlap", 2, 2, &tensors, &written)) return nullptr;
  const auto found = first_written_overlap(tensors_of(tensors, "first_written_overlap", "tensors"),
                                           int_of(written, "first_written_overlap", "written"));
  return Py_BuildValue("(LL)", static_cast<long long>(std::get<0>(found)),
                       static_cast<long long>(std::get<1>(found)));
  END_HANDLE_TH_ERRORS
}

// layout_signature(tensors) -> list of ints
PyObject* py_layout_signature(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  const std::vector<int64_t> signature = layout_signature(tensors_of(arg, "layout_signature", "tensors"));
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(signature.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < signature.size(); ++i) {
    PyObject* value = PyLong_FromLongLong(static_cast<long long>(signature[i]));
    if (value == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), value);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

// begin_step(algorithm, params, grads, states, steps, hyper, per_tensor, grad_scale,
//            found_inf, telemetry, round_keys) -> (run, coefficient table)
PyObject* py_begin_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *algorithm, *params, *grads, *states, *steps, *hyper, *per_tensor, *grad_scale, *found_inf,
      *telemetry, *round_keys;
  if (!PyArg_UnpackTuple(args, "begin_step", 11, 11, &algorithm, &params, &grads, &states, &steps, &hyper,
                         &per_tensor, &grad_scale, &found_inf, &telemetry, &round_keys))
    return nullptr;
  constexpr const char* fn = "begin_step";
  const char* name = str_of(algorithm, fn, "algorithm");
  const std::optional<std::vector<int64_t>> keys = optional_ints_of(round_keys, fn, "round_keys");
  const auto [run, table] = begin_step_op(
      name, tensors_of(params, fn, "params"), tensors_of(grads, fn, "grads"), tensors_of(states, fn, "states"),
      tensors_of(steps, fn, "steps"), floats_of(hyper, fn, "hyper"), floats_of(per_tensor, fn, "per_tensor"),
      optional_tensor_of(grad_scale, fn, "grad_scale"), optional_tensor_of(found_inf, fn, "found_inf"),
      optional_tensor_of(telemetry, fn, "telemetry"),
      keys ? at::OptionalIntArrayRef(*keys) : at::OptionalIntArrayRef());
  return run_and_table(run, table);
  END_HANDLE_TH_ERRORS
}

// begin_step_fp8(algorithm, params, grads, codes, absmax, steps, hyper, grad_scale,
//                found_inf, telemetry, round_keys, states, per_tensor) -> (run, table)
PyObject* py_begin_step_fp8(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *algorithm, *params, *grads, *codes, *absmax, *steps, *hyper, *grad_scale, *found_inf, *telemetry,
      *round_keys, *states, *per_tensor;
  if (!PyArg_UnpackTuple(args, "begin_step_fp8", 13, 13, &algorithm, &params, &grads, &codes, &absmax, &steps,
                         &hyper, &grad_scale, &found_inf, &telemetry, &round_keys, &states, &per_tensor))
    return nullptr;
  constexpr const char* fn = "begin_step_fp8";
  const char* name = str_of(algorithm, fn, "algorithm");
  const std::optional<std::vector<int64_t>> keys = optional_ints_of(round_keys, fn, "round_keys");
  std::optional<std::vector<at::Tensor>> state_tensors;
  if (states != Py_None) state_tensors = tensors_of(states, fn, "states");
  std::optional<std::vector<double>> per_tensor_values;
  if (per_tensor != Py_None) per_tensor_values = floats_of(per_tensor, fn, "per_tensor");
  const auto [run, table] = begin_step_fp8_op(
      name, tensors_of(params, fn, "params"), tensors_of(grads, fn, "grads"), tensors_of(codes, fn, "codes"),
      tensors_of(absmax, fn, "absmax"), tensors_of(steps, fn, "steps"), floats_of(hyper, fn, "hyper"),
      optional_tensor_of(grad_scale, fn, "grad_scale"), optional_tensor_of(found_inf, fn, "found_inf"),
      optional_tensor_of(telemetry, fn, "telemetry"),
      keys ? at::OptionalIntArrayRef(*keys) : at::OptionalIntArrayRef(),
      state_tensors ? std::optional<at::TensorList>(*state_tensors) : std::nullopt,
      per_tensor_values ? std::optional<at::ArrayRef<double>>(*per_tensor_values) : std::nullopt);
  return run_and_table(run, table);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"begin_step_fp8", py_begin_step_fp8, METH_VARARGS,
     "begin_step_fp8(algorithm, params, grads, codes, absmax, steps, hyper, grad_scale, found_inf, telemetry, "
     "round_keys, states, per_tensor): torch.ops.amos_fused.begin_step_fp8, every argument positional, its "
     "lists read straight from Python"},
    {"begin_step", py_begin_step, METH_VARARGS,
     "begin_step(algorithm, params, grads, states, steps, hyper, per_tensor, grad_scale, found_inf, telemetry, "
     "round_keys): torch.ops.amos_fused.begin_step, every argument positional, its lists read straight "
     "from Python"},
    {"check_step", py_check_step, METH_VARARGS,
     "check_step(params, grads, states, slots, steps, walk): torch.ops.amos_fused.check_step, "
     "its lists read straight from Python"},
    {"first_written_overlap", py_first_written_overlap, METH_VARARGS,
     "first_written_overlap(tensors, written): torch.ops.amos_fused.first_written_overlap, its list read "
     "straight from Python"},
    {"layout_signature", py_layout_signature, METH_O,
     "layout_signature(tensors): (address, numel, ndim, strides...) of every tensor, one list of ints: "
     "the trace of a swapped param (csrc/checks.h)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* host_check_methods() { return methods; }

}  // namespace amos_fused
