"""Closed-form helpers: the half-life of scale-aware Adam's s(t) (Su Jianlin,
"基于Amos优化器思想推导出来的一些'炼丹策略'", kexue.fm, 2022-11-22), and AdamW's
steady-state update and weight RMS (Su Jianlin's kexue.fm post on AdamW's weight RMS,
following his 《为什么Adam的Update RMS是0.2?》 "Why is Adam's update RMS 0.2?"; see
also Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning
Across Neural Networks", arXiv:2305.17212)."""
from __future__ import annotations

import math

DECAYS = ("inverse_square", "inverse_time")


def half_life_p(lr: float, half_life: float, decay: str = "inverse_square") -> float:
    """The p (or p0) of scale-aware Adam whose s(t) halves after ``half_life`` steps:
    α0·p = (√2−1)/T for 'inverse_square', α0·p0 = 1/(2T) for
    'inverse_time'."""
    if not (half_life > 0 and math.isfinite(half_life)):
        raise ValueError(f"Invalid half_life: {half_life} (must be a finite number > 0)")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} (must be > 0 to derive p from a half-life)")
    if decay == "inverse_square":
        return (math.sqrt(2.0) - 1.0) / (half_life * lr)
    if decay == "inverse_time":
        return 1.0 / (2.0 * half_life * lr)
    raise ValueError(f"Invalid decay: {decay!r} (expected one of {DECAYS})")


def adamw_update_rms(beta1: float) -> float:
    """Steady-state RMS of AdamW's update for zero-mean gradients (Su Jianlin,
    "Why is Adam's update RMS 0.2?", kexue.fm): sqrt((1−β1)/(1+β1))."""
    return math.sqrt((1.0 - beta1) / (1.0 + beta1))


def adamw_weight_rms(lr: float, weight_decay: float) -> float:
    """Steady-state weight RMS of AdamW, sqrt(η/(2λ)) (Su Jianlin's kexue.fm post on
    AdamW's weight RMS)."""
    return math.sqrt(lr / (2.0 * weight_decay))
