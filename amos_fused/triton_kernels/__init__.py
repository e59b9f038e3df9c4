"""Triton kernels of the amos_fused steps: one launch per bucket and
phase, on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before this package's kernels are first imported).

Importing this package does not import triton; ``amos_fused.triton_kernels.ops``
(``step``, mirroring ``torch.ops.amos_fused.step``) does.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional


def why_unavailable() -> Optional[str]:
    """None when triton can be imported, else why not (does not import it)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET=1: kernels then step CPU tensors instead of CUDA ones."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
