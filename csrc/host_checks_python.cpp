// The optimizers' per-step host checks (csrc/checks.h: check_step,
// first_written_overlap, layout_signature) as plain functions of the amos_fused._C
// module, besides their torch.ops.amos_fused ops.  A call through the dispatcher
// boxes every tensor of a list into an IValue list and unboxes it again, about
// 200 ns per tensor (2026, torch 2.13): most of an optimizer step's host time over
// many small params, which passes each param, grad and state through these checks
// once per step.  Here each list is unpacked straight from the Python objects
// (~20 ns per tensor).  Same results and errors as the ops.  The optimizers step
// eagerly (torch._disable_dynamo), so nothing here is traced.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <vector>

#include "checks.h"
#include "host_checks_python.h"

namespace amos_fused {
namespace {

// The tensors of the Python list or tuple `arg` (argument `name` of `fn`).
std::vector<at::Tensor> tensors_of(PyObject* arg, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(arg) || PyTuple_Check(arg), "amos_fused._C.", fn, ": ", name,
                   " must be a list of tensors, got ", Py_TYPE(arg)->tp_name);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(arg);
  PyObject** items = PySequence_Fast_ITEMS(arg);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(THPVariable_Check(items[i]), "amos_fused._C.", fn, ": ", name, "[", i,
                     "] must be a tensor, got ", Py_TYPE(items[i])->tp_name);
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return out;
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

PyMethodDef methods[] = {
    {"check_step", py_check_step, METH_VARARGS,
     "check_step(params, grads, states, slots, steps, walk): torch.ops.amos_fused.check_step, "
     "its lists read straight from Python"},
    {"first_written_overlap", py_first_written_overlap, METH_VARARGS,
     "first_written_overlap(tensors, written): torch.ops.amos_fused.first_written_overlap, its list read "
     "straight from Python"},
    {"layout_signature", py_layout_signature, METH_O,
     "layout_signature(tensors): torch.ops.amos_fused.layout_signature, its list read straight from Python"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* host_check_methods() { return methods; }

}  // namespace amos_fused
