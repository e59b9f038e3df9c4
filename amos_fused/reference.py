"""Eager reference implementation of every algorithm: the ground truth of all tests.

One function per algorithm; each steps ONE tensor in place with plain torch ops,
written to read like the equations of each algorithm's paper (cited in each docstring),
not like the kernels.  It runs in the tensors' own dtype for float32/float64;
bfloat16/float16 tensors are computed in float32 and rounded back when stored,
which is what the fused kernels do.  ``step`` is the 1-based step count AFTER
the increment (the caller advances its counter first).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import rounded_once
from .amos_slots import ReduceAxes, reduced_dims
from .deterministic_sums import fixed_order_mean, norm

_REDUCED = (torch.bfloat16, torch.float16)


def _load(t: Tensor) -> Tensor:
    """The working value of a stored tensor (float32 for reduced precision)."""
    return t.float() if t.dtype in _REDUCED else t.clone()


def _store(dst: Tensor, value: Tensor) -> None:
    dst.copy_(value)


def _sqrt(x: Tensor) -> Tensor:
    """sqrt(x) correctly rounded, as the kernels' (IEEE) square root: torch's float32
    sqrt on CPU is not always (a vector math library's), so there float32 goes
    through float64, whose root rounds to float32 correctly (53 ≥ 2·24 + 2 bits);
    a CUDA float32 sqrt is correctly rounded already."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return x.double().sqrt().to(torch.float32)
    return x.sqrt()


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    bias_correction: bool = True,
    beta1_weight: Optional[float] = None,
) -> None:
    """Adam / AdamW (Kingma & Ba, arXiv:1412.6980; Loshchilov & Hutter, arXiv:1711.05101)::

        g ← g + λθ                        (L2, when not decoupled)
        m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,  v̂max ← max(v̂max, v) (amsgrad)
        u = (m/bc1) / (sqrt(v/bc2) + ε),  bc1 = 1−β1^t, bc2 = 1−β2^t (1 without bias correction)
        θ ← θ·(1−ηλ) (decoupled);  θ ← θ − η·u

    Non-finite values propagate elementwise (a NaN/Inf in g or θ reaches only its own
    element; ε = 0 with g = 0 gives 0/0 = NaN there).  ``beta1_weight``: m's weight
    1 − β1 where it is not 1 − β1 itself (torch.optim takes a Tensor β1 cast to the
    param's dtype there, and β1 itself in bc1); None: 1 − β1.
    """
    if beta1_weight is None:
        beta1_weight = 1 - beta1
    theta, g, m, v = _load(param), _load(grad), _load(exp_avg), _load(exp_avg_sq)
    if weight_decay != 0 and not decoupled:
        g = rounded_once.add_scaled(g, theta, weight_decay)  # g + λθ, rounded like torch (one fma)
    if weight_decay != 0 and decoupled:
        theta = theta * (1 - lr * weight_decay)
    m = rounded_once.lerp(m, g, beta1_weight)  # β1·m + (1−β1)·g, in torch's lerp form
    v = rounded_once.addcmul(v * beta2, g, g, 1 - beta2)  # β2·v + (1−β2)·g², as torch rounds it
    second = v
    if amsgrad:
        second = torch.maximum(_load(max_exp_avg_sq), v)
        _store(max_exp_avg_sq, second)
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    denom = _sqrt(second) / math.sqrt(bc2) + eps
    theta = theta + (m * (-lr / bc1)) / denom  # θ − η·u, rounded as torch's CPU addcdiv(θ, m, denom, −η/bc1)
    _store(exp_avg, m)
    _store(exp_avg_sq, v)
    _store(param, theta)


def radam_rectification(step: int, beta2: float, threshold: float) -> Optional[float]:
    """RAdam's r_t (Liu et al., arXiv:1908.03265), or None when ρ_t ≤ threshold::

    ρ∞ = 2/(1−β2) − 1,  ρt = ρ∞ − 2·t·β2^t/(1−β2^t),
    r = sqrt((ρt−4)(ρt−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρt))
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if rho_t <= threshold:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def radam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    rectify_threshold: float = 5.0,
) -> None:
    """RAdam (Liu et al., arXiv:1908.03265)::

        m, v as in Adam;  u = r·(m/bc1)·sqrt(bc2)/(sqrt(v)+ε) if ρt > threshold else m/bc1
        θ ← θ − η·u   (decay: L2 on g, or θ·(1−ηλ) when decoupled)

    Non-finite values propagate elementwise, as in Adam.
    """
    theta, g, m, v = _load(param), _load(grad), _load(exp_avg), _load(exp_avg_sq)
    if weight_decay != 0 and not decoupled:
        g = rounded_once.add_scaled(g, theta, weight_decay)  # g + λθ, rounded like torch (one fma)
    if weight_decay != 0 and decoupled:
        theta = theta * (1 - lr * weight_decay)
    m = rounded_once.lerp(m, g, 1 - beta1)  # β1·m + (1−β1)·g, in torch's lerp form
    v = rounded_once.addcmul(v * beta2, g, g, 1 - beta2)  # β2·v + (1−β2)·g², as torch rounds it
    m_hat = m / (1 - beta1**step)
    r = radam_rectification(step, beta2, rectify_threshold)
    step_size = m_hat * lr  # η·u, in torch's order: ((m̂·η)·sqrt(bc2)/(sqrt(v)+ε))·r
    if r is not None:
        denom = _sqrt(v) + eps
        # sqrt(bc2)/denom as torch.optim.RAdam computes it (number / tensor: the
        # tensor's reciprocal times the number, two roundings)
        step_size = step_size * (denom.reciprocal() * math.sqrt(1 - beta2**step)) * r
    theta = theta - step_size
    _store(exp_avg, m)
    _store(exp_avg_sq, v)
    _store(param, theta)


def lion_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion (Chen et al., arXiv:2302.06675) / SignSGDM-W: sign momentum with decoupled
    weight decay, as in Su Jianlin's kexue.fm post on AdamW's weight RMS::

    c = β1·m + (1−β1)·g;  θ ← θ·(1−ηλ) − η·sign(c);  m ← β2·m + (1−β2)·g

    Non-finite values: torch.sign(NaN) = 0, so a NaN in c only decays θ (θ stays
    finite; m turns NaN); ±Inf in c is a step of ∓η; NaN in θ stays in its element.
    """
    theta, g, m = _load(param), _load(grad), _load(exp_avg)
    c = beta1 * m + (1 - beta1) * g
    theta = theta * (1 - lr * weight_decay) - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    _store(exp_avg, m)
    _store(param, theta)



def amos_step(
    param: Tensor,
    grad: Tensor,
    v: Tensor,
    b: Tensor,
    mu: Optional[Tensor],
    step: int,
    *,
    lr: float,
    eta: float,
    reduce_axes: ReduceAxes,
    beta: float = 0.999,
    momentum: Optional[float] = None,
    clip_value: Optional[float] = None,
    extra_l2: float = 0.0,
    d_coef: float = 0.25,
    c_coef: float = 0.25,
    epsilon: float = 2.0**-125,
) -> None:
    """Amos (Tian & Parikh, arXiv:2210.11693; semantics of google-research/jestimator's
    amos.py)::

        g ← clamp(g, −clip, clip)
        g2 = mean(g², reduce_axes, keepdims);  v ← β·v + (1−β)·g2
        r = (1−β^t)/max(v, ε);  c = 1/sqrt(1 + c_coef·sqrt(ξ)·b);  γ = c·ξ²·r·g2
        α = ξ·η;  d = 1/(1 + d_coef·sqrt(α)·b)
        Δ = d·((−½γ − extra_l2)·θ − α·sqrt(r)·g)      (old b, pre-update θ)
        b ← b + γ·(1+b);  mu ← momentum·mu + (1−momentum)·Δ, Δ ← mu;  θ ← θ + Δ

    Non-finite values propagate through the slot: a NaN/Inf in g reaches every element
    of its slot via g2 (and v, b for later steps); NaN in θ stays in its element.
    """
    if param.numel() == 0:
        return
    theta, g = amos_grad(param, grad, clip_value=clip_value)
    dims = reduced_dims(reduce_axes, g.dim())
    # (any thread count: the same bits; squares too large for float32 are taken in float64,
    # as the CPU kernels redo a block whose float32 squares overflow)
    g2 = fixed_order_mean(squares(g), dims).to(g.dtype) if dims else g * g
    amos_apply(param, v, b, mu, theta, g, g2, step, lr=lr, eta=eta, beta=beta, momentum=momentum,
               extra_l2=extra_l2, d_coef=d_coef, c_coef=c_coef, epsilon=epsilon)


def amos_grad(param: Tensor, grad: Tensor, *, clip_value: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Amos's inputs as values: θ and the clipped gradient."""
    g = _load(grad)
    return _load(param), g if clip_value is None else g.clamp(-clip_value, clip_value)


def squares(g: Tensor) -> Tensor:
    """g² in g's dtype, or in float64 where a finite g's square overflows it (|g| past
    about 1.8e19 in float32): a slot's mean g² may still fit."""
    squares = g * g
    if g.dtype != torch.float64:
        overflow = torch.isinf(squares) & torch.isfinite(g)
        if bool(overflow.any()):
            squares = squares.double()
            squares[overflow] = g.double()[overflow].square()
    return squares


def amos_apply(param: Tensor, v: Tensor, b: Tensor, mu: Optional[Tensor], theta: Tensor, g: Tensor, g2: Tensor,
               step: int, *, lr: float, eta: float, beta: float, momentum: Optional[float], extra_l2: float,
               d_coef: float, c_coef: float, epsilon: float) -> None:
    """Amos given g2, the mean of g² over each slot's elements (any shape that holds
    the slot's elements); updates and stores v, b, mu and θ."""
    v_, b_ = _load(v), _load(b)
    g2 = g2.reshape(v_.shape)
    v_ = beta * v_ + (1 - beta) * g2
    floor = v_.clamp_min(epsilon)
    r = torch.full_like(floor, 1 - beta**step) / floor  # a true division (number / tensor would take 1/v first,
    # which overflows for a v below ~2.9e-39 in float32)
    c = 1 / torch.sqrt(1 + c_coef * math.sqrt(lr) * b_)
    gamma = c * (lr * lr) * r * g2  # (lr * lr: a finite lr past 1e154 gives inf, as in C++, not an OverflowError)
    alpha = lr * eta
    d = 1 / (1 + d_coef * math.sqrt(alpha) * b_)
    delta = d * ((-0.5 * gamma - extra_l2) * theta - alpha * torch.sqrt(r) * g)
    b_ = b_ + gamma * (1 + b_)
    if momentum is not None:
        m = momentum * _load(mu) + (1 - momentum) * delta
        _store(mu, m)
        delta = m
    _store(v, v_)
    _store(b, b_)
    _store(param, theta + delta)


def scaled_lr_schedule(step: int, lr: float, p: float, decay: str) -> float:
    """s(t) of scale-aware Adam (Su Jianlin's post on kexue.fm, 2022-11-22):
    'inverse_square' = 1/(α0·p·t + 1)² (constant p, eq. alpha-rho-3 of that post) or
    'inverse_time' = 1/(2·α0·p0·t + 1) (dynamic p, eq. alpha-rho-4)."""
    if decay == "inverse_square":
        x = lr * p * step + 1.0
        return 1.0 / (x * x)
    if decay == "inverse_time":
        return 1.0 / (2.0 * lr * p * step + 1.0)
    raise ValueError(f"decay must be 'inverse_square' or 'inverse_time', got {decay!r}")


def _adam_direction(g, m, v, step, beta1, beta2, eps, bias_correction):
    """Updates m, v (values) and returns Adam's direction u = (m/bc1)/(sqrt(v/bc2)+ε)."""
    m = rounded_once.lerp(m, g, 1 - beta1)  # β1·m + (1−β1)·g, in torch's lerp form
    v = rounded_once.addcmul(v * beta2, g, g, 1 - beta2)  # β2·v + (1−β2)·g², as torch rounds it
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    return m, v, (m / bc1) / (_sqrt(v) / math.sqrt(bc2) + eps)


def scaled_adam_direction(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *,
                          beta1: float, beta2: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 1 of scale-aware Adam: (θ, m, v, u) as values; nothing is stored."""
    m, v, u = _adam_direction(_load(grad), _load(exp_avg), _load(exp_avg_sq), step, beta1, beta2, eps, True)
    return _load(param), m, v, u


def scaled_adam_apply(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, theta: Tensor, m: Tensor, v: Tensor,
                      u: Tensor, u_norm: float, step: int, *, lr: float, init_norm: float, p: float,
                      decay: str = "inverse_square", q: float = 1.0) -> None:
    """Phase 2 of scale-aware Adam given ‖u‖: θ ← θ − (k·u + ρ·θ); stores θ, m, v."""
    s = scaled_lr_schedule(step, lr, p, decay)
    rho = (lr * lr) / (2 * q) * s
    _store(exp_avg, m)
    _store(exp_avg_sq, v)
    _store(param, theta - (_scaled_by_norm(u, lr * init_norm * s, u_norm) + rho * theta))


def _scaled_by_norm(u: Tensor, numerator: float, u_norm: float) -> Tensor:
    """k·u with k = numerator/‖u‖ (0 when ‖u‖ is not > 0), k rounded to u's dtype first
    as the fused kernels take their per-tensor k.  Where that k is beyond the dtype's
    range (‖u‖ tiny against the numerator), (u/‖u‖)·numerator is taken in float64 and
    rounded once: each |u_i|/‖u‖ ≤ 1, so the product stays as finite as the
    numerator, and a zero u_i gives 0, not 0·Inf = NaN."""
    if not u_norm > 0:
        return u * 0.0
    k = numerator / u_norm
    if abs(k) <= torch.finfo(u.dtype).max:
        return u * k
    return ((u.to(torch.float64) / u_norm) * numerator).to(u.dtype)


def scaled_adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    init_norm: float,
    p: float,
    decay: str = "inverse_square",
    q: float = 1.0,
) -> None:
    """Scale-aware Adam derived from Amos (Su Jianlin, kexue.fm, 2022-11-22)::

        u = m̂/(sqrt(v̂)+ε);  α_t = α0·‖ε0‖/‖u‖·s(t);  ρ_t = α0²/(2q)·s(t)
        θ ← θ − (α_t·u + ρ_t·θ)        (‖ε0‖ = init_norm = sqrt(numel)·σ)

    Non-finite values: the scale is k = α0·‖ε0‖·s(t)/‖u‖ when ‖u‖ > 0, else 0 (also
    for a NaN ‖u‖), and θ ← θ − (k·u + ρθ), so a NaN/Inf in u reaches θ only at its
    own element (0·NaN = 0·Inf = NaN); ε = 0 with g = 0 makes u, hence θ, all NaN.
    """
    theta, m, v, u = scaled_adam_direction(param, grad, exp_avg, exp_avg_sq, step, beta1=beta1, beta2=beta2,
                                           eps=eps)
    u_norm = norm(u)  # in a fixed order: any thread count
    scaled_adam_apply(param, exp_avg, exp_avg_sq, theta, m, v, u, u_norm, step, lr=lr, init_norm=init_norm, p=p,
                      decay=decay, q=q)


def lamb_direction(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *,
                   beta1: float, beta2: float, eps: float, weight_decay: float,
                   bias_correction: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 1 of LAMB: (θ, m, v, u = m̂/(sqrt(v̂)+ε) + λθ) as values; nothing is stored."""
    theta = _load(param)
    m, v, u = _adam_direction(_load(grad), _load(exp_avg), _load(exp_avg_sq), step, beta1, beta2, eps,
                              bias_correction)
    return theta, m, v, u + weight_decay * theta


def lamb_apply(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, theta: Tensor, m: Tensor, v: Tensor,
               u: Tensor, theta_norm: float, u_norm: float, *, lr: float) -> None:
    """Phase 2 of LAMB given ‖θ‖ and ‖u‖ (float64): θ ← θ − k·u with k = η·‖θ‖/‖u‖ taken
    in float64 as the fused kernels take it, η when either norm is 0, NaN or Inf;
    stores θ, m, v."""
    both = theta_norm > 0 and u_norm > 0 and math.isfinite(theta_norm) and math.isfinite(u_norm)
    _store(exp_avg, m)
    _store(exp_avg_sq, v)
    _store(param, theta - (_scaled_by_norm(u, lr * theta_norm, u_norm) if both else u * lr))


def lamb_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
) -> None:
    """LAMB (You et al., arXiv:1904.00962): u = m̂/(sqrt(v̂)+ε) + λθ;
    θ ← θ − η·(‖θ‖/‖u‖)·u, the trust ratio ‖θ‖/‖u‖ being 1 when either norm is 0.

    Non-finite values: the ratio is also 1 when a norm is NaN or Inf, so a NaN/Inf in u
    or θ reaches θ only at its own element (with λ > 0 an Inf in θ is also one in u:
    ‖θ‖/‖u‖ would be Inf/Inf = NaN, and every element NaN)."""
    theta, m, v, u = lamb_direction(param, grad, exp_avg, exp_avg_sq, step, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decay=weight_decay, bias_correction=bias_correction)
    lamb_apply(param, exp_avg, exp_avg_sq, theta, m, v, u, norm(theta), norm(u), lr=lr)
