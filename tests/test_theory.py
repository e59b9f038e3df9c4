"""amos_fused/theory.py against simulations of the update rules themselves.

The numerical experiments of Su Jianlin's 《AdamW的Weight RMS的渐近估计(上)》
("Asymptotic estimation of AdamW's weight RMS, part 1", kexue.fm/archives/11307) and
《为什么Adam的Update RMS是0.2?》 ("Why is Adam's update RMS 0.2?"), scaled down: the post
runs 10^4 weights for 10^5 steps at η = 1e-3, λ = 0.1 (ηλ·T = 10); here 2048 weights run
for a few thousand steps at ηλ = 1e-3 (ηλ·T = 5, so β3^{2T} = e^{-10} as well).  Gradients
are i.i.d. N(μ, 1) per entry with μ = ±sqrt(snr) (random signs), so ‖μ‖²/‖σ‖² = snr
exactly.  AdamW runs with bias correction and ε = 1e-8, as torch.optim.AdamW does;
SignSGDM-W is m ← β1·m + (1−β1)·g, θ ← θ − η(sign(m) + λθ).  Predictions must agree with
the measurements within 10%; fixed seeds keep the runs reproducible.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import amos_fused as af
from amos_fused import theory

N = 2048          # weights per simulated tensor
LR, WD = 1e-2, 0.1  # ηλ = 1e-3: weight² relaxes with time constant ≈ 1/(2ηλ) = 500 steps
STEPS = 5000      # ηλ·T = 5
RECORD = (100, 250, 500, 1000, 2000, 5000)
REL = 0.10


@functools.lru_cache(maxsize=None)
def simulate(rule: str, lr: float, wd: float, beta1: float, snr: float = 0.0, init_rms: float = 0.0,
             steps: int = STEPS, beta2: float = 0.95, seed: int = 0) -> dict:
    """Runs ``rule`` ('adamw' or 'signsgdmw') on N weights and returns the weight RMS and
    the RMS of the β3-averaged update ū_t at the steps in RECORD (and at ``steps``), and
    the update RMS averaged over the second half of the run."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(N)
    theta *= init_rms / math.sqrt(np.mean(theta * theta))  # RMS exactly init_rms
    mu = math.sqrt(snr) * np.where(rng.random(N) < 0.5, -1.0, 1.0)
    m, v, u_ema = np.zeros(N), np.zeros(N), np.zeros(N)
    beta3 = 1.0 - lr * wd
    record = set(RECORD) | {steps}
    weight_rms, averaged_update_rms, update_sq = {}, {}, []
    for t in range(1, steps + 1):
        g = rng.standard_normal(N) + mu
        m = beta1 * m + (1.0 - beta1) * g
        if rule == "adamw":
            v = beta2 * v + (1.0 - beta2) * g * g
            u = (m / (1.0 - beta1 ** t)) / (np.sqrt(v / (1.0 - beta2 ** t)) + 1e-8)
        else:
            u = np.sign(m)
        theta = theta - lr * (u + wd * theta)
        u_ema = beta3 * u_ema + (1.0 - beta3) * u
        if t > steps // 2:
            update_sq.append(np.mean(u * u))
        if t in record:
            weight_rms[t] = math.sqrt(np.mean(theta * theta))
            if beta3 < 1.0:
                u_bar = u_ema / (1.0 - beta3 ** t)
                averaged_update_rms[t] = math.sqrt(np.mean(u_bar * u_bar))
    return {"weight_rms": weight_rms, "averaged_update_rms": averaged_update_rms,
            "update_rms": math.sqrt(np.mean(update_sq))}


# ---------------------------------------------------------------------------
# AdamW: update RMS (《为什么Adam的Update RMS是0.2?》)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_adamw_update_rms_noise_dominated(beta1):
    run = simulate("adamw", LR, WD, beta1)
    assert run["update_rms"] == pytest.approx(theory.adamw_update_rms(beta1), rel=REL)
    if beta1 == 0.9:
        assert 0.2 < run["update_rms"] < 0.25  # "Adam's update RMS is 0.2"


@pytest.mark.parametrize("snr", [0.01, 0.1, 1.0, 10.0])
def test_adamw_update_rms_with_signal(snr):
    run = simulate("adamw", LR, WD, 0.9, snr=snr)
    predicted = theory.adamw_update_rms_snr(0.9, snr)
    assert run["update_rms"] == pytest.approx(predicted, rel=REL)
    # the signal lifts it above the noise-only value, towards 1
    assert run["update_rms"] > 1.05 * theory.adamw_update_rms(0.9)


# ---------------------------------------------------------------------------
# AdamW: weight RMS (《AdamW的Weight RMS的渐近估计(上)》)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lr,wd", [(1e-2, 0.1), (4e-3, 0.25), (2e-2, 0.05)])
def test_adamw_weight_rms_equilibrium(lr, wd):
    """The post's script (β1 = 0.9, β2 = 0.95, weights of RMS 0.1, ηλ·T large) at three
    (η, λ) with ηλ = 1e-3: the weight RMS settles at sqrt(η/(2λ)), whatever η/λ."""
    run = simulate("adamw", lr, wd, 0.9, init_rms=0.1)
    measured = run["weight_rms"][STEPS]
    assert measured == pytest.approx(theory.adamw_weight_rms(lr, wd), rel=REL)
    assert measured == pytest.approx(theory.adamw_weight_rms_at(lr, wd, STEPS, 0.1), rel=REL)


def test_adamw_quick_estimate_is_too_small():
    """The post's quick estimate assumes θ_{t−1}·u_t ≈ 0; momentum breaks it and the true
    RMS is larger by sqrt((1+β1)/(1−β1)) (≈ 4.36 at β1 = 0.9), as the post says."""
    measured = simulate("adamw", LR, WD, 0.9, init_rms=0.1)["weight_rms"][STEPS]
    quick = theory.adamw_weight_rms_quick(LR, WD, 0.9)
    assert measured / quick == pytest.approx(math.sqrt(1.9 / 0.1), rel=REL)
    assert quick == pytest.approx(theory.adamw_weight_rms(LR, WD) * theory.adamw_update_rms(0.9), rel=1e-12)


@pytest.mark.parametrize("init_rms", [0.0, 0.1, 1.0])
def test_adamw_weight_rms_transient(init_rms):
    """β3^{2t}‖θ_0‖² + (1−β3^{2t})·η/(2λ) along the way: growing from 0 and from the post's
    0.1 up to sqrt(η/(2λ)) ≈ 0.224, and decaying from 1."""
    run = simulate("adamw", LR, WD, 0.9, init_rms=init_rms)
    for t in RECORD:
        predicted = theory.adamw_weight_rms_transient(LR, WD, t, init_rms)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t
    if init_rms == 1.0:  # the decay is visible: half way down at t = 1000
        assert run["weight_rms"][1000] < 0.5 < run["weight_rms"][250]


def test_adam_without_weight_decay_grows_like_sqrt_t():
    """λ → 0: ‖θ_t‖² ≈ ‖θ_0‖² + η²t, i.e. the RMS grows like η·sqrt(t)."""
    run = simulate("adamw", LR, 0.0, 0.9, init_rms=0.1)
    for t in RECORD:
        predicted = theory.adamw_weight_rms_no_decay(LR, t, 0.1)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t
        assert theory.adamw_weight_rms_at(LR, 0.0, t, 0.1) == pytest.approx(predicted, rel=1e-12)
    assert run["weight_rms"][STEPS] > 3 * theory.adamw_weight_rms(LR, WD)  # no equilibrium


@pytest.mark.parametrize("snr", [5e-4, 0.01, 1.0, 10.0])
def test_adamw_weight_rms_with_signal(snr):
    """The general formula (eq. theta-rms) with a gradient mean: snr = ηλ/2 doubles the
    noise-only weight², snr ≥ 1 drives the weights to ≈ sqrt(snr/(snr+1))/λ."""
    run = simulate("adamw", LR, WD, 0.9, snr=snr, init_rms=0.1)
    for t in RECORD:
        predicted = theory.adamw_weight_rms_at(LR, WD, t, 0.1, snr=snr)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t
    final = run["weight_rms"][STEPS]
    if snr == 5e-4:
        assert final == pytest.approx(math.sqrt(2) * theory.adamw_weight_rms(LR, WD), rel=REL)
    if snr >= 1.0:
        assert final == pytest.approx(theory.adamw_weight_rms_signal_dominated(LR, WD, STEPS, 0.1, snr), rel=REL)
        assert final == pytest.approx(math.sqrt(snr / (snr + 1)) / WD, rel=REL)


@pytest.mark.parametrize("snr", [0.0, 0.01])
def test_adamw_averaged_update_rms(snr):
    """The mean-field core: ‖ū_t‖² ≈ (snr + (1−β3)(1+β3^t)/(2(1−β3^t)))/(snr + 1) for the
    β3-average of the updates, from t = 100 (still ≈ 1/t) to the steady state."""
    run = simulate("adamw", LR, WD, 0.9, snr=snr, init_rms=0.1 if snr == 0.0 else 0.0)
    for t in RECORD:
        predicted = theory.adamw_averaged_update_rms(LR, WD, t, snr=snr)
        assert run["averaged_update_rms"][t] == pytest.approx(predicted, rel=REL), t


# ---------------------------------------------------------------------------
# The nested EMA sums (exact closed forms and the post's approximations)
# ---------------------------------------------------------------------------

def brute_force_weights(beta, beta3, t):
    """w_j with Σ_{i≤t} β3^{t−i} Σ_{j≤i} β^{i−j} x_j = Σ_j w_j x_j, summed term by term."""
    w = np.zeros(t + 1)
    for i in range(1, t + 1):
        for j in range(1, i + 1):
            w[j] += beta3 ** (t - i) * beta ** (i - j)
    return w[1:]


@pytest.mark.parametrize("beta,beta3,t", [(0.9, 0.99, 60), (0.95, 0.9, 25), (0.0, 0.5, 7), (0.9, 0.999, 300)])
def test_nested_ema_closed_forms(beta, beta3, t):
    w = brute_force_weights(beta, beta3, t)
    norm = (1 - beta3) * (1 - beta) / (1 - beta3 ** t)
    assert theory.ema_of_ema_mean_coefficient(beta, beta3, t) == pytest.approx(norm * w.sum(), rel=1e-9)
    assert theory.ema_of_ema_variance_coefficient(beta, beta3, t) == pytest.approx(
        float((norm * w) @ (norm * w)), rel=1e-9)


@pytest.mark.parametrize("beta,beta3", [(0.999, 0.9999), (0.9999, 0.99999), (0.99999, 0.999999),
                                        (0.999999, 0.99999)])
def test_nested_ema_sums_keep_their_digits_when_the_betas_are_close(beta, beta3):
    """At t = 1 the averages are exactly (1−β)·x, so the weights are 1−β and (1−β)²;
    the closed forms' differences of geometric sums cancel when β3 ≈ β (they gave
    −22% at β = 0.99999, β3 = 0.999999).  And the brute force at t = 40."""
    assert theory.ema_of_ema_mean_coefficient(beta, beta3, 1) == pytest.approx(1 - beta, rel=1e-12)
    assert theory.ema_of_ema_variance_coefficient(beta, beta3, 1) == pytest.approx((1 - beta) ** 2, rel=1e-12)
    t = 40
    w = brute_force_weights(beta, beta3, t)
    norm = (1 - beta3) * (1 - beta) / (1 - beta3 ** t)
    assert theory.ema_of_ema_mean_coefficient(beta, beta3, t) == pytest.approx(norm * w.sum(), rel=1e-9)
    assert theory.ema_of_ema_variance_coefficient(beta, beta3, t) == pytest.approx(
        float((norm * w) @ (norm * w)), rel=1e-9)


@pytest.mark.parametrize("t", [200, 1000, 20000])
def test_nested_ema_approximations(t):
    """β3 ≈ 1, β^t ≈ 0: the mean weight ≈ 1 and Var ≈ (1−β3)(1+β3^t)/(2(1−β3^t))."""
    beta3 = 1 - LR * WD
    assert theory.ema_of_ema_mean_coefficient(0.95, beta3, t) == pytest.approx(1.0, rel=REL)
    assert theory.ema_of_ema_mean_coefficient(0.9, beta3, t) == pytest.approx(1.0, rel=REL)
    assert theory.ema_of_ema_variance_coefficient(0.9, beta3, t) == pytest.approx(
        theory.ema_of_ema_variance_approx(beta3, t), rel=REL)


# ---------------------------------------------------------------------------
# SignSGDM-W (section 符号版本 "sign version")
# ---------------------------------------------------------------------------

def test_signsgdm_update_rms_ratio():
    """sign(m) has RMS exactly 1, sqrt((1+β1)/(1−β1)) times AdamW's update RMS."""
    sign_run, adam_run = simulate("signsgdmw", LR, WD, 0.9), simulate("adamw", LR, WD, 0.9)
    assert sign_run["update_rms"] == 1.0
    assert sign_run["update_rms"] / adam_run["update_rms"] == pytest.approx(
        theory.signsgdm_update_rms_ratio(0.9), rel=REL)


@pytest.mark.parametrize("init_rms", [0.1, 1.0])
def test_signsgdw_without_momentum(init_rms):
    """β1 = 0 (SignSGD-W): sign(g) is i.i.d., the mean field is exact and the weights
    behave like AdamW's, sqrt(η/(2λ))."""
    run = simulate("signsgdmw", LR, WD, 0.0, init_rms=init_rms)
    for t in RECORD:
        predicted = theory.signsgdmw_weight_rms_at(LR, WD, 0.0, t, init_rms)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t
    assert run["weight_rms"][STEPS] == pytest.approx(theory.signsgdmw_weight_rms(LR, WD, 0.0), rel=REL)


@pytest.mark.parametrize("snr", [0.1, 1.0])
def test_signsgdmw_weight_rms_with_signal(snr):
    """When the signal dominates the momentum's noise (snr ≳ (1−β1)/(1+β1)) the post's
    SignSGDM-W formula holds along the whole transient."""
    run = simulate("signsgdmw", LR, WD, 0.9, snr=snr, init_rms=0.1)
    for t in RECORD:
        predicted = theory.signsgdmw_weight_rms_at(LR, WD, 0.9, t, 0.1, snr=snr)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_signsgdmw_noise_dominated_needs_the_arcsine_law(beta1):
    """Noise-dominated gradients with momentum: the post's sqrt(η/(2λ)·(1+β1)/(1−β1))
    overestimates (the signs of m_t and m_{t+k} correlate by (2/π)·arcsin(β1^k), not
    β1^k); the arcsine-law value matches, at equilibrium and along the transient."""
    run = simulate("signsgdmw", LR, WD, beta1, init_rms=0.1)
    final = run["weight_rms"][STEPS]
    assert 0.75 < final / theory.signsgdmw_weight_rms(LR, WD, beta1) < 0.92
    assert final == pytest.approx(theory.signsgdmw_weight_rms_arcsine(LR, WD, beta1), rel=REL)
    for t in RECORD:
        predicted = theory.signsgdmw_weight_rms_arcsine(LR, WD, beta1, t=t, init_rms=0.1)
        assert run["weight_rms"][t] == pytest.approx(predicted, rel=REL), t


# ---------------------------------------------------------------------------
# The package's own AdamW and Lion (β1 = β2: SignSGDM-W) reach the predicted equilibrium
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_fused_optimizers_reach_the_predicted_weight_rms(name):
    lr, wd, steps = 2e-2, 0.1, 3000  # ηλ·T = 6
    gen = torch.Generator().manual_seed(7)
    param = torch.nn.Parameter(0.1 * torch.randn(N, generator=gen, dtype=torch.float64))
    if name == "AdamW":
        opt = af.AdamW([param], lr=lr, betas=(0.9, 0.95), weight_decay=wd, backend="cpu")
        predicted = theory.adamw_weight_rms(lr, wd)
    else:
        opt = af.Lion([param], lr=lr, betas=(0.9, 0.9), weight_decay=wd, backend="cpu")
        predicted = theory.signsgdmw_weight_rms_arcsine(lr, wd, 0.9)
    for _ in range(steps):
        param.grad = torch.randn(N, generator=gen, dtype=torch.float64)
        opt.step()
    measured = float(param.detach().pow(2).mean().sqrt())
    assert measured == pytest.approx(predicted, rel=REL)


# ---------------------------------------------------------------------------
# Closed-form relations between the functions
# ---------------------------------------------------------------------------

def test_special_cases_agree():
    lr, wd = 3e-3, 0.2
    steady = theory.adamw_weight_rms(lr, wd)
    assert steady == pytest.approx(math.sqrt(lr / (2 * wd)), rel=1e-15)
    assert theory.weight_decay_beta3(lr, wd) == pytest.approx(1 - lr * wd, rel=1e-15)
    assert theory.adamw_update_rms(0.9) == pytest.approx(math.sqrt(0.1 / 1.9), rel=1e-15)
    assert theory.adamw_update_rms_snr(0.9, 0.0) == pytest.approx(theory.adamw_update_rms(0.9), rel=1e-15)
    assert theory.adamw_update_rms_snr(0.9, math.inf) == 1.0
    # t = 0 gives the initial RMS, t → ∞ the steady state; the transient is the snr = 0 case
    assert theory.adamw_weight_rms_at(lr, wd, 0, 0.37, snr=0.5) == pytest.approx(0.37, rel=1e-15)
    assert theory.adamw_weight_rms_at(lr, wd, 1e8, 0.37) == pytest.approx(steady, rel=1e-12)
    assert theory.adamw_weight_rms_transient(lr, wd, 700, 0.37) == theory.adamw_weight_rms_at(lr, wd, 700, 0.37)
    # snr → ∞: β3^{2t}‖θ_0‖² + ((1−β3^t)/λ)², the signal-dominated form
    b = (1 - lr * wd) ** 700
    exact = math.sqrt(b * b * 0.37 ** 2 + ((1 - b) / wd) ** 2)
    assert theory.adamw_weight_rms_at(lr, wd, 700, 0.37, snr=math.inf) == pytest.approx(exact, rel=1e-12)
    assert theory.adamw_weight_rms_signal_dominated(lr, wd, 700, 0.37, math.inf) == pytest.approx(exact, rel=1e-12)
    # averaged update: → sqrt((1−β3)/2) at t → ∞, → 1/sqrt(t) without decay
    assert theory.adamw_averaged_update_rms(lr, wd, 1e8) == pytest.approx(math.sqrt(lr * wd / 2), rel=1e-9)
    assert theory.adamw_averaged_update_rms(lr, 0.0, 400) == pytest.approx(1 / 20, rel=1e-12)
    # SignSGDM-W: AdamW's weight RMS times the update-RMS ratio; same transient form
    assert theory.signsgdmw_weight_rms(lr, wd, 0.9) == pytest.approx(steady * math.sqrt(19), rel=1e-12)
    assert theory.signsgdmw_weight_rms_at(lr, wd, 0.9, 1e8, 0.37) == pytest.approx(
        theory.signsgdmw_weight_rms(lr, wd, 0.9), rel=1e-9)
    assert theory.signsgdmw_weight_rms_at(lr, wd, 0.0, 700, 0.37) == pytest.approx(
        theory.adamw_weight_rms_transient(lr, wd, 700, 0.37), rel=1e-12)


def test_arcsine_refinement_limits():
    lr, wd = 1e-3, 1e-3  # β3 = 1 − 1e-6 ≈ 1
    steady = theory.adamw_weight_rms(lr, wd)
    # β1 = 0: sign(g) is i.i.d.; matches AdamW and the post
    assert theory.signsgdmw_weight_rms_arcsine(lr, wd, 0.0) == pytest.approx(steady, rel=1e-5)
    # β1 → 1: weight² ratio to η/(2λ) → 2·ln2/(1−β1), against the mean field's 2/(1−β1)
    beta1 = 0.999
    ratio = (theory.signsgdmw_weight_rms_arcsine(lr, wd, beta1) / steady) ** 2
    assert ratio * (1 - beta1) == pytest.approx(2 * math.log(2), rel=2e-3)
    # the post's mean-field value is above it for every β1 in (0, 1)
    for b1 in (0.1, 0.5, 0.9, 0.99):
        assert theory.signsgdmw_weight_rms_arcsine(lr, wd, b1) < theory.signsgdmw_weight_rms(lr, wd, b1)
    # the transient starts at init_rms
    assert theory.signsgdmw_weight_rms_arcsine(lr, wd, 0.9, t=0, init_rms=0.5) == pytest.approx(0.5, rel=1e-15)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

BAD_INPUTS = [
    (theory.adamw_update_rms, dict(beta1=1.0), "beta1: 1.0"),
    (theory.adamw_update_rms, dict(beta1=-0.1), "beta1: -0.1"),
    (theory.adamw_update_rms_snr, dict(beta1=0.9, snr=-1.0), "snr: -1.0"),
    (theory.adamw_update_rms_snr, dict(beta1=0.9, snr=math.nan), "snr: nan"),
    (theory.adamw_weight_rms, dict(lr=0.0, weight_decay=0.1), "learning rate: 0.0"),
    (theory.adamw_weight_rms, dict(lr=math.inf, weight_decay=0.1), "learning rate: inf"),
    (theory.adamw_weight_rms, dict(lr=1e-3, weight_decay=0.0), "weight_decay: 0.0"),
    (theory.adamw_weight_rms, dict(lr="fast", weight_decay=0.1), "learning rate: 'fast'"),
    (theory.adamw_weight_rms_quick, dict(lr=1e-3, weight_decay=0.1, beta1=1.5), "beta1: 1.5"),
    (theory.weight_decay_beta3, dict(lr=2.0, weight_decay=0.5), "lr \\* weight_decay"),
    (theory.weight_decay_beta3, dict(lr=1e-3, weight_decay=-0.1), "weight_decay: -0.1"),
    (theory.adamw_weight_rms_transient, dict(lr=1e-3, weight_decay=0.1, t=-1, init_rms=0.1), "step count t: -1"),
    (theory.adamw_weight_rms_transient, dict(lr=1e-3, weight_decay=0.1, t=math.inf, init_rms=0.1),
     "step count t: inf"),
    (theory.adamw_weight_rms_transient, dict(lr=1e-3, weight_decay=0.1, t=10, init_rms=-0.1), "init_rms: -0.1"),
    (theory.adamw_weight_rms_no_decay, dict(lr=-1e-3, t=10, init_rms=0.1), "learning rate: -0.001"),
    (theory.adamw_weight_rms_at, dict(lr=1e-3, weight_decay=0.1, t=10, init_rms=0.1, snr=-0.5), "snr: -0.5"),
    (theory.adamw_weight_rms_signal_dominated, dict(lr=1e-3, weight_decay=0.1, t=10, init_rms=0.1, snr=-2),
     "snr: -2"),
    (theory.adamw_averaged_update_rms, dict(lr=1e-3, weight_decay=0.1, t=0), "step count t: 0"),
    (theory.ema_of_ema_mean_coefficient, dict(beta=0.9, beta3=0.9, t=10), "beta3: 0.9"),
    (theory.ema_of_ema_mean_coefficient, dict(beta=0.9, beta3=1.0, t=10), "beta3: 1.0"),
    (theory.ema_of_ema_mean_coefficient, dict(beta=0.9, beta3=0.99, t=2.5), "step count t: 2.5"),
    (theory.ema_of_ema_variance_coefficient, dict(beta1=0.9, beta3=0.99, t=0), "step count t: 0"),
    (theory.ema_of_ema_variance_coefficient, dict(beta1=1.0, beta3=0.99, t=5), "beta1: 1.0"),
    (theory.ema_of_ema_variance_approx, dict(beta3=0.0, t=5), "beta3: 0.0"),
    (theory.signsgdm_update_rms_ratio, dict(beta1=1.0), "beta1: 1.0"),
    (theory.signsgdmw_weight_rms, dict(lr=1e-3, weight_decay=0.0, beta1=0.9), "weight_decay: 0.0"),
    (theory.signsgdmw_weight_rms_at, dict(lr=1e-3, weight_decay=0.1, beta1=0.9, t=5, init_rms=math.nan),
     "init_rms: nan"),
    (theory.signsgdmw_weight_rms_arcsine, dict(lr=1e-3, weight_decay=0.1, beta1=-0.5), "beta1: -0.5"),
    (theory.signsgdmw_weight_rms_arcsine, dict(lr=1e-3, weight_decay=0.1, beta1=0.9, t=-3), "step count t: -3"),
]


@pytest.mark.parametrize("fn,kwargs,match", BAD_INPUTS, ids=[f"{f.__name__}-{m}" for f, _, m in BAD_INPUTS])
def test_invalid_inputs_name_the_parameter_and_value(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


def test_valid_edge_inputs():
    assert theory.adamw_update_rms(0.0) == 1.0           # no momentum: u = g/|g|
    assert theory.signsgdm_update_rms_ratio(0.0) == 1.0
    assert theory.adamw_weight_rms_at(1e-3, 0.0, 0, 0.0) == 0.0
    assert theory.ema_of_ema_mean_coefficient(0.9, 0.99, np.int64(3)) > 0  # numpy integers are step counts
    assert theory.half_life_p(1e-3, 1000.0) == pytest.approx((math.sqrt(2) - 1) / 1.0, rel=1e-12)


@pytest.mark.parametrize("t", [1e-17, 1e-300])
def test_ema_of_ema_variance_approx_near_t_zero_is_finite(t):
    """1 − β3^t taken as −expm1(t·ln β3): finite for tiny t, where β3^t rounds to 1."""
    value = theory.ema_of_ema_variance_approx(0.99, t)
    assert math.isfinite(value) and value > 1e15


def test_ema_of_ema_variance_approx_refuses_an_underflowing_t():
    with pytest.raises(ValueError, match="too small"):
        theory.ema_of_ema_variance_approx(0.99, 1e-323)


@pytest.mark.parametrize("beta,beta3,t", [(0.999, 0.99, 100_000), (0.9, 0.5, 2000), (0.99, 0.999, 5000), (0.5, 0.9, 3)])
def test_nested_coefficients_when_beta_exceeds_beta3(beta, beta3, t):
    """β > β3 (β2 = 0.999 averaged by β3 = 1 − ηλ = 0.99): the sums stay finite (no
    0·inf once β3^n underflows), equal to S_n = β3·S_{n−1} + β^{n−1} added one by one."""
    s = total = total_sq = 0.0
    for n in range(1, t + 1):
        s = beta3 * s + beta ** (n - 1)
        total, total_sq = total + s, total_sq + s * s
    weight = (1 - beta3) * (1 - beta) / (1 - beta3 ** t)
    assert theory.ema_of_ema_mean_coefficient(beta, beta3, t) == pytest.approx(weight * total, rel=1e-12, abs=0)
    assert theory.ema_of_ema_variance_coefficient(beta, beta3, t) == pytest.approx(weight ** 2 * total_sq, rel=1e-12, abs=0)


@pytest.mark.parametrize("call,match", [
    (lambda: theory.adamw_averaged_update_rms(1e-3, 0.1, 1e-320), r"Invalid step count t: 1e-320 \(too small"),
    (lambda: theory.ema_of_ema_variance_coefficient(1e-200, 1e-300, 2 ** 23), r"Invalid beta3: 1e-300 .*float64"),
    (lambda: theory.signsgdmw_weight_rms_arcsine(1e-3, 1e-6, 0.99999999), r"Invalid beta1: 0.99999999 .*terms"),
    (lambda: theory.signsgdmw_weight_rms_arcsine(1.0, 1e-320, 0.5), r"Invalid weight_decay: 1e-320 .*float64"),
    (lambda: theory.half_life_p(1e-320, 2.0), r"Invalid half_life: 2.0 at lr=1e-320"),
    (lambda: theory.half_life_p(1e-3, None), r"Invalid half_life: None"),
], ids=["t-subnormal", "closed-form-overflow", "arcsine-too-many-terms", "arcsine-overflow", "p-overflow",
        "half-life-none"])
def test_theory_inputs_beyond_float64_are_named(call, match):
    """Valid-looking inputs whose values leave float64's range: a ValueError naming
    them, not ZeroDivisionError, OverflowError, inf or NaN."""
    with pytest.raises(ValueError, match=match):
        call()


def test_theory_products_that_underflow_take_their_limits():
    """ηλ below float64's range: β3 → 1, the λ → 0 limits (no division by the product);
    snr = ∞ is 1 whatever the noise term (a t too small for it included)."""
    assert theory.adamw_averaged_update_rms(1e-4, 0.1, 1e-310, snr=math.inf) == 1.0
    assert theory.adamw_averaged_update_rms(1e-160, 1e-163, 1) == pytest.approx(1.0, rel=1e-12, abs=0)  # ηλ subnormal
    assert theory.adamw_averaged_update_rms(1e-300, 1e-200, 1) == pytest.approx(1.0, rel=1e-12, abs=0)
    assert theory.signsgdmw_weight_rms_arcsine(1e-200, 1e-200, 0.0) == pytest.approx(math.sqrt(0.5), rel=1e-12, abs=0)
    # ηλ normal but t·ηλ subnormal (a fractional t): the λ → 0 limit too, to all digits
    for t in (1e-22, 1e-20):
        assert theory.adamw_averaged_update_rms(1.0, 1e-300, t) == pytest.approx(
            theory.adamw_averaged_update_rms(1.0, 0.0, t), rel=1e-15, abs=0)
    assert theory.adamw_weight_rms_signal_dominated(1.0, 1e-300, 1e-22, 0.0, math.inf) == pytest.approx(
        theory.adamw_weight_rms_signal_dominated(1.0, 0.0, 1e-22, 0.0, math.inf), rel=1e-15, abs=0)


@pytest.mark.parametrize("call", [
    lambda: theory.adamw_weight_rms("3e-3", 0.1),
    lambda: theory.adamw_weight_rms(3e-3, "0.1"),
    lambda: theory.half_life_p(3e-3, bytearray(b"1")),
    lambda: theory.adamw_update_rms_snr(0.9, "1"),
    lambda: theory.adamw_weight_rms(2.0, 1.0),  # ηλ ≥ 1: no β3 in (0, 1]
])
def test_text_and_lr_times_weight_decay_of_one_or_more_are_refused(call):
    """As the optimizers refuse it, text is not a number here either; and the
    equilibrium RMS, like β3, needs ηλ < 1."""
    with pytest.raises(ValueError, match="Invalid"):
        call()


def test_the_equilibrium_rms_of_a_tiny_weight_decay_is_finite():
    """sqrt(η/2λ) is representable though η/2λ overflows float64."""
    rms = theory.adamw_weight_rms(3e-3, 1e-320)
    assert math.isfinite(rms) and math.isclose(rms, math.sqrt(3e-3) / math.sqrt(2e-320), rel_tol=1e-12)
    assert math.isclose(theory.adamw_weight_rms(1e-3, 0.1), math.sqrt(1e-3 / 0.2), rel_tol=1e-15)
