"""Closed-form helpers from the source documents (DESIGN §2.5–2.6)."""
from __future__ import annotations

import math

DECAYS = ("inverse_square", "inverse_time")


def half_life_p(lr: float, half_life: float, decay: str = "inverse_square") -> float:
    """The p (or p0) of scale-aware Adam whose s(t) halves after ``half_life`` steps
    (DESIGN §2.5): α0·p = (√2−1)/T for 'inverse_square', α0·p0 = 1/(2T) for
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
    """Steady-state RMS of AdamW's update for zero-mean gradients (§2.6, seed 003):
    sqrt((1−β1)/(1+β1))."""
    return math.sqrt((1.0 - beta1) / (1.0 + beta1))


def adamw_weight_rms(lr: float, weight_decay: float) -> float:
    """Steady-state weight RMS of AdamW, sqrt(η/(2λ)) (§2.6, seed 003)."""
    return math.sqrt(lr / (2.0 * weight_decay))
