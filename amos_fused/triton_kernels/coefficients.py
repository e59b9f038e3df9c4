"""Per-step, per-tensor scalars of each algorithm, computed on the host in double
from the tensors' step counts (as csrc/step_coefficients.h does), then rounded
once to the compute dtype and uploaded as one small table per launch.  Each
table has one row per tensor, its columns in the order of the ``*_COLUMNS``
tuple of the matching math module."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .amos_math import AMOS_COLUMNS
from .common import coefficient_table


def amos(steps: Tensor, etas: Sequence[float], lr, beta, momentum, clip_value, extra_l2, d_coef,
         c_coef, epsilon, grad_unscale) -> Tensor:
    """Amos, per tensor of scale η at step t (momentum / clip_value None → 0)."""
    alpha = lr * torch.tensor(etas, dtype=torch.float64)
    momentum = 0.0 if momentum is None else momentum
    return coefficient_table(AMOS_COLUMNS, dict(
        beta=beta, beta_complement=1.0 - beta, bias_correction=1.0 - torch.pow(beta, steps),
        epsilon=epsilon, c_scale=c_coef * math.sqrt(lr), lr_sq=lr * lr, alpha=alpha,
        d_scale=d_coef * alpha.sqrt(), extra_l2=extra_l2,
        clip=0.0 if clip_value is None else clip_value,
        momentum=momentum, momentum_complement=1.0 - momentum, grad_unscale=grad_unscale,
    ), len(steps))
