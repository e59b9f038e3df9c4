"""amos_fused/norm_scaled.py: the rules that scale each tensor's Adam direction
u = m̂/(sqrt(v̂)+ε) by a norm: ScaledAdamW (scale-aware Adam derived from Amos by
Su Jianlin, kexue.fm, 2022-11-22) and LAMB.  Group values, closed forms (zero
norms, the half-life helper, the step norm in every dtype) on both backends.
The kernels against the reference: test_cpu.py; bad input: test_api.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from amos_fused import reference
from conftest import make_grads, make_params
from registry import DTYPE_IDS, Case

pytestmark = pytest.mark.usefixtures("one_thread_outside_the_kernels")


def make_opt(cls, params, backend, **kwargs):
    return Case(cls).make(params, backend, threads=True, **kwargs)


# ---------------------------------------------------------------------------
# Group values: p from half_life, ‖ε0‖ from sigma
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["inverse_square", "inverse_time"])
def test_scaled_adamw_group_values(decay):
    torch.manual_seed(0)
    matrix, vector, zeros = torch.randn(5, 7), torch.randn(4), torch.zeros(3, 3)
    params = [matrix, vector, zeros]
    opt = af.ScaledAdamW(params, lr=0.05, decay=decay, backend="reference")
    group = opt.param_groups[0]
    assert group["p"] is None and group["half_life"] is None  # no decay of the rate
    rms = float(matrix.double().pow(2).mean().sqrt())
    expected = (math.sqrt(35) * rms, math.sqrt(4) * 0.5, math.sqrt(9) * 0.5)
    assert group["init_norm"] == pytest.approx(expected, rel=1e-12)

    opt = af.ScaledAdamW(params, lr=0.05, decay=decay, half_life=17, sigma=0.3, backend="reference")
    group = opt.param_groups[0]
    # p is derived from the half-life (and the current lr) when the step runs
    assert group["p"] is None and group["half_life"] == 17
    assert group["init_norm"] == pytest.approx(tuple(math.sqrt(p.numel()) * 0.3 for p in params), rel=1e-15)

    opt = af.ScaledAdamW(params, lr=0.05, decay=decay, p=0.7, backend="reference")
    assert opt.param_groups[0]["p"] == 0.7


# ---------------------------------------------------------------------------
# Zero norms
# ---------------------------------------------------------------------------

def _s(step, lr, p, decay):
    """s(t), written out independently of the library (eqs. alpha-rho-3 / alpha-rho-4 of
    Su Jianlin's kexue.fm post, 2022-11-22)."""
    if decay == "inverse_square":
        return 1.0 / (lr * p * step + 1.0) ** 2
    return 1.0 / (2.0 * lr * p * step + 1.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("decay", ["inverse_square", "inverse_time"])
def test_scaled_adamw_zero_direction_only_decays(backend, decay):
    """A tensor whose grad and state are all zero has u = 0, ‖u‖ = 0: no scaled
    update, only θ ← θ − ρ_t·θ; the other tensors of the bucket still move."""
    lr, p, q = 0.3, 2.0, 0.7
    params = make_params(torch.float64, 1, [(5, 7), (4, 6), ()])
    zero_start = params[1].detach().clone()
    others = [params[0].detach().clone(), params[2].detach().clone()]
    opt = make_opt(af.ScaledAdamW, params, backend, lr=lr, p=p, q=q, decay=decay)
    expected = zero_start.clone()
    for step in range(1, 4):
        grads = make_grads(params, step)
        grads[1] = torch.zeros_like(params[1])
        for param, grad in zip(params, grads):
            param.grad = grad
        opt.step()
        expected = expected - lr**2 / (2 * q) * _s(step, lr, p, decay) * expected
        torch.testing.assert_close(params[1].detach(), expected, rtol=1e-13, atol=0)
    state = opt.state[params[1]]
    assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    assert float(state["step"]) == 3.0
    assert not torch.equal(params[0].detach(), others[0]) and not torch.equal(params[2].detach(), others[1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scaled_adamw_zero_param_moves_by_the_init_norm(backend):
    """θ = 0 (σ inferred 0.5): ρθ = 0 and the step has norm exactly α0·‖ε0‖·s(1)."""
    lr, p = 0.1, 1.5
    param = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    opt = make_opt(af.ScaledAdamW, [param], backend, lr=lr, p=p)
    param.grad = make_grads([param], 0)[0]
    opt.step()
    norm = float(param.detach().norm())
    assert norm == pytest.approx(lr * math.sqrt(30) * 0.5 * _s(1, lr, p, "inverse_square"), rel=1e-13)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lamb_zero_direction(backend):
    """Zero grads and zero state: u = λθ.  Without weight decay u = 0 (ratio 1,
    nothing moves); with it the trust ratio is ‖θ‖/‖λθ‖ = 1/λ, so θ ← θ·(1 − lr)."""
    params = make_params(torch.float64, 2, [(5, 7), (13,)])
    start = [p.detach().clone() for p in params]
    still = make_opt(af.Lamb, params[:1], backend, lr=0.1)
    decayed = make_opt(af.Lamb, params[1:], backend, lr=0.1, weight_decay=0.3)
    for step in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        still.step()
        decayed.step()
    assert torch.equal(params[0].detach(), start[0])
    torch.testing.assert_close(params[1].detach(), start[1] * 0.9**3, rtol=1e-14, atol=0)
    for opt, p in ((still, params[0]), (decayed, params[1])):
        assert float(opt.state[p]["step"]) == 3.0
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
def test_lamb_zero_param_has_ratio_one(backend, weight_decay):
    """θ = 0: the trust ratio is 1, so θ_1 = −lr·u with u = m̂/(sqrt(v̂)+ε) = g/(|g|+ε)."""
    lr, eps = 0.1, 1e-6
    params = [torch.zeros(7, 3, dtype=torch.float64, requires_grad=True),
              torch.zeros((), dtype=torch.float64, requires_grad=True)]
    grads = make_grads(params, 0)
    opt = make_opt(af.Lamb, params, backend, lr=lr, eps=eps, weight_decay=weight_decay)
    for param, grad in zip(params, grads):
        param.grad = grad
    opt.step()
    for param, grad in zip(params, grads):
        torch.testing.assert_close(param.detach(), -lr * grad / (grad.abs() + eps), rtol=1e-13, atol=0)


@pytest.mark.parametrize("cls", [af.Lamb, af.ScaledAdamW])
@pytest.mark.parametrize("lr", [0.0, 1e-3])
def test_a_direction_tiny_against_its_scale_steps_finite_on_the_reference(cls, lr):
    """‖u‖ so small that k = (η‖θ‖ or α0‖ε0‖s)/‖u‖ is beyond float32 (one subnormal grad,
    the rest zero): each |k·u_i| is at most the numerator, so float32 θ steps as the
    float64 run does, with no 0·Inf = NaN where u_i = 0 and θ kept exactly at lr = 0."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    grad = torch.zeros(1000)
    grad[0] = 1e-44
    results = {}
    for dtype in (torch.float32, torch.float64):
        param = start.to(dtype, copy=True).requires_grad_()
        param.grad = grad.to(dtype)
        make_opt(cls, [param], "reference", lr=lr, eps=1e-3).step()
        results[dtype] = param.detach()
    assert torch.isfinite(results[torch.float32]).all()
    if lr == 0.0:
        assert torch.equal(results[torch.float32], start)
    torch.testing.assert_close(results[torch.float32], results[torch.float64].float(), rtol=2e-7, atol=0)


# ---------------------------------------------------------------------------
# Half-life
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["inverse_square", "inverse_time"])
@pytest.mark.parametrize("lr", [1e-3, 0.05, 0.7])
@pytest.mark.parametrize("half_life", [1, 10, 1000, 12_345])
def test_half_life_p_halves_the_schedule(decay, lr, half_life):
    p = af.half_life_p(lr, half_life, decay)
    s0 = reference.scaled_lr_schedule(0, lr, p, decay)
    assert s0 == 1.0
    assert abs(reference.scaled_lr_schedule(half_life, lr, p, decay) / s0 - 0.5) <= 1e-12
    # and it is the closed form α0·p = (√2−1)/T, α0·p0 = 1/(2T)
    expected = (math.sqrt(2) - 1) / half_life if decay == "inverse_square" else 1 / (2 * half_life)
    assert lr * p == pytest.approx(expected, rel=1e-14)
    # monotone: the rate is above one half before T and below after
    assert reference.scaled_lr_schedule(half_life - 0.5, lr, p, decay) > 0.5
    assert reference.scaled_lr_schedule(half_life + 0.5, lr, p, decay) < 0.5


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("decay", ["inverse_square", "inverse_time"])
def test_half_life_end_to_end(backend, decay):
    """ScaledAdamW(half_life=T): the applied scaled step α_t·u (the parameter change
    minus its ρ_t·θ part) has norm α0·‖ε0‖·s(t); it halves from s(0) = 1 at t = T,
    and its ratio between t = T+1 and t = 1 is s(T+1)/s(1)."""
    lr, half_life, sigma, q = 0.05, 8, 0.25, 1.0
    n = 64
    param = make_params(torch.float64, 4, [(n,)])[0]
    grad = make_grads([param], 0)[0]  # a fixed gradient: u keeps its direction
    opt = make_opt(af.ScaledAdamW, [param], backend, lr=lr, half_life=half_life, sigma=sigma,
                   decay=decay, q=q)
    p = af.half_life_p(lr, half_life, decay)
    init_norm = math.sqrt(n) * sigma
    applied = {}
    for t in range(1, half_life + 2):
        before = param.detach().clone()
        param.grad = grad.clone()
        opt.step()
        rho = lr**2 / (2 * q) * _s(t, lr, p, decay)
        scaled_step = before - param.detach() - rho * before
        applied[t] = float(scaled_step.norm())
        assert applied[t] == pytest.approx(lr * init_norm * _s(t, lr, p, decay), rel=1e-10), t
        # the direction is the Adam direction u, which for a fixed g is g/(|g| + ε·...)
        cosine = float(torch.dot(scaled_step, grad.sign()) / (scaled_step.norm() * math.sqrt(n)))
        assert cosine > 0.999
    assert applied[half_life] / (lr * init_norm) == pytest.approx(0.5, rel=1e-10)
    ratio = applied[half_life + 1] / applied[1]
    assert ratio == pytest.approx(_s(half_life + 1, lr, p, decay) / _s(1, lr, p, decay), rel=1e-10)
    # strictly above one half before T, strictly below after
    assert applied[half_life + 1] / (lr * init_norm) < 0.5 < applied[half_life - 1] / (lr * init_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scaled_step_norm_in_every_dtype(dtype, backend):
    """Whatever the storage dtype, the scaled step has norm α0·‖ε0‖·s(t) — up to the
    rounding of θ to the storage dtype (step entries ~0.1 here, so a few % at most
    in bf16).  Random grads include tiny entries whose v = (1−β2)·g² is below
    float16's smallest subnormal."""
    lr, p, sigma = 0.5, 1.0, 0.25
    params = make_params(dtype, 5, [(1000,), (40, 25)])
    opt = make_opt(af.ScaledAdamW, params, backend, lr=lr, p=p, sigma=sigma)
    rel = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for t in range(1, 4):
        before = [q.detach().double() for q in params]  # a copy: params are stepped in place
        for param, grad in zip(params, make_grads(params, t)):
            param.grad = grad
        opt.step()
        rho = lr**2 / 2 * _s(t, lr, p, "inverse_square")
        for param, old in zip(params, before):
            applied = float((old * (1 - rho) - param.detach().double()).norm())
            expected = lr * math.sqrt(param.numel()) * sigma * _s(t, lr, p, "inverse_square")
            assert applied == pytest.approx(expected, rel=rel), f"step {t}, shape {tuple(param.shape)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lamb_step_norm_in_every_dtype(dtype, backend):
    """LAMB's step η·(‖θ‖/‖u‖)·u has norm η·‖θ‖ by construction, in every storage
    dtype (up to rounding θ, ~1% in bf16 with steps of ~0.1·|θ|)."""
    lr = 0.1
    params = make_params(dtype, 7, [(1000,), (40, 25)])
    opt = make_opt(af.Lamb, params, backend, lr=lr, weight_decay=0.01)
    rel = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for t in range(1, 4):
        before = [q.detach().double() for q in params]  # a copy: params are stepped in place
        for param, grad in zip(params, make_grads(params, t)):
            param.grad = grad
        opt.step()
        for param, old in zip(params, before):
            applied = float((old - param.detach().double()).norm())
            assert applied == pytest.approx(lr * float(old.norm()), rel=rel), f"step {t}, shape {tuple(param.shape)}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scaled_adamw_with_a_half_life_steps_at_lr_zero(backend):
    """A warm-up from lr = 0 (and DCP's state initialisation, which steps at lr = 0):
    no step is taken, the moments advance, and the schedule goes on from there."""
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    twin = torch.nn.Parameter(p.detach().clone())
    opt = af.ScaledAdamW([p], lr=0.0, half_life=5, backend=backend)
    ref = af.ScaledAdamW([twin], lr=0.0, p=0.0, backend=backend)
    start = p.detach().clone()
    for o, q in ((opt, p), (ref, twin)):
        q.grad = torch.ones_like(q)
        o.step()
    assert torch.equal(p.detach(), start) and torch.equal(p.detach(), twin.detach())
    assert torch.equal(opt.state[p]["exp_avg"], ref.state[twin]["exp_avg"])
    opt.param_groups[0]["lr"] = 1e-2
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), start)


@pytest.mark.parametrize("value", [lambda: torch.tensor([1.0, 2.0]), lambda: __import__("numpy").array([1.0, 2.0])],
                         ids=["tensor", "array"])
def test_init_norm_as_a_vector_is_taken_between_steps_as_at_construction(value):
    ps = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3, 6))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = af.ScaledAdamW([{"params": ps, "init_norm": value()}], lr=1e-3, half_life=10, backend="cpu")
    ref = af.ScaledAdamW([{"params": twins, "init_norm": (1.0, 2.0)}], lr=1e-3, half_life=10, backend="cpu")
    for step in range(2):
        for p, q in zip(ps, twins):
            p.grad = q.grad = torch.full_like(p, 0.1 * (step + 1))
        opt.step()
        ref.step()
        opt.param_groups[0]["init_norm"] = value()
    assert all(torch.equal(p, q) for p, q in zip(ps, twins))


def test_a_float64_params_init_norm_is_not_held_to_float32s_range():
    big = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64) * 1e38)
    small = torch.nn.Parameter(torch.randn(16, 8))
    opt = af.ScaledAdamW([big, small], lr=1e-3, half_life=100, backend="cpu")
    assert opt.param_groups[0]["init_norm"][0] > torch.finfo(torch.float32).max


def test_a_numpy_array_decay_is_named():
    import numpy as np
    with pytest.raises(ValueError, match=r"Invalid decay: array"):
        af.ScaledAdamW([torch.nn.Parameter(torch.randn(6, 5))], half_life=10, decay=np.array(["inverse_time", "x"]))


@pytest.mark.parametrize("make", [lambda v: torch.tensor(v, dtype=torch.float64), lambda v: __import__("numpy").array(v)],
                         ids=["tensor", "array"])
def test_an_init_norm_vector_set_between_steps_is_range_checked(make):
    """As a tuple is: an entry beyond float32's range is refused before any write."""
    ps = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = af.ScaledAdamW(ps, lr=1e-3, half_life=100, backend="cpu")
    for p in ps:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in ps]
    opt.param_groups[0]["init_norm"] = make([1e300, 1.0])
    with pytest.raises(ValueError, match=r"Invalid init_norm\[0\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_half_life_whose_p_leaves_float32s_range_is_named_for_float32_params(backend):
    """p = (√2−1)/(half_life·lr) beyond float32's range: refused for float32 params
    (whose step computes in float32) naming half_life and lr, the values the user
    gave (not the derived p); float64 params take it."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid half_life: 1e-40 at lr=0.001 \(the p they "
                                         r"give, 4.142e\+42, is beyond float32's range"):
        af.ScaledAdamW([p], lr=1e-3, half_life=1e-40, backend=backend)
    opt = af.ScaledAdamW([p], lr=1e-3, half_life=10, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["half_life"] = 1e-40
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"Invalid half_life: 1e-40 at lr=0.001"):
        opt.step()
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    af.ScaledAdamW([torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))], lr=1e-3, half_life=1e-40,
                   backend=backend)


@pytest.mark.parametrize("decay", ["inverse_square", "inverse_time"])
@pytest.mark.parametrize("lr, half_life", [(1e-3, 100), (3e-4, 7.5), (10.0, 1e-309), (0.0, 100)])
def test_a_capturable_steps_p_from_a_tensor_lr_is_the_hosts(decay, lr, half_life):
    """With capturable=True and a tensor lr, p is derived from the half-life on the
    device: bitwise the p a host step at that lr uses (one division in float64), also
    where (√2−1)/half_life alone would overflow; 0 at lr = 0 (no step is taken)."""
    opt = af.ScaledAdamW([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))], lr=10.0, half_life=half_life,
                         decay=decay)
    group = dict(opt.param_groups[0])
    for dtype in (torch.float32, torch.float64):
        group["lr"] = torch.tensor(lr, dtype=dtype)
        host = {**group, "lr": float(group["lr"])}
        opt._check_group(host)
        assert opt._capturable_hyper(None, group)["p"].item() == opt._schedule_p(host)  # (no bucket: none read)
