"""The host side of capturable steps (``capturable=True``), shared by the backends
that have them: the checks of a call's device arguments, the advance of the step
counters by 1 unless found_inf is set, and the CUDA backend's step
(``torch.ops.amos_fused.step_capturable``).  Nothing here reads a tensor's value
on the host, so a step can be captured in a CUDA graph and replayed, as torch's
``capturable`` optimizers can.

Both backends take the per-step coefficients as a float64 table computed on the
params' device (device_coefficients.py, the formulas of the C++ prologue), and
their kernels read GradScaler's ``found_inf`` and return without writing when it
is set."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.amos_fused)
from . import device_coefficients
from .contracts import algorithms, contract

# The namespace of the compiled step_capturable op (CUDA tensors dispatch to
# csrc/cuda/step_op.cu); tools/cuda_emulation points it at the emulated ops.
compiled_ops = torch.ops.amos_fused


def check_on_device(op: str, name: str, t: object, device: torch.device, dtype: Optional[torch.dtype],
                    real: bool = False) -> None:
    """A one-element tensor on ``device``: of ``dtype``, else floating (any real
    number type when ``real``)."""
    is_real = isinstance(t, Tensor) and not t.is_complex() and t.dtype != torch.bool
    if not (isinstance(t, Tensor) and t.numel() == 1 and t.device == device
            and (t.dtype == dtype if dtype is not None else t.is_floating_point() or (real and is_real))):
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
        kind = str(dtype).replace("torch.", "") if dtype is not None else "real" if real else "floating"
        raise ValueError(f"{op}: {name} must be a one-element {kind} tensor on {device} (a "
                         f"capturable step reads nothing on the host), got {got}")


def check_algorithm(algorithm: str, known: List[str]) -> None:
    """``algorithm`` has a capturable step on the backend whose ``known`` ones these are."""
    if algorithm not in known:
        raise ValueError(f"amos_fused: no capturable step for {algorithm!r} (known: {', '.join(known)})")


def check_hyper_names(op: str, algorithm: str, hyper: Mapping[str, object]) -> None:
    names = contract(algorithm).hyper
    if set(hyper) != set(names):
        raise ValueError(f"{op}: expected the hyper-parameters {', '.join(names)}, got {', '.join(hyper)}")


def check_device_arguments(op: str, params: Sequence[Tensor], steps: Sequence[Tensor], hyper: Mapping[str, object],
                           grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """The step counters (one-element float32 tensors), ``grad_scale``,
    ``found_inf`` and a tensor ``lr``: all on the params' device.  ``params``
    non-empty."""
    device = params[0].device
    if len(steps) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(steps)} steps")
    for i, s in enumerate(steps):
        check_on_device(op, f"steps[{i}]", s, device, torch.float32)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            check_on_device(op, name, t, device, None)
    if isinstance(hyper["lr"], Tensor):
        check_on_device(op, "lr", hyper["lr"], device, None, real=True)


def host_hyper(hyper: Mapping[str, object]) -> dict:
    """The hyper-parameters as the kernels' launch choices see them: floats, a
    tensor (``lr``, read on the device through the coefficient table) as 1.0."""
    return {name: (1.0 if isinstance(value, Tensor) else float(value)) for name, value in hyper.items()}


def advance_counters(steps: Sequence[Tensor], found_inf: Optional[Tensor]) -> None:
    """Every counter + 1 where found_inf is 0 (GradScaler may sum it over devices:
    any other value skips the step, and the counts stay), on the device; after the
    launch, so a failed one leaves them as they were."""
    steps = list(steps)
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
        return
    # One tensor per counter (the TensorList overload): a 0-dim tensor where a Scalar
    # is also accepted can be taken as a Scalar, read on the host (a sync).
    increment = (found_inf == 0).to(torch.float32).reshape(())
    torch._foreach_add_(steps, [increment] * len(steps))


def capturable_algorithms() -> List[str]:
    """The algorithms of the CUDA backend's capturable step."""
    return [name for name in algorithms() if name in device_coefficients.algorithms()]


def step_capturable(algorithm: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
                    steps: List[Tensor], hyper: Mapping[str, object], per_tensor: Sequence[float],
                    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """One capturable step of ``algorithm`` over a bucket of CUDA params with the
    CUDA kernels (the signature of the Triton backend's ``ops.step_capturable``):
    ``steps`` float32 one-element counters on the params' device, ``hyper`` by the
    contract's names (``lr`` a number or a one-element tensor there),
    ``grad_scale`` / ``found_inf`` GradScaler's, there.  The C++ op checks the
    bucket and its states before any write; its kernels read the coefficient table
    and found_inf on the device."""
    check_algorithm(algorithm, capturable_algorithms())
    op = f"amos_fused.cuda.{algorithm}_step_capturable"
    check_hyper_names(op, algorithm, hyper)
    if params:
        check_device_arguments(op, params, steps, hyper, grad_scale, found_inf)
    elif steps:
        raise ValueError(f"{op}: 0 params but {len(steps)} steps")
    names = contract(algorithm).hyper
    floats = host_hyper(hyper)
    coef = (device_coefficients.coefficient_table(algorithm, steps, hyper, per_tensor, grad_scale,
                                                  float32_math=params[0].dtype != torch.float64) if params
            else torch.empty(0, len(contract(algorithm).columns), dtype=torch.float64, device="cpu"))
    skip = None if found_inf is None else found_inf.to(torch.float32).reshape(1)
    compiled_ops.step_capturable(algorithm, list(params), list(grads), list(states),
                                 [floats[name] for name in names], [float(x) for x in per_tensor], coef, skip)
    if params:
        advance_counters(steps, found_inf)
