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
from .common import coefficient_table, lerp_small_flag
from .norm_scaled_math import MOMENT_COLUMNS


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


def _moments(steps, beta1, beta2, eps, weight_decay, bias_correction, grad_unscale, k_scale, rho):
    ones = torch.ones_like(steps)
    bc1 = 1.0 - torch.pow(beta1, steps) if bias_correction else ones
    bc2 = 1.0 - torch.pow(beta2, steps) if bias_correction else ones
    return coefficient_table(MOMENT_COLUMNS, dict(
        beta1_complement=1.0 - beta1, beta2=beta2, beta2_complement=1.0 - beta2, eps=eps,
        bc1=bc1, bc2_sqrt=bc2.sqrt(), weight_decay=weight_decay, grad_unscale=grad_unscale,
        k_scale=k_scale, rho=rho, lerp_small=lerp_small_flag(beta1),
    ), len(steps))


def scaled_schedule(steps: Tensor, lr, p, inverse_time) -> Tensor:
    """Scale-aware Adam's s(t): 1/(2·α0·p·t + 1) (inverse_time) or 1/(α0·p·t + 1)²
    (inverse_square)."""
    if inverse_time:
        return 1.0 / (2.0 * lr * p * steps + 1.0)
    return 1.0 / ((lr * p * steps + 1.0) * (lr * p * steps + 1.0))


def scaled_adam(steps: Tensor, init_norms: Sequence[float], lr, beta1, beta2, eps, p,
                inverse_time, q, grad_unscale) -> Tensor:
    """Scale-aware Adam: k = α0·‖ε0‖·s(t)/‖u‖ (the ‖u‖ part on the device),
    ρ = α0²/(2q)·s(t)."""
    s = scaled_schedule(steps, lr, p, inverse_time)
    norms = torch.tensor(init_norms, dtype=torch.float64)
    return _moments(steps, beta1, beta2, eps, 0.0, True, grad_unscale,
                    k_scale=lr * norms * s, rho=lr * lr / (2.0 * q) * s)


def lamb(steps: Tensor, lr, beta1, beta2, eps, weight_decay, bias_correction,
         grad_unscale) -> Tensor:
    """LAMB: k = η·‖θ‖/‖u‖ (the norms on the device), ρ = 0."""
    return _moments(steps, beta1, beta2, eps, weight_decay, bias_correction, grad_unscale,
                    k_scale=lr, rho=0.0)
