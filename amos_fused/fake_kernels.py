"""Fake (meta) kernels of the in-place ops, so that ``torch.compile`` and other
tracers can trace a call of them: the step op (and the benchmark's bandwidth
floor, ``stream_floor``, and the FP8-state step ``step_fp8``) only mutate their inputs in place and return nothing,
so their fake kernels do nothing."""
import torch

from . import _C  # noqa: F401  (registers the compiled ops: torch.ops.amos_fused)


def _no_output(*args, **kwargs) -> None:
    return None


for _name in ("step", "step_fp8", "stream_floor"):
    torch.library.register_fake(f"amos_fused::{_name}", _no_output)
