// The methods of the amos_fused._C module (csrc/host_checks_python.cpp): the
// optimizers' per-step host checks, their lists read straight from Python.
#pragma once

#include <Python.h>

namespace amos_fused {

PyMethodDef* host_check_methods();

}  // namespace amos_fused
