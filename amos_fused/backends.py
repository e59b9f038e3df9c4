"""Which backend steps a bucket: 'reference' (eager torch ops, any device),
'cpu' (fused C++ kernels), and the GPU backends 'cuda' and 'triton'."""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.amos_fused)

KNOWN_BACKENDS = ("reference", "cpu", "cuda", "triton")

# Algorithms with a fused kernel, per backend (the reference has them all).
FUSED_ALGORITHMS: Dict[str, FrozenSet[str]] = {
    "cpu": frozenset({"adam", "radam", "lion", "amos", "scaled_adam", "lamb"}),
    "cuda": frozenset(),
    "triton": frozenset(),
}

# Devices each backend steps.
_DEVICE_TYPES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


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
        return "amos_fused has no Triton kernels in this build"
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
    if backend != "reference" and algorithm not in FUSED_ALGORITHMS[backend]:
        raise NotImplementedError(
            f"{optimizer}: backend {backend!r} has no fused {algorithm} kernel; "
            f"use backend='reference' or one of {available_backends()}"
        )


def backend_for(requested: Optional[str], algorithm: str, device: torch.device, optimizer: str) -> str:
    """The backend that steps a bucket on ``device``: the requested one (checked
    against the device) or, for None, the fastest available for that device."""
    if requested == "reference":
        return requested
    if requested is not None:
        if device.type not in _DEVICE_TYPES[requested]:
            raise ValueError(
                f"{optimizer}: backend {requested!r} cannot step parameters on {device}"
            )
        return requested
    for name in ("cuda", "triton", "cpu"):
        if (
            device.type in _DEVICE_TYPES[name]
            and algorithm in FUSED_ALGORITHMS[name]
            and _why_unavailable(name) is None
        ):
            return name
    return "reference"
