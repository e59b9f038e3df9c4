"""Input checks of the Triton ops, run before anything is written: the C++
checks of csrc/checks.h (the ``check_step`` op) plus what only Triton needs."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..checks import Problem, Walk, check_step

_DESCRIBE_PROBLEM = {
    Problem.GRAD_SPARSE: "grads[{i}] is sparse",
    Problem.GRAD_DTYPE: "grads[{i}] has another dtype than its param",
    Problem.GRAD_DEVICE: "grads[{i}] is on another device than its param",
    Problem.GRAD_SHAPE: "grads[{i}] has another shape than its param",
    Problem.GRAD_LAYOUT: "grads[{i}] has other strides than its param",
    Problem.PARAM_DTYPE: "params[{i}] has an unsupported dtype (float32, float64, bfloat16, float16)",
    Problem.PARAM_MIXED: "params[{i}] has another dtype or device than params[0]",
    Problem.PARAM_LAYOUT: "params[{i}] is not dense in memory (a strided view?)",
    Problem.STATE: "{name}[{i}] does not match its param",
    Problem.STEP: "steps[{i}] must be a float32 CPU scalar",
    Problem.OVERLAP: "params[{i}] shares memory with another param",
}


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def kernels_interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when
    they were first imported): they then step CPU tensors."""
    from .kernel_helpers import INTERPRETED

    return bool(INTERPRETED.value)


def check_device(op: str, device: torch.device) -> None:
    if kernels_interpreted():
        if device.type != "cpu":
            raise ValueError(f"{op}: Triton's interpreter (TRITON_INTERPRET=1) steps CPU tensors, "
                             f"got tensors on {device}")
    elif device.type != "cuda":
        raise ValueError(f"{op}: the Triton kernels step CUDA tensors, got tensors on {device} "
                         "(CPU tensors need TRITON_INTERPRET=1)")


def check_bucket(op: str, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                 states: Dict[str, Sequence[Tensor]], steps: Sequence[Tensor]) -> None:
    """The C++ checks of csrc/checks.h (one pass): params dense, of one supported
    dtype and one device, not overlapping; every grad and state tensor shaped and
    laid out like its param; steps float32 CPU scalars.  An empty state list is
    not checked (that state is not used by the call)."""
    n = len(params)
    if n == 0:
        raise ValueError(f"{op}: empty bucket")
    if len(grads) != n:
        raise ValueError(f"{op}: {n} params but {len(grads)} grads")
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise ValueError(f"{op}: grads[{missing[0]}] is None")
    check_device(op, params[0].device)
    names = [name for name, tensors in states.items() if len(tensors)]
    for name in names:
        if len(states[name]) != n:
            raise ValueError(f"{op}: {n} params but {len(states[name])} {name}")
    if len(steps) not in (0, n):
        raise ValueError(f"{op}: {n} params but {len(steps)} steps")
    bad, problem, which = check_step(list(params), list(grads), [list(states[k]) for k in names], [],
                                     list(steps), Walk.DENSE)
    if problem != Problem.NONE:
        error = TypeError if problem in (Problem.PARAM_DTYPE, Problem.PARAM_MIXED) else ValueError
        name = names[which] if problem == Problem.STATE else ""
        raise error(f"{op}: " + _DESCRIBE_PROBLEM[problem].format(i=bad, name=name)
                    + f" (params[{bad}]: {_describe(params[bad])})")


def require(op: str, **lists: Sequence[Tensor]) -> None:
    """The named lists must not be empty."""
    empty = [name for name, values in lists.items() if len(values) == 0]
    if empty:
        raise ValueError(f"{op}: {', '.join(lists)} are required (empty: {', '.join(empty)})")


def check_slots(op: str, params: Sequence[Tensor], slots: Sequence[Tensor], name: str) -> None:
    """Amos v / b: contiguous, of the param's dtype and device; params contiguous."""
    if len(slots) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(slots)} {name}")
    for i, (s, p) in enumerate(zip(slots, params)):
        if not (s.dtype == p.dtype and s.device == p.device and s.is_contiguous()):
            raise ValueError(f"{op}: {name}[{i}] must be a contiguous {p.dtype} tensor on "
                             f"{p.device}, got {s.dtype} on {s.device}")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")


def read_grad_scaling(op: str, grad_scale: Optional[Tensor],
                      found_inf: Optional[Tensor]) -> Tuple[bool, float]:
    """GradScaler inputs, read on the host: (skip the step?, factor for the grads)."""
    skip, unscale = False, 1.0
    if found_inf is not None:
        if not (found_inf.numel() == 1 and found_inf.is_floating_point()):
            raise ValueError(f"{op}: found_inf must be a one-element floating tensor, got "
                             f"{found_inf.dtype} {list(found_inf.shape)}")
        skip = float(found_inf) != 0.0
    if grad_scale is not None:
        if not (grad_scale.numel() == 1 and grad_scale.is_floating_point()):
            raise ValueError(f"{op}: grad_scale must be a one-element floating tensor, got "
                             f"{grad_scale.dtype} {list(grad_scale.shape)}")
        scale = float(grad_scale)
        unscale = 1.0 / scale if scale != 0.0 else math.copysign(math.inf, scale)  # as in C++
    return skip, unscale
