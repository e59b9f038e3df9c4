"""The rules that scale each tensor's Adam direction u = m̂/(sqrt(v̂)+ε) by a norm:
ScaledAdamW (scale-aware Adam derived from Amos by Su Jianlin, kexue.fm, 2022-11-22)
and LAMB.  The fused two-phase CPU kernels (``backend='cpu'``) against the eager
reference on both CPU instruction-set paths, closed forms (zero norms, the
half-life helper), determinism, and bad input.

Tolerances: every param and state tensor is compared with ``rtol`` plus an
absolute floor of ``atol × max|reference tensor|`` (v ≈ (1−β2)·g² is ~1e-3 while
params are O(1), so the floor follows each tensor's own scale); ``step`` must be
equal.

* float64: rtol=1e-10, atol=1e-12.  Double on both sides; only the order of
  operations differs (norms summed in float blocks then double in the kernel,
  FMAs on AVX2).  Measured <= 4.3e-16 relative to the tensor's max.
* float32: rtol=1.3e-6, atol=1e-5 (torch.testing's float32 defaults), applied with
  the scaled floor.  A few float32 ULP per step, the norm ratio ‖ε0‖/‖u‖ or
  ‖θ‖/‖u‖ adding one more rounding.  Measured <= 5.6e-7 relative to the max.
* bfloat16: rtol=2e-2, atol=1e-2: both sides compute in float32 and round every
  stored value to bf16 each step; a one-ULP float32 difference can flip one bf16
  rounding (<= 2^-7 relative), and such a flip in m or v moves later updates by a
  relative 2^-8, below a param ULP: <= ~2.5 ULP.
* float16 is held to the same argument (rtol=atol=2e-3, ~2 fp16 ULP).
"""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from amos_fused import reference
from conftest import (
    with_threads,
    SHAPES,
    assert_moved,
    make_grads,
    make_params,
    run_pair,
)

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
STEPS = 10

pytestmark = pytest.mark.usefixtures("one_thread_outside_the_kernels")


def make_opt(cls, params, backend, **kwargs):
    opt = cls(params, backend=backend, **kwargs)
    return with_threads(opt) if backend == "cpu" else opt


def factory(cls, backend, **kwargs):
    return lambda groups: make_opt(cls, groups, backend, **kwargs)


def assert_close_scaled(actual, expected, rtol, atol, what):
    """|a − e| <= atol·max|e| + rtol·|e| elementwise; same dtype and shape."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_run_close(run, dtype):
    tol = TOL[dtype]
    for i, (pa, pb) in enumerate(zip(run.params_a, run.params_b)):
        assert_close_scaled(pa, pb, what=f"param {i}", **tol)
    for i, (sa, sb) in enumerate(zip(run.states_a(), run.states_b())):
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq"}, f"param {i}: {sorted(sa)}"
        assert float(sa["step"]) == float(sb["step"]), f"param {i}: step"
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_scaled(sa[key], sb[key], what=f"param {i} state {key!r}", **tol)


SCALED_CONFIGS = {
    "square-p": dict(p=2.0, decay="inverse_square"),
    "time-p": dict(p=2.0, decay="inverse_time"),
    "square-half_life": dict(half_life=4, decay="inverse_square"),
    "time-half_life-q": dict(half_life=4, decay="inverse_time", q=0.5),
    "square-no_p-q": dict(decay="inverse_square", q=2.0),
    "time-no_p-sigma": dict(decay="inverse_time", sigma=0.02),
    "square-p-sigma-q": dict(p=1.0, decay="inverse_square", sigma=0.1, q=3.0, betas=(0.8, 0.95)),
}
LAMB_CONFIGS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.1),
    "no_bias_correction": dict(bias_correction=False, betas=(0.8, 0.9), weight_decay=0.01),
    "big_eps": dict(eps=1e-3, weight_decay=0.01),
}
ALGORITHMS = {
    **{f"scaled-{k}": (af.ScaledAdamW, dict(lr=0.05, **v)) for k, v in SCALED_CONFIGS.items()},
    **{f"lamb-{k}": (af.Lamb, dict(lr=0.05, **v)) for k, v in LAMB_CONFIGS.items()},
}


def _pair(name, dtype, shapes=SHAPES, steps=STEPS, **kwargs):
    cls, kw = ALGORITHMS[name]
    return run_pair(factory(cls, "cpu", **kw), factory(cls, "reference", **kw),
                    dtype=dtype, steps=steps, shapes=shapes, second_group={"lr": 0.02}, **kwargs)


# ---------------------------------------------------------------------------
# cpu vs reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cpu_matches_reference(name, dtype, capabilities):
    run = _pair(name, dtype)
    assert_moved(run)
    assert_run_close(run, dtype)


@pytest.mark.parametrize("name", ["scaled-square-p", "lamb-weight_decay"])
def test_cpu_matches_reference_float16(name, capabilities):
    run = _pair(name, torch.float16)
    assert_run_close(run, torch.float16)


# Tensors bigger than the parallel grain (32768 elements): a tensor's ‖u‖² (and ‖θ‖²)
# is summed by several threads and combined chunk by chunk.
BIG_SHAPES = [(40_000,), (300, 257), (5,), (), (0,), (33_000,), (7, 9), (65_537,)]


@pytest.mark.parametrize("name", ["scaled-time-half_life-q", "scaled-square-p-sigma-q", "lamb-weight_decay"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
def test_big_tensors_match_reference(name, dtype, capabilities):
    run = _pair(name, dtype, shapes=BIG_SHAPES, split=5, none_grads={3: (1,)})
    assert_moved(run)
    assert_run_close(run, dtype)


@pytest.mark.parametrize("name", ["scaled-square-p", "lamb-weight_decay"])
def test_deterministic(name, capabilities):
    """The kernels reduce norms in a fixed order: two runs agree bitwise."""
    cls, kw = ALGORITHMS[name]
    make = factory(cls, "cpu", **kw)
    run = run_pair(make, make, dtype=torch.float32, steps=4, shapes=BIG_SHAPES, split=len(BIG_SHAPES))
    for pa, pb in zip(run.params_a, run.params_b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(run.states_a(), run.states_b()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


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


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def _params():
    return make_params(torch.float32, 6, [(4, 3), (5,)])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,kwargs,match", [
    (af.ScaledAdamW, dict(p=0.1, half_life=10), "half_life"),
    (af.ScaledAdamW, dict(decay="exponential"), "decay"),
    (af.ScaledAdamW, dict(decay=None), "decay"),
    (af.ScaledAdamW, dict(q=0.0), "q"),
    (af.ScaledAdamW, dict(q=-1.0), "q"),
    (af.ScaledAdamW, dict(sigma=0.0), "sigma"),
    (af.ScaledAdamW, dict(sigma=-0.5), "sigma"),
    (af.ScaledAdamW, dict(lr=-1e-3), "learning rate"),
    (af.ScaledAdamW, dict(half_life=0), "half_life"),
    (af.ScaledAdamW, dict(p=-1.0), "p"),
    (af.Lamb, dict(lr=-1e-3), "learning rate"),
    (af.Lamb, dict(weight_decay=-0.1), "weight_decay"),
], ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_bad_input_raises_at_construction(cls, kwargs, match, backend):
    params = _params()
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        cls(params, backend=backend, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_p_and_half_life_in_one_group_raise():
    params = _params()
    with pytest.raises(ValueError, match="half_life"):
        af.ScaledAdamW([{"params": params[:1]}, {"params": params[1:], "p": 0.1, "half_life": 10}],
                       lr=0.01, backend="cpu")
