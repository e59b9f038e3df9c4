"""Closed-form predictions for the optimizers of this package.

* The half-life of scale-aware Adam's s(t) (Su Jianlin, 《基于Amos优化器思想推导出来的一些
  "炼丹策略"》, kexue.fm, 2022-11-22).
* AdamW's update RMS and weight RMS, and their SignSGDM-W (sign momentum with decoupled
  weight decay, i.e. Lion with β1 = β2) counterparts, from the mean-field derivations of
  Su Jianlin: 《为什么Adam的Update RMS是0.2?》 ("Why is Adam's update RMS 0.2?") and
  《AdamW的Weight RMS的渐近估计(上)》 ("Asymptotic estimation of AdamW's weight RMS,
  part 1", kexue.fm/archives/11307, 2025-10-01); the steady state sqrt(η/(2λ)) is also
  the result of Kosson et al., "Rotational Equilibrium: How Weight Decay Balances
  Learning Across Neural Networks", arXiv:2305.17212.

Notation: η the learning rate, λ the decoupled weight decay, β3 = 1 − ηλ (AdamW's update
θ_t = θ_{t−1} − η(u_t + λθ_{t−1}) is the EMA θ_t = β3·θ_{t−1} + (1−β3)·(−u_t/λ)), t the
step count, ‖θ_0‖ the RMS of the initial weights, and snr = ‖μ‖²/‖σ‖² the gradient
signal-to-noise ratio when the gradients are i.i.d. N(μ, σ²) per step.  All RMS are over
the entries of one tensor, ‖x‖_RMS = sqrt(mean(x²)).  The mean-field results take ε → 0
and β1^t, β2^t → 0 (the Adam moments at their steady state); β3^t is kept.

Everything here is plain float math (no torch).
"""
from __future__ import annotations

import math
import operator
import sys
from typing import Optional

DECAYS = ("inverse_square", "inverse_time")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _real(value, what: str) -> float:
    """A number (a one-element tensor, a bool too, as torch.optim reads them) as a
    float; text is refused, as the optimizers refuse it."""
    if isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"Invalid {what}: {value!r} (must be a real number)")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"Invalid {what}: {value!r} (must be a real number)") from None


def _finite(name: str, value: float, lower: float, *, strict: bool, what: str) -> float:
    x = _real(value, what)
    ok = math.isfinite(x) and (x > lower if strict else x >= lower)
    if not ok:
        bound = f"> {lower:g}" if strict else f">= {lower:g}"
        raise ValueError(f"Invalid {what}: {value} (`{name}` must be a finite number {bound})")
    return x


def _lr(lr: float) -> float:
    return _finite("lr", lr, 0.0, strict=True, what="learning rate")


def _wd(weight_decay: float, *, allow_zero: bool) -> float:
    return _finite("weight_decay", weight_decay, 0.0, strict=not allow_zero, what="weight_decay")


def _beta(name: str, value: float) -> float:
    x = _finite(name, value, 0.0, strict=False, what=name)
    if not x < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")
    return x


def _time(t: float) -> float:
    return _finite("t", t, 0.0, strict=False, what="step count t")


def _rms(name: str, value: float) -> float:
    return _finite(name, value, 0.0, strict=False, what=name)


def _snr(snr: float) -> float:
    x = _real(snr, "snr")
    if not x >= 0.0:  # also rejects nan; +inf means noise-free gradients
        raise ValueError(f"Invalid snr: {snr} (the signal-to-noise ratio ‖μ‖²/‖σ‖² must be >= 0)")
    return x


def _lr_wd(lr: float, weight_decay: float, *, allow_zero: bool) -> tuple:
    eta, lam = _lr(lr), _wd(weight_decay, allow_zero=allow_zero)
    if not eta * lam < 1.0:
        raise ValueError(
            f"Invalid lr * weight_decay: {lr} * {weight_decay} = {eta * lam} "
            "(must be < 1 so that β3 = 1 − lr·weight_decay lies in (0, 1])")
    return eta, lam


def _decay_terms(eta: float, lam: float, t: float) -> tuple:
    """(β3^t, (1−β3^t)/λ), the second → η·t as λ → 0; computed without cancellation."""
    log_beta3 = math.log1p(-eta * lam)
    exponent = t * log_beta3  # t·ln β3
    b = math.exp(exponent)
    if eta * lam >= sys.float_info.min and -exponent >= sys.float_info.min:
        a = -math.expm1(exponent) / lam
    else:  # (λ = 0, or ηλ or t·ηλ below float64's normal range, where it keeps few digits:
        a = eta * t  # the limit, off by a relative t·ηλ/2 there)
    return b, a


def _snr_ratio(snr: float, numerator_noise: float, denominator_noise: float) -> float:
    """(snr + n)/(snr + d), → 1 as snr → ∞."""
    if math.isinf(snr):
        return 1.0
    return (snr + numerator_noise) / (snr + denominator_noise)


# ---------------------------------------------------------------------------
# Scale-aware Adam (Amos)
# ---------------------------------------------------------------------------

def half_life_rate(decay: str) -> float:
    """α0·p·T of a half-life T: √2−1 for 'inverse_square' ((1 + α0·p·T)² = 2),
    1/2 for 'inverse_time' (1 + 2·α0·p0·T = 2)."""
    if decay == "inverse_square":
        return math.sqrt(2.0) - 1.0
    if decay == "inverse_time":
        return 0.5
    raise ValueError(f"Invalid decay: {decay!r} (expected one of {DECAYS})")


def half_life_p(lr: float, half_life: float, decay: str = "inverse_square") -> float:
    """The p (or p0) of scale-aware Adam whose s(t) halves after ``half_life`` steps:
    α0·p = (√2−1)/T for 'inverse_square', α0·p0 = 1/(2T) for
    'inverse_time'."""
    half_life = _finite("half_life", half_life, 0.0, strict=True, what="half_life")
    lr = _finite("lr", lr, 0.0, strict=True, what="learning rate")  # (> 0 to derive p from a half-life)
    p = half_life_rate(decay) / (half_life * lr) if half_life * lr > 0.0 else math.inf
    if not math.isfinite(p):  # (their product underflows)
        raise ValueError(f"Invalid half_life: {half_life} at lr={lr} (p, which divides by their product, "
                         "would be beyond float64's range)")
    return p


# ---------------------------------------------------------------------------
# AdamW: update RMS
# ---------------------------------------------------------------------------

def adamw_update_rms(beta1: float) -> float:
    """Steady-state RMS of AdamW's update u = m̂/sqrt(v̂) for zero-mean gradients:

        ‖u‖_RMS ≈ sqrt((1−β1)/(1+β1))        (≈ 0.23 at β1 = 0.9)

    Su Jianlin, 《为什么Adam的Update RMS是0.2?》 ("Why is Adam's update RMS 0.2?"),
    kexue.fm: mean field E[u²] ≈ E[m²]/E[v] = ((1−β1)/(1+β1))·σ² / σ²."""
    b1 = _beta("beta1", beta1)
    return math.sqrt((1.0 - b1) / (1.0 + b1))


def adamw_update_rms_snr(beta1: float, snr: float) -> float:
    """Steady-state RMS of AdamW's update for gradients N(μ, σ²), snr = ‖μ‖²/‖σ‖²:

        ‖u‖_RMS² ≈ (snr + (1−β1)/(1+β1)) / (snr + 1)

    from E[m²] ≈ μ² + ((1−β1)/(1+β1))·σ² and E[v] ≈ μ² + σ² (Su Jianlin,
    《为什么Adam的Update RMS是0.2?》 "Why is Adam's update RMS 0.2?"; both moments are
    restated in 《AdamW的Weight RMS的渐近估计(上)》).  snr = 0 gives
    :func:`adamw_update_rms`, snr → ∞ (``math.inf``) gives 1."""
    b1 = _beta("beta1", beta1)
    return math.sqrt(_snr_ratio(_snr(snr), (1.0 - b1) / (1.0 + b1), 1.0))


# ---------------------------------------------------------------------------
# AdamW: weight RMS
# ---------------------------------------------------------------------------

def weight_decay_beta3(lr: float, weight_decay: float) -> float:
    """β3 = 1 − ηλ: with it AdamW's step θ_t = θ_{t−1} − η(u_t + λθ_{t−1}) reads

        θ_t = β3·θ_{t−1} + (1−β3)·(−u_t/λ),

    an EMA of −u/λ whose horizon is 1/(ηλ) steps (the "sliding view" of weight decay in
    Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic estimation of AdamW's
    weight RMS, part 1", kexue.fm/archives/11307)."""
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=True)
    return 1.0 - eta * lam


def adamw_weight_rms(lr: float, weight_decay: float) -> float:
    """Steady-state weight RMS of AdamW for zero-mean (noise-dominated) gradients:

        ‖θ‖_RMS → sqrt(η/(2λ))

    Kosson et al., "Rotational Equilibrium", arXiv:2305.17212 (its total update
    contribution ũ_t of one gradient has unit RMS and is orthogonal to θ_{t−1}), rederived
    by mean field as the t → ∞, μ = 0 limit of :func:`adamw_weight_rms_at` in Su Jianlin,
    《AdamW的Weight RMS的渐近估计(上)》 ("Asymptotic estimation of AdamW's weight RMS,
    part 1"), kexue.fm/archives/11307.  It does not depend on β1, β2 or the initial
    weights."""
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=False)
    return math.sqrt(eta) / math.sqrt(2.0 * lam)  # (η/2λ itself may overflow for a tiny λ)


def adamw_weight_rms_quick(lr: float, weight_decay: float, beta1: float) -> float:
    """The post's quick (and, as it says, inaccurate) steady-state estimate:

        ‖θ‖_RMS ≈ sqrt((1−β1)/(1+β1) · η/(2λ))

    from taking ‖·‖² of θ_t = β3θ_{t−1} − (1−β3)u_t/λ with θ_{t−1}·u_t ≈ 0 and
    ‖u‖_RMS = sqrt((1−β1)/(1+β1)) (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》,
    section 快速估计 "quick estimate").  Only its ∝ sqrt(η/λ) scaling holds: momentum makes
    θ_{t−1}·u_t < 0 and the true value is :func:`adamw_weight_rms`, larger by
    sqrt((1+β1)/(1−β1))."""
    b1 = _beta("beta1", beta1)
    return math.sqrt((1.0 - b1) / (1.0 + b1)) * adamw_weight_rms(lr, weight_decay)


def adamw_weight_rms_transient(lr: float, weight_decay: float, t: float, init_rms: float) -> float:
    """Weight RMS of AdamW after t steps from weights of RMS ‖θ_0‖, zero-mean gradients:

        ‖θ_t‖_RMS² ≈ β3^{2t}·‖θ_0‖² + (1 − β3^{2t})·η/(2λ),   β3 = 1 − ηλ

    (the μ = 0 case of :func:`adamw_weight_rms_at`; Su Jianlin, 《AdamW的Weight RMS的
    渐近估计(上)》 "Asymptotic estimation of AdamW's weight RMS, part 1",
    kexue.fm/archives/11307).  The squared RMS relaxes to η/(2λ) with time constant
    1/(2·ln(1/β3)) ≈ 1/(2ηλ) steps.  λ = 0 gives :func:`adamw_weight_rms_no_decay`."""
    return adamw_weight_rms_at(lr, weight_decay, t, init_rms, snr=0.0)


def adamw_weight_rms_no_decay(lr: float, t: float, init_rms: float) -> float:
    """Weight RMS of Adam without weight decay (the λ → 0 limit), zero-mean gradients:

        ‖θ_t‖_RMS² ≈ ‖θ_0‖² + η²·t

    so the RMS grows like η·sqrt(t) (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》
    "Asymptotic estimation of AdamW's weight RMS, part 1", kexue.fm/archives/11307)."""
    eta, steps, theta0 = _lr(lr), _time(t), _rms("init_rms", init_rms)
    return math.sqrt(theta0 * theta0 + eta * eta * steps)


def adamw_averaged_update_rms(lr: float, weight_decay: float, t: float, snr: float = 0.0) -> float:
    """RMS of the β3-weighted average of AdamW's updates,
    ū_t = (1−β3)/(1−β3^t) · Σ_{i≤t} β3^{t−i} u_i  (so θ_t = β3^t θ_0 − (1−β3^t) ū_t/λ):

        ‖ū_t‖_RMS² ≈ (snr + (1−β3)(1+β3^t)/(2(1−β3^t))) / (snr + 1)

    from the mean field ū_t ≈ m̄_t/sqrt(v̄_t) with E[v̄_t] ≈ μ² + σ², E[m̄_t] ≈ μ and
    Var[m̄_t] ≈ (1−β3)(1+β3^t)σ²/(2(1−β3^t))  (Su Jianlin, 《AdamW的Weight RMS的渐近估计
    (上)》 "Asymptotic estimation of AdamW's weight RMS, part 1", steps 1–5).  Needs
    t > 0; with λ = 0 (β3 = 1) the noise term is 1/t."""
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=True)
    steps = _time(t)
    if steps == 0.0:
        raise ValueError("Invalid step count t: 0 (the average of the updates needs t > 0)")
    ratio = _snr(snr)
    if math.isinf(ratio):  # (pure signal: 1, whatever the noise term)
        return 1.0
    b, a = _decay_terms(eta, lam, steps)
    noise = eta * (1.0 + b) / (2.0 * a) if a > 0.0 else math.inf  # (1−β3)(1+β3^t)/(2(1−β3^t)); a = (1−β3^t)/λ
    if not math.isfinite(noise):
        raise ValueError(f"Invalid step count t: {t} (too small: the average's weight 1/(1 − beta3^t) "
                         "leaves float64's range)")
    return math.sqrt(_snr_ratio(ratio, noise, 1.0))


def adamw_weight_rms_at(lr: float, weight_decay: float, t: float, init_rms: float, snr: float = 0.0) -> float:
    """Weight RMS of AdamW after t steps, the post's general result (its eq. theta-rms):

        ‖θ_t‖_RMS² ≈ β3^{2t}·‖θ_0‖²
                     + (1−β3^t)² · (snr + (1−β3)(1+β3^t)/(2(1−β3^t))) / (λ²·(snr + 1))

    with β3 = 1 − ηλ, ‖θ_0‖ = ``init_rms`` and snr = ‖μ‖²/‖σ‖² for gradients N(μ, σ²)
    (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic estimation of AdamW's
    weight RMS, part 1", kexue.fm/archives/11307; θ_0 is taken orthogonal to the averaged
    update :func:`adamw_averaged_update_rms`).  Special cases: snr = 0 is
    :func:`adamw_weight_rms_transient`, then t → ∞ :func:`adamw_weight_rms`; λ = 0 gives
    ‖θ_0‖² + η²(snr·t² + t)/(snr + 1); snr → ∞ (``math.inf``) gives
    β3^{2t}‖θ_0‖² + ((1−β3^t)/λ)².  The post uses the ratio of norms ‖μ‖²/‖σ‖²; when μ²/σ²
    varies across entries the mean field averages the per-entry ratio instead."""
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=True)
    steps, theta0, ratio = _time(t), _rms("init_rms", init_rms), _snr(snr)
    return math.sqrt(_weight_sq(eta, lam, steps, theta0, ratio, 1.0))


def _weight_sq(eta: float, lam: float, t: float, theta0: float, snr: float, noise_floor: float) -> float:
    """β3^{2t}θ0² + (a²·snr + a·η(1+β3^t)/2)/(snr + noise_floor), a = (1−β3^t)/λ; the
    shared form of AdamW (noise_floor 1) and SignSGDM-W (noise_floor (1−β1)/(1+β1))."""
    b, a = _decay_terms(eta, lam, t)
    if math.isinf(snr):
        drift = a * a
    else:
        drift = (a * a * snr + a * eta * (1.0 + b) / 2.0) / (snr + noise_floor)
    return b * b * theta0 * theta0 + drift


def adamw_weight_rms_signal_dominated(lr: float, weight_decay: float, t: float, init_rms: float,
                                      snr: float) -> float:
    """Weight RMS of AdamW when the signal term dominates (large batches, snr ≫ ηλ/2):

        ‖θ_t‖_RMS² ≈ β3^{2t}·‖θ_0‖² + (1−β3^t)² · snr / (λ²·(snr + 1))

    (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic estimation of AdamW's
    weight RMS, part 1"): the weights then grow to ≈ sqrt(snr/(snr+1))/λ, far above
    sqrt(η/(2λ))."""
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=True)
    steps, theta0, ratio = _time(t), _rms("init_rms", init_rms), _snr(snr)
    b, a = _decay_terms(eta, lam, steps)
    return math.sqrt(b * b * theta0 * theta0 + a * a * _snr_ratio(ratio, 0.0, 1.0))


# ---------------------------------------------------------------------------
# The nested-EMA sums behind the mean field (exact closed forms)
# ---------------------------------------------------------------------------

def _nested_args(name: str, beta: float, beta3: float, t: int) -> tuple:
    b = _beta(name, beta)
    b3 = _finite("beta3", beta3, 0.0, strict=True, what="beta3")
    if not b3 < 1.0:
        raise ValueError(f"Invalid beta3: {beta3} (must be in (0, 1); β3 = 1 − ηλ with ηλ > 0)")
    if b3 == b:
        raise ValueError(f"Invalid beta3: {beta3} (the closed form needs beta3 != {name} = {beta})")
    try:
        steps = operator.index(t)
    except TypeError:
        steps = 0
    if isinstance(t, bool) or steps < 1:
        raise ValueError(f"Invalid step count t: {t!r} (must be an integer >= 1)")
    return b, b3, steps


# Up to this t the nested sums are added term by term (in float64, from each term's
# stable form): the closed forms' differences of geometric sums cancel when β3 is
# close to β (a 22% error at β = 0.99999, β3 = 0.999999, t = 1).
_SUMMED_UP_TO = 1 << 22


def _nested_sums(b: float, b3: float, t: int) -> Optional[tuple]:
    """(Σ S_n, Σ S_n²) over n = 1..t of S_n = Σ_{k<n} β3^{n−1−k} β^k = (β3^n − β^n)/(β3 − β),
    each S_n as −β3^n·expm1(n·log1p((β − β3)/β3))/(β3 − β) (β < β3; else the same with β
    and β3 swapped), which keeps its digits when β ≈ β3; None past _SUMMED_UP_TO (the
    closed forms then)."""
    if t > _SUMMED_UP_TO:
        return None
    import torch  # (this module is plain math otherwise)

    rate = math.log1p((b - b3) / b3) if b > 0.0 else -math.inf  # log(β/β3)
    total = total_sq = 0.0
    for start in range(1, t + 1, 1 << 20):
        n = torch.arange(start, min(t, start + (1 << 20) - 1) + 1, dtype=torch.float64)
        if b > b3:  # (the larger base outside, the ratio's power inside: no 0·inf)
            terms = -torch.exp(n * math.log(b)) * torch.expm1(-n * rate) / (b - b3)
        else:
            terms = -torch.exp(n * math.log(b3)) * torch.expm1(n * rate) / (b3 - b)  # (β = 0: β3^(n−1))
        total += float(terms.sum())
        total_sq += float((terms * terms).sum())
    return total, total_sq


def ema_of_ema_mean_coefficient(beta: float, beta3: float, t: int) -> float:
    """The exact weight c with E[x̄_t] = c·E[x] for the β3-average of an EMA,
    x̄_t = (1−β3)/(1−β3^t) Σ_{i≤t} β3^{t−i} e_i, e_i = (1−β) Σ_{j≤i} β^{i−j} x_j,
    x_j i.i.d.:

        c = (1−β3)(1−β) / ((1−β3^t)(β3−β)) · ((β3 − β3^{t+1})/(1−β3) − (β − β^{t+1})/(1−β))

    ≈ 1 when β3 ≈ 1 and β^t ≈ 0 (with β = β2, x = g² this is E[v̄_t] ≈ μ² + σ²; with β = β1,
    x = g, E[m̄_t] ≈ μ).  Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic
    estimation of AdamW's weight RMS, part 1", steps 2–3; uses Σ_{i=j}^{t} β3^{t−i}β^{i−j}
    = (β3^{t−j+1} − β^{t−j+1})/(β3 − β), so needs β3 ≠ β.  Evaluated as the sum it
    closes (_nested_sums, which keeps its digits when β3 ≈ β) up to t = 2^22."""
    b, b3, t = _nested_args("beta", beta, beta3, t)
    sums = _nested_sums(b, b3, t)
    if sums is not None:
        return (1.0 - b3) * (1.0 - b) / (1.0 - b3 ** t) * sums[0]
    head = (1.0 - b3) * (1.0 - b) / ((1.0 - b3 ** t) * (b3 - b))
    return _in_range(head * ((b3 - b3 ** (t + 1)) / (1.0 - b3) - (b - b ** (t + 1)) / (1.0 - b)), beta, beta3, t)


def ema_of_ema_variance_coefficient(beta1: float, beta3: float, t: int) -> float:
    """The exact weight c with Var[m̄_t] = c·σ² for the β3-average m̄_t of the momentum
    m_i = (1−β1) Σ_{j≤i} β1^{i−j} g_j, g_j i.i.d. with variance σ²:

        c = (1−β3)²(1−β1)² / ((1−β3^t)²(β3−β1)²)
            · ((β3² − β3^{2(t+1)})/(1−β3²) + (β1² − β1^{2(t+1)})/(1−β1²)
               − 2(β1β3 − (β1β3)^{t+1})/(1−β1β3))

    ≈ (1−β3)(1+β3^t)/(2(1−β3^t)) (:func:`ema_of_ema_variance_approx`) when β3 ≈ 1 and
    β1^t ≈ 0 (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic estimation of
    AdamW's weight RMS, part 1", step 4).  Needs β3 ≠ β1.  Evaluated as the sum it
    closes (_nested_sums, which keeps its digits when β3 ≈ β1) up to t = 2^22."""
    b1, b3, t = _nested_args("beta1", beta1, beta3, t)
    sums = _nested_sums(b1, b3, t)
    if sums is not None:
        return ((1.0 - b3) * (1.0 - b1) / (1.0 - b3 ** t)) ** 2 * sums[1]
    root = (1.0 - b3) * (1.0 - b1) / ((1.0 - b3 ** t) * (b3 - b1))
    cross = b1 * b3
    body = ((b3 ** 2 - b3 ** (2 * (t + 1))) / (1.0 - b3 ** 2)
            + (b1 ** 2 - b1 ** (2 * (t + 1))) / (1.0 - b1 ** 2)
            - 2.0 * (cross - cross ** (t + 1)) / (1.0 - cross))
    return _in_range(root * root * body, beta1, beta3, t)


def _in_range(value: float, beta: float, beta3: float, t: int) -> float:
    """A closed form's value, or a ValueError naming the arguments when it left
    float64's range on the way (betas so far apart, t so large)."""
    if not math.isfinite(value):
        raise ValueError(f"Invalid beta3: {beta3} with beta {beta} at t={t} (the closed form leaves float64's "
                         "range)")
    return value


def ema_of_ema_variance_approx(beta3: float, t: float) -> float:
    """The post's approximation of :func:`ema_of_ema_variance_coefficient`:

        Var[m̄_t]/σ² ≈ (1−β3)(1+β3^t) / (2(1−β3^t))        (→ (1−β3)/2 as t → ∞)

    (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》, step 4).  Needs 0 < β3 < 1, t > 0."""
    b3 = _finite("beta3", beta3, 0.0, strict=True, what="beta3")
    if not b3 < 1.0:
        raise ValueError(f"Invalid beta3: {beta3} (must be in (0, 1))")
    steps = _time(t)
    if steps == 0.0:
        raise ValueError("Invalid step count t: 0 (must be > 0)")
    b = b3 ** steps
    one_minus_b = -math.expm1(steps * math.log(b3))  # 1 − β3^t, exact for t near 0 too
    value = (1.0 - b3) * (1.0 + b) / (2.0 * one_minus_b) if one_minus_b > 0.0 else math.inf
    if not math.isfinite(value):
        raise ValueError(f"Invalid step count t: {t} (too small: 1 − beta3^t underflows)")
    return value


# ---------------------------------------------------------------------------
# SignSGDM-W (sign momentum + decoupled weight decay; Lion with β1 = β2)
# ---------------------------------------------------------------------------

def signsgdm_update_rms_ratio(beta1: float) -> float:
    """How much larger SignSGDM-W's update RMS is than AdamW's at the same β1, for
    zero-mean gradients:

        ‖sign(m)‖_RMS / ‖u_AdamW‖_RMS ≈ 1 / sqrt((1−β1)/(1+β1)) = sqrt((1+β1)/(1−β1))

    (SignSGDM's update RMS is exactly 1; Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》
    "Asymptotic estimation of AdamW's weight RMS, part 1", section 符号版本 "sign
    version")."""
    b1 = _beta("beta1", beta1)
    return math.sqrt((1.0 + b1) / (1.0 - b1))


def signsgdmw_weight_rms(lr: float, weight_decay: float, beta1: float) -> float:
    """Steady-state weight RMS of SignSGDM-W, m_t = β1 m_{t−1} + (1−β1) g_t,
    θ_t = θ_{t−1} − η(sign(m_t) + λθ_{t−1}), for zero-mean gradients, as the post gives it:

        ‖θ‖_RMS → sqrt(η/(2λ) · (1+β1)/(1−β1))

    i.e. AdamW's sqrt(η/(2λ)) times :func:`signsgdm_update_rms_ratio` (Su Jianlin,
    《AdamW的Weight RMS的渐近估计(上)》, section 符号版本 "sign version"; the post prints
    the left side as ‖θ_t‖², a typo for ‖θ_t‖).  The mean field replaces the correlation
    of sign(m_t) and sign(m_{t+k}) by that of m_t/|m| and overestimates it: for Gaussian
    noise the exact value is :func:`signsgdmw_weight_rms_arcsine`, about 0.83–0.88 times
    this for β1 in [0.5, 0.99); both agree at β1 = 0."""
    b1 = _beta("beta1", beta1)
    return math.sqrt((1.0 + b1) / (1.0 - b1)) * adamw_weight_rms(lr, weight_decay)


def signsgdmw_weight_rms_at(lr: float, weight_decay: float, beta1: float, t: float, init_rms: float,
                            snr: float = 0.0) -> float:
    """Weight RMS of SignSGDM-W after t steps from weights of RMS ‖θ_0‖, as the post
    gives it (sign(m) = m/sqrt(m²), so v̄_t averages m² with E[m²] ≈ μ² + (1−β1)/(1+β1)·σ²):

        ‖θ_t‖_RMS² ≈ β3^{2t}·‖θ_0‖²
                     + (1−β3^t)² · (snr + (1−β3)(1+β3^t)/(2(1−β3^t)))
                       / (λ²·(snr + (1−β1)/(1+β1)))

    (Su Jianlin, 《AdamW的Weight RMS的渐近估计(上)》 "Asymptotic estimation of AdamW's
    weight RMS, part 1", section 符号版本).  Accurate when the signal dominates the
    momentum's noise (snr ≳ (1−β1)/(1+β1)) or β1 = 0; for noise-dominated gradients and
    β1 > 0 it overestimates (see :func:`signsgdmw_weight_rms_arcsine`)."""
    b1 = _beta("beta1", beta1)
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=True)
    steps, theta0, ratio = _time(t), _rms("init_rms", init_rms), _snr(snr)
    return math.sqrt(_weight_sq(eta, lam, steps, theta0, ratio, (1.0 - b1) / (1.0 + b1)))


# The most terms signsgdmw_weight_rms_arcsine sums (β1·β3 within about 3e-7 of 1).
_ARCSINE_TERMS = 1 << 27


def signsgdmw_weight_rms_arcsine(lr: float, weight_decay: float, beta1: float, t: Optional[float] = None,
                                 init_rms: float = 0.0) -> float:
    """Weight RMS of SignSGDM-W for zero-mean Gaussian gradient noise with the exact sign
    correlations (a refinement of :func:`signsgdmw_weight_rms`, not in the post).

    At its steady state m_t is Gaussian with autocorrelation β1^k, so by the arcsine law
    (Sheppard's formula E[sign X · sign Y] = (2/π)·arcsin ρ for a standard bivariate
    normal pair) ρ_k = E[sign m_t · sign m_{t+k}] = (2/π)·arcsin(β1^k), and the EMA
    θ = −η Σ_k β3^k sign(m_{t−k}) has

        ‖θ_∞‖_RMS² = η²·(1 + 2·Σ_{k≥1} β3^k·(2/π)·arcsin(β1^k)) / (1 − β3²)
                   ≈ η/(2λ) · (1 + (4/π)·Σ_{k≥1} arcsin(β1^k))        (β3 → 1)

    The bracket tends to 2·ln2/(1−β1) as β1 → 1, against the mean field's
    (1+β1)/(1−β1) → 2/(1−β1).  With ``t`` (steps from weights of RMS ``init_rms``) the
    transient has the same form as AdamW's: β3^{2t}‖θ_0‖² + (1−β3^{2t})·‖θ_∞‖²."""
    b1 = _beta("beta1", beta1)
    eta, lam = _lr_wd(lr, weight_decay, allow_zero=False)
    theta0 = _rms("init_rms", init_rms)
    b3 = 1.0 - eta * lam
    # Σ_{k≥1} β3^k arcsin(β1^k): arcsin(x) ≤ πx/2, so stop once (β1β3)^k < 1e-17.
    series, q = 0.0, b1 * b3
    if q > 0.0:
        last = max(1, int(math.ceil(math.log(1e-17) / math.log(q))))
        if last > _ARCSINE_TERMS:
            raise ValueError(f"Invalid beta1: {beta1} (beta1·beta3 = {q} is so close to 1 that the series "
                             f"needs {last} terms; signsgdmw_weight_rms gives the mean field)")
        import torch  # (this module is plain math otherwise)

        log_b1, log_b3 = math.log(b1), math.log(b3)
        for start in range(1, last + 1, 1 << 20):
            k = torch.arange(start, min(last, start + (1 << 20) - 1) + 1, dtype=torch.float64)
            series += float((torch.exp(k * log_b3) * torch.asin(torch.exp(k * log_b1))).sum())
    # η²/(1 − β3²) = η/(λ(1 + β3)): 1 − β3² = ηλ(1 + β3), without the product ηλ (it may underflow)
    steady_sq = eta * (1.0 + 4.0 / math.pi * series) / (lam * (1.0 + b3))
    if not math.isfinite(steady_sq):
        raise ValueError(f"Invalid weight_decay: {weight_decay} at lr={lr} (the weight RMS, about "
                         "sqrt(lr/(2·weight_decay)), is beyond float64's range)")
    if t is None:
        return math.sqrt(steady_sq)
    b_sq = b3 ** (2.0 * _time(t))
    return math.sqrt(b_sq * theta0 * theta0 + (1.0 - b_sq) * steady_sq)
