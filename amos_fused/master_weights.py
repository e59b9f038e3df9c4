"""float32 master weights of bfloat16 / float16 params (``master_weights=True``,
the name of Apex's and Transformer Engine's fused Adam).

Such a param keeps a float32 copy, ``state['master_param']``, with the param's
shape and strides (a non-dense param's, a strided view stepped by the reference:
the dense layout torch.empty_like gives it, ``master_strides``), and its other
states in float32.  A step updates the master
in float32 with the param's (low-precision) grad, exactly as it would update a
float32 param, and writes the param as the master rounded to nearest: the
small updates that rounding a low-precision param would drop accumulate in the
master.  A param written between steps (replaced, or written in place through
autograd: ``WriteMarks``) gets its master remade from its new value at the next
step; a write through ``p.data`` is not seen (clear that param's state to
restart from the param).  Loading a checkpoint marks the params with a master as
they are then: a step with no write in between resumes from the loaded master.

Turning ``master_weights`` on for a param with low-precision state makes the
master from the param and its states float32 at the next step; turning it off
rounds the states to the param's dtype and drops the master."""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch import Tensor

from .sharding import is_dtensor, local

MASTER_KEY = "master_param"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def has_master(param: Tensor, master_weights: bool) -> bool:
    """Whether a param of a group with this ``master_weights`` is stepped as a master."""
    return bool(master_weights) and param.dtype in LOW_PRECISION


def float32_copy(t: Tensor) -> Tensor:
    """A float32 copy of t in t's layout (a DTensor stays a DTensor; a non-dense
    t's copy is dense: master_strides)."""
    return torch.empty_like(t, dtype=torch.float32).copy_(t)


def master_strides(param: Tensor) -> tuple:
    """The strides of param's master as float32_copy makes it (torch.empty_like,
    preserve_format): the param's own when it is dense in memory (in any dim
    order), the dense layout torch picks for a non-dense one (a strided view,
    which the reference steps: its master, states and grads stay dense)."""
    if is_dtensor(param):
        return tuple(param.stride())
    return tuple(torch.empty_like(param, dtype=torch.float32, device="meta").stride())


def stepped_like(param: Tensor, master: bool) -> Tensor:
    """A tensor with the layout of the one the step writes: the param, or (``master``)
    its float32 master: the param itself when the master has its strides, else an
    empty float32 tensor laid out as the master (new FP8 codes take its strides)."""
    if not master or master_strides(param) == tuple(param.stride()):
        return param
    return torch.empty_like(param, dtype=torch.float32)


def awaits_master(state) -> bool:
    """Whether a param's ``state`` (of a param that is to have a master) holds
    states without a master, a `step` or not: its next step makes the master and
    upcasts them (upcast_states), or, masters turned off first, rounds them."""
    return isinstance(state, dict) and bool(state) and MASTER_KEY not in state


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
    tensor on the param's device with its shape and the strides float32_copy
    gives it (master_strides: the param's, or a non-dense param's dense ones)."""
    if not isinstance(master, Tensor):
        return f"is a {type(master).__name__}, not a tensor"
    if master.dtype != torch.float32 or master.device != param.device or master.shape != param.shape:
        return (f"is {master.dtype}, shape {tuple(master.shape)}, on {master.device}; expected float32, "
                f"shape {tuple(param.shape)}, on {param.device}")
    expected = master_strides(param)
    if tuple(master.stride()) != expected:
        whose = "the param's" if expected == tuple(param.stride()) else \
            f"the dense layout of the param's shape (the param's strides {param.stride()} are not dense)"
        return f"has strides {master.stride()}; expected {whose} {expected}"
    return None


def convert_loaded(param: Tensor, state: Dict[str, object], master_weights: bool) -> None:
    """Brings a loaded state to the group's choice: without a master, the states
    in the param's dtype and no ``master_param``.  (With a master, float32 states
    are kept as saved; a checkpoint without a master gets one at the next step.
    A saved master that is not float32 is dropped like a missing one: it went
    through torch.optim, whose load casts every state to the param's dtype, and
    predates the steps taken there, so the param is the value to resume from.)"""
    if has_master(param, master_weights):
        master = state.get(MASTER_KEY)
        if master is not None and not (isinstance(master, Tensor) and master.dtype == torch.float32):
            del state[MASTER_KEY]
        return
    state.pop(MASTER_KEY, None)


def rounds_to(master, param: Tensor) -> bool:
    """Whether a float32 master, rounded to nearest into the param's dtype (as the
    step writes the param from it), is bitwise the param now: a write since the
    last step that left those values (the model's own weights loaded after the
    optimizer, as torch.distributed.checkpoint's set_state_dict loads them) keeps
    the master and its extra bits.  Compared shard by shard for DTensors."""
    if master_problem(param, master) is not None:  # (a param given another layout: its master remade)
        return False
    m, p = local(master), local(param).detach()
    rounded = m.to(p.dtype)
    if p.dtype in _BITS:  # (bitwise: -0 is not +0)
        return torch.equal(rounded.view(_BITS[p.dtype]), p.view(_BITS[p.dtype]))
    return torch.equal(rounded, p)


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _version_of(t: Tensor) -> object:
    """t's version counter; for an inference tensor, which has none, a mark equal to
    nothing (such a param counts as written since every step, and its master is
    kept only where it still rounds to the param: rounds_to)."""
    return object() if t.is_inference() else t._version


class WriteMarks:
    """What each param with a master looked like when a step last wrote it: its
    storage (held weakly), address, version counter, shape and strides.  A param
    replaced (``p.data = …``, also by a new storage the allocator put at the old
    address, or by another view of its own storage: ``p.data = p.data.t()``) or
    written in place through autograd's view of it (``with torch.no_grad():
    p.copy_(…)``, ``torch.nn.init``) between steps no longer matches, and the next
    step remakes its master from it, so the step starts from the param's value as
    torch.optim's would.  (A write through ``p.data`` keeps the version counter
    and is not seen.)"""

    def __init__(self):
        self._marks: Dict[int, tuple] = {}

    @staticmethod
    def _mark_of(param: Tensor) -> tuple:
        t = local(param)  # (a DTensor's own version counter is not its local shard's: both are marked)
        return (weakref.ref(t.untyped_storage()), t.data_ptr(), _version_of(t), _version_of(param), tuple(t.shape),
                t.stride())

    def mark(self, params) -> None:
        for p in params:
            self._marks[id(p)] = (p, self._mark_of(p))

    def mark_unmarked(self, params) -> None:
        """Marks the params that have no mark of their own (a master made by this
        step), keeping the others' (a step that found_inf skipped wrote none of
        them: a param written since the last step that ran stays edited)."""
        self.mark([p for p in params if (entry := self._marks.get(id(p))) is None or entry[0] is not p])

    def edited(self, param: Tensor) -> bool:
        entry = self._marks.get(id(param))
        if entry is None or entry[0] is not param:
            return False
        storage, *where = entry[1]
        t = local(param)
        return storage() is not t.untyped_storage() or where != [t.data_ptr(), _version_of(t), _version_of(param),
                                                                 tuple(t.shape), t.stride()]

    def keep(self, ids) -> None:
        """Drops the marks of params whose id is not in ``ids``."""
        self._marks = {key: entry for key, entry in self._marks.items() if key in ids}

    def clear(self) -> None:
        self._marks.clear()

    def mark_masters(self, state: Dict[Tensor, dict]) -> None:
        """Marks, as they are now, the params of ``state`` (an optimizer's) that have a
        master (after a checkpoint is loaded or an optimizer unpickled): the next
        step resumes from the master unless the param is written before it."""
        self.mark([p for p, st in state.items() if isinstance(p, Tensor) and isinstance(st, dict)
                   and MASTER_KEY in st])
