"""Which backend steps a bucket: 'reference' (eager torch ops, any device),
'cpu' (fused C++ kernels), and the GPU backends 'cuda' and 'triton'."""
from __future__ import annotations

import functools
import importlib
from typing import FrozenSet, List, Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.amos_fused)
from . import triton_kernels
from .contracts import algorithms

KNOWN_BACKENDS = ("reference", "cpu", "cuda", "triton")
CAPTURABLE_BACKENDS = ("cuda", "triton")  # in the order None prefers them on CUDA params

@functools.lru_cache(maxsize=None)
def fused_algorithms(backend: str) -> FrozenSet[str]:
    """The algorithms with a fused kernel on an available backend (the reference has
    them all): every algorithm of the compiled step op, and those the Triton
    package launches (this imports triton)."""
    if backend == "triton":
        return frozenset(importlib.import_module("amos_fused.triton_kernels.ops").algorithms())
    return frozenset(algorithms())


@functools.lru_cache(maxsize=None)
def fused_fp8_algorithms(backend: str) -> FrozenSet[str]:
    """The algorithms with a fused FP8-state step (the 8-bit optimizers) on a backend:
    the compiled step_fp8 op's (on CUDA its CUDA kernels'), and those the Triton
    package launches."""
    if backend == "triton":
        return frozenset(importlib.import_module("amos_fused.triton_kernels.ops").fp8_algorithms())
    if backend == "cuda":
        return frozenset(torch.ops.amos_fused.cuda_fp8_algorithms())
    return frozenset(torch.ops.amos_fused.fp8_algorithms())


def _device_types(backend: str):
    """Devices a backend steps (Triton's interpreter steps CPU tensors)."""
    if backend == "triton":
        return ("cuda", "cpu") if triton_kernels.interpreter_requested() else ("cuda",)
    return {"cpu": ("cpu",), "cuda": ("cuda",)}[backend]


def fused_ops(backend: str, prechecked: bool = False):
    """The op namespace of a fused backend: the compiled ops (dispatched on the
    tensors' device) or the Triton ops, which have the same signatures;
    ``prechecked``: for a caller that ran ``check_step`` over each bucket it steps
    (the Triton ops then skip that pass; the compiled ops' own checks are part of
    their single C++ call)."""
    if backend == "triton":
        ops = importlib.import_module("amos_fused.triton_kernels.ops")
        return ops.prechecked if prechecked else ops
    return torch.ops.amos_fused


def _why_unavailable(backend: str) -> Optional[str]:
    """None when the backend can run here, else the reason it cannot."""
    if backend in ("reference", "cpu"):
        return None
    if backend == "cuda":
        if not torch.ops.amos_fused.built_with_cuda():
            return "amos_fused was built without CUDA kernels (the installed torch has no CUDA)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    if backend == "triton":
        missing = triton_kernels.why_unavailable()
        if missing is not None:
            return missing
        if not (torch.cuda.is_available() or triton_kernels.interpreter_requested()):
            return "no CUDA device is visible to torch (and TRITON_INTERPRET=1 is not set)"
        return None
    return f"unknown backend {backend!r}"


def available_backends() -> List[str]:
    """The backends that can run on this machine, e.g. ['reference', 'cpu']."""
    return [name for name in KNOWN_BACKENDS if _why_unavailable(name) is None]


def check_backend(backend: Optional[str], algorithm: str, optimizer: str) -> None:
    """Validates a requested backend at construction (None = choose per device)."""
    if backend is None:
        return
    if backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"{optimizer}: unknown backend {backend!r}; expected one of {KNOWN_BACKENDS} or None"
        )
    reason = _why_unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"{optimizer}: backend {backend!r} is not available: {reason}")
    if backend != "reference" and algorithm not in fused_algorithms(backend):
        raise NotImplementedError(
            f"{optimizer}: backend {backend!r} has no fused {algorithm} kernel; "
            f"use backend='reference' or one of {available_backends()}"
        )


def backend_for(requested: Optional[str], algorithm: str, device: torch.device, optimizer: str,
                fp8: bool = False) -> str:
    """The backend that steps a bucket on ``device``: the requested one (checked
    against the device) or, for None, the fastest available for that device.
    ``fp8``: the bucket's states are FP8 codes (fused_fp8_algorithms)."""
    if requested == "reference":
        return requested
    if requested is not None:
        if device.type not in _device_types(requested):
            raise ValueError(
                f"{optimizer}: backend {requested!r} cannot step parameters on {device}"
            )
        if fp8 and algorithm not in fused_fp8_algorithms(requested):
            raise NotImplementedError(
                f"{optimizer}: backend {requested!r} has no fused {algorithm} kernel with 8-bit states; use "
                f"backend=None (it picks one that has), 'reference' or one of "
                f"{[name for name in available_backends() if name == 'reference' or algorithm in fused_fp8_algorithms(name)]}"
            )
        return requested
    for name in ("cuda", "cpu", "triton"):
        if (
            device.type in _device_types(name)
            and _why_unavailable(name) is None
            and algorithm in (fused_fp8_algorithms(name) if fp8 else fused_algorithms(name))
        ):
            return name
    return "reference"


def capturable_backend(requested: Optional[str], device: torch.device, optimizer: str) -> str:
    """The backend of a capturable step (capturable=True) on ``device``: 'cuda' or
    'triton', the backends whose steps read nothing on the host (requested, or for
    None on a CUDA device the CUDA kernels when built, else Triton; CPU tensors,
    under Triton's interpreter, need 'triton' requested)."""
    if requested in CAPTURABLE_BACKENDS:
        reason = _why_unavailable(requested)
        if reason is None and device.type in _device_types(requested):
            return requested
        raise ValueError(f"{optimizer}: capturable=True steps on the {requested!r} backend, which cannot step "
                         f"parameters on {device}" + (f": {reason}" if reason else ""))
    if requested is None and device.type == "cuda":
        reasons = {name: _why_unavailable(name) for name in CAPTURABLE_BACKENDS}
        for name in CAPTURABLE_BACKENDS:
            if reasons[name] is None:
                return name
        raise ValueError(f"{optimizer}: capturable=True needs the 'cuda' or the 'triton' backend, and neither can "
                         f"run: " + "; ".join(f"{name}: {why}" for name, why in reasons.items()))
    raise ValueError(f"{optimizer}: capturable=True (CUDA-graph capture) needs backend='cuda' or backend='triton' "
                     f"(the backends whose steps read nothing on the host), not {requested or 'the default'!r} for "
                     f"parameters on {device}")


def capturable_ops(backend: str):
    """The module whose ``step_capturable`` steps a bucket of a capturable group on
    ``backend`` ('cuda': amos_fused/capturable.py over the compiled op; 'triton':
    the Triton ops)."""
    if backend == "triton":
        return importlib.import_module("amos_fused.triton_kernels.ops")
    return importlib.import_module("amos_fused.capturable")