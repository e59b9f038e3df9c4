"""The fake (meta) kernel of the step op, so that ``torch.compile`` and other
tracers can trace a call of it: the op only mutates its inputs in place and
returns nothing, so its fake kernel does nothing."""
import torch

from . import _C  # noqa: F401  (registers the compiled ops: torch.ops.amos_fused)

def _no_output(*args, **kwargs) -> None:
    return None

torch.library.register_fake("amos_fused::step", _no_output)
