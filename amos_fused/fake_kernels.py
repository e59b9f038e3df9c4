"""Fake (meta) kernels of the step ops, so that ``torch.compile`` and other
tracers can trace a call of them: every step op only mutates its inputs in
place and returns nothing, so its fake kernel does nothing."""
import torch

from . import _C  # noqa: F401  (registers the compiled ops: torch.ops.amos_fused)

STEP_OPS = ("adam_step", "radam_step", "lion_step", "amos_step", "scaled_adam_step", "lamb_step")


def _no_output(*args, **kwargs) -> None:
    return None


for _name in STEP_OPS + ("stream_floor",):  # stream_floor: the benchmark's bandwidth floor
    torch.library.register_fake(f"amos_fused::{_name}", _no_output)
