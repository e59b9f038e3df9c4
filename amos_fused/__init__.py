"""amos_fused: the whole optimizer step of AdamW, Adam, RAdam, Lion and Amos in one
pass over memory per bucket of parameters, as fused kernels behind
torch.optim-compatible classes.  See README.md and DESIGN.md."""
import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _C  # noqa: F401  (registers the compiled ops: torch.ops.amos_fused)
from .backends import available_backends
from .optim import Adam, AdamW, Amos, Lion, RAdam

__all__ = ["Adam", "AdamW", "Amos", "Lion", "RAdam", "available_backends"]
__version__ = "0.1.0"
