"""float32 master weights of bfloat16 / float16 params (``master_weights=True``,
the name of Apex's and Transformer Engine's fused Adam).

Such a param keeps a float32 copy, ``state['master_param']``, with the param's
shape and strides, and its other states in float32.  A step updates the master
in float32 with the param's (low-precision) grad, exactly as it would update a
float32 param, and writes the param as the master rounded to nearest: the
small updates that rounding a low-precision param would drop accumulate in the
master.  A param written between steps (replaced, or written in place through
autograd: ``WriteMarks``) gets its master remade from its new value at the next
step; a write through ``p.data`` is not seen (clear that param's state to
restart from the param).

Turning ``master_weights`` on for a param with low-precision state makes the
master from the param and its states float32 at the next step; turning it off
rounds the states to the param's dtype and drops the master."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .sharding import local

MASTER_KEY = "master_param"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def has_master(param: Tensor, master_weights: bool) -> bool:
    """Whether a param of a group with this ``master_weights`` is stepped as a master."""
    return bool(master_weights) and param.dtype in LOW_PRECISION


def float32_copy(t: Tensor) -> Tensor:
    """A float32 copy of t in t's layout (a DTensor stays a DTensor)."""
    return torch.empty_like(t, dtype=torch.float32).copy_(t)


def upcast_states(param: Tensor, state: Dict[str, object]) -> Dict[str, Tensor]:
    """The new state entries of a param whose master is made now: the master
    from the param, and a float32 copy of each state tensor in the param's dtype
    (its moments, its slots)."""
    out = {key: float32_copy(value) for key, value in state.items()
           if key != "step" and isinstance(value, Tensor) and value.dtype == param.dtype}
    out[MASTER_KEY] = float32_copy(param.detach())
    return out


def master_problem(param: Tensor, master: object) -> Optional[str]:
    """Why ``master`` cannot be ``param``'s master (None when it can): a float32
    tensor on the param's device with its shape and strides."""
    if not isinstance(master, Tensor):
        return f"is a {type(master).__name__}, not a tensor"
    if master.dtype != torch.float32 or master.device != param.device or master.shape != param.shape:
        return (f"is {master.dtype}, shape {tuple(master.shape)}, on {master.device}; expected float32, "
                f"shape {tuple(param.shape)}, on {param.device}")
    if master.stride() != param.stride():
        return f"has strides {master.stride()}; expected the param's {param.stride()}"
    return None


def convert_loaded(param: Tensor, state: Dict[str, object], master_weights: bool) -> None:
    """Brings a loaded state to the group's choice: without a master, the states
    in the param's dtype and no ``master_param``.  (With a master, float32 states
    are kept as saved; a checkpoint without a master gets one at the next step.)"""
    if has_master(param, master_weights):
        return
    state.pop(MASTER_KEY, None)


class WriteMarks:
    """What each param with a master looked like when a step last wrote it: its
    storage address and version counter.  A param replaced (``p.data = …``) or
    written in place through autograd's view of it (``with torch.no_grad():
    p.copy_(…)``, ``torch.nn.init``) between steps no longer matches, and the next
    step remakes its master from it, so the step starts from the param's value as
    torch.optim's would.  (A write through ``p.data`` keeps the version counter
    and is not seen.)"""

    def __init__(self):
        self._marks: Dict[int, tuple] = {}

    @staticmethod
    def _mark_of(param: Tensor) -> tuple:
        t = local(param)
        return (t.data_ptr(), t._version)

    def mark(self, params) -> None:
        for p in params:
            self._marks[id(p)] = (p, self._mark_of(p))

    def edited(self, param: Tensor) -> bool:
        entry = self._marks.get(id(param))
        return entry is not None and entry[0] is param and entry[1] != self._mark_of(param)

    def clear(self) -> None:
        self._marks.clear()
