"""Input checks of the Triton ops, run before anything is written (mirrors
csrc/checks.cpp; grads are checked by the compiled ``check_grads`` op)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

import amos_fused  # noqa: F401  (registers torch.ops.amos_fused)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# amos_fused::GradProblem (csrc/checks.h)
_GRAD_PROBLEMS = {1: "is sparse", 2: "has another dtype", 3: "is on another device",
                  4: "has another shape", 5: "has other strides"}


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def is_dense(t: Tensor) -> bool:
    """True when t's elements fill one block of memory without gaps or overlap
    (any dim order): what the kernels walk from ``data_ptr()``."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


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


def _first_mismatch(params: Sequence[Tensor], tensors: Sequence[Optional[Tensor]]):
    """(missing, index of the first tensor unlike its param or -1, GradProblem), in C++."""
    return torch.ops.amos_fused.check_grads(list(params), list(tensors))


def check_bucket(op: str, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                 states: Dict[str, Sequence[Tensor]], steps: Sequence[Tensor]) -> None:
    """params dense, of one supported dtype and one device; every grad and state
    tensor shaped and laid out like its param; steps float32 CPU scalars.  An empty
    state list is not checked (that state is not used by the call)."""
    n = len(params)
    if n == 0:
        raise ValueError(f"{op}: empty bucket")
    if len(grads) != n:
        raise ValueError(f"{op}: {n} params but {len(grads)} grads")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: params of dtype {dtype} are not supported "
                        "(float32, float64, bfloat16, float16)")
    check_device(op, device)
    for i, p in enumerate(params):
        if p.dtype != dtype:
            raise TypeError(f"{op}: params[{i}] has dtype {p.dtype} but params[0] has {dtype}")
        if p.device != device:
            raise ValueError(f"{op}: params[{i}] is on {p.device} but params[0] is on {device}")
        if not (p.is_contiguous() or is_dense(p)):
            raise ValueError(f"{op}: params[{i}] is not dense in memory (a strided view?)")
    missing, bad, problem = _first_mismatch(params, grads)
    if missing:
        index = next(i for i, g in enumerate(grads) if g is None)
        raise ValueError(f"{op}: grads[{index}] is None")
    if bad >= 0:
        raise ValueError(f"{op}: grads[{bad}] ({_describe(grads[bad])}) "
                         f"{_GRAD_PROBLEMS.get(problem, 'does not match')}: it does not match "
                         f"its param ({_describe(params[bad])})")
    for name, tensors in states.items():
        if len(tensors) == 0:
            continue
        if len(tensors) != n:
            raise ValueError(f"{op}: {n} params but {len(tensors)} {name}")
        _, bad, _ = _first_mismatch(params, tensors)  # dtype, device, shape, strides
        if bad >= 0:
            raise ValueError(f"{op}: {name}[{bad}] ({_describe(tensors[bad])}) does not match "
                             f"its param ({_describe(params[bad])})")
    if len(steps) != 0:
        if len(steps) != n:
            raise ValueError(f"{op}: {n} params but {len(steps)} steps")
        for i, s in enumerate(steps):
            if not (s.numel() == 1 and s.dtype == torch.float32 and s.is_cpu):
                raise ValueError(f"{op}: steps[{i}] must be a float32 CPU scalar, got {_describe(s)}")


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
