"""amos_fused: the whole optimizer step of AdamW, Adam, RAdam, Lion, Amos,
scale-aware AdamW (ScaledAdamW) and LAMB, and of AdamW8bit, Adam8bit, RAdam8bit, Lion8bit and
Amos8bit (block-scaled FP8 moments), in one pass over memory per bucket of parameters, as
fused kernels behind torch.optim-compatible classes.  See README.md."""
import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _C  # noqa: F401  (registers the compiled ops: torch.ops.amos_fused)
from . import fake_kernels  # noqa: F401  (lets torch.compile trace the step ops)
from .amos_helpers import amos_param_groups
from .backends import available_backends
from .norm_scaled import Lamb, ScaledAdamW
from .optim import Adam, AdamW, Amos, Lion, RAdam
from .optim_fp8 import Adam8bit, AdamW8bit, Amos8bit, Lion8bit, RAdam8bit
from .theory import half_life_p

__all__ = [
    "Adam", "Adam8bit", "AdamW", "AdamW8bit", "Amos", "Amos8bit", "Lamb", "Lion", "Lion8bit", "RAdam", "RAdam8bit", "ScaledAdamW",
    "amos_param_groups", "available_backends", "half_life_p",
]
__version__ = "0.1.0"
