"""amos_fused/reference.py, the eager reference backend (the ground truth of every
kernel test), against torch.optim and independent implementations, in float64.
Params AND states are compared after 10+ steps over two param groups, a 0-dim and
a 0-element param, and None grads on some steps.

* Adam / AdamW / RAdam against torch.optim, Lion against an independent
  implementation: torch.testing.assert_close's default tolerances (rtol 1e-7,
  atol 1e-7 for float64).
* Amos against an independent, deliberately plain implementation of the Amos
  update (Tian & Parikh, arXiv:2210.11693, with the semantics of
  google-research/jestimator's amos.py) written here, for every kind of slot, and
  against the PyPI package pytorch-optimizer's Amos (scalar slots only,
  extra_l2 = 0) when it is installed: registry.TIGHT, rtol=1e-10, atol=1e-12.
  Both sides do the same math in double with a different operation order
  (sum/count vs mean, division vs reciprocal), ~1e-16 relative per operation,
  over 12 steps."""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from conftest import (
    SHAPES,
    assert_moved,
    assert_params_close,
    assert_run_close,
    assert_state_close,
    clone_params,
    make_params,
    param_groups,
    run_pair,
    states_of,
)
from registry import CASES, TIGHT, TORCH_TWIN_GRID

STEPS = 12


# ---------------------------------------------------------------------------
# Adam family vs torch.optim
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TORCH_TWIN_GRID)
def test_matches_torch(name):
    """AdamW / Adam (L2) / RAdam (L2 and decoupled) with and without weight decay
    and amsgrad, against their torch.optim twins."""
    case = CASES[name]
    run = run_pair(case.factory("reference"), case.torch_factory(), steps=STEPS)
    assert_moved(run)
    assert_run_close(run)
    assert all(set(s) == case.state_keys() for s in run.states_a())


# ---------------------------------------------------------------------------
# Lion vs an independent implementation (lucidrains/lion-pytorch formulation)
# ---------------------------------------------------------------------------

class _IndependentLion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - lr * wd)
                update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion_matches_independent_implementation(weight_decay):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    run = run_pair(
        lambda g: af.Lion(g, backend="reference", **kw),
        lambda g: _IndependentLion(g, **kw),
        steps=STEPS,
    )
    assert_moved(run)
    assert_params_close(run.params_a, run.params_b)
    assert_state_close(run.states_a(), run.states_b(), keys=("exp_avg",))
    # Lion keeps a step counter (for checkpoints): 12 steps, minus the None grads.
    steps = [float(s["step"]) for s in run.states_a() if s]
    assert max(steps) == STEPS and min(steps) == STEPS - 1


# ---------------------------------------------------------------------------
# bias_correction=False (BERT style) vs a hand computation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_no_bias_correction_hand_computed(backend, decoupled):
    lr, beta1, beta2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.1
    p0 = [1.0, -2.0, 0.25]
    grads = [[0.5, -1.0, 0.0], [-0.25, 2.0, 1.5], [1.0, 0.5, -3.0]]

    # By hand, element by element, with Python floats.
    expected, ms, vs = list(p0), [0.0] * 3, [0.0] * 3
    for g in grads:
        for i in range(3):
            gi = g[i] if decoupled else g[i] + wd * expected[i]
            ms[i] = beta1 * ms[i] + (1 - beta1) * gi
            vs[i] = beta2 * vs[i] + (1 - beta2) * gi * gi
            theta = expected[i] * (1 - lr * wd) if decoupled else expected[i]
            expected[i] = theta - lr * ms[i] / (math.sqrt(vs[i]) + eps)

    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    cls = af.AdamW if decoupled else af.Adam
    opt = cls([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
              bias_correction=False, backend=backend)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(ms, dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(vs, dtype=torch.float64))
    assert float(opt.state[p]["step"]) == len(grads)
    # And it really differs from the bias-corrected update.
    q = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    corrected = cls([q], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, backend=backend)
    for g in grads:
        q.grad = torch.tensor(g, dtype=torch.float64)
        corrected.step()
    assert not torch.allclose(p.detach(), q.detach())


# ---------------------------------------------------------------------------
# lr schedules
# ---------------------------------------------------------------------------

# id -> (ours on the reference backend, torch.optim's twin), from the registry
_OPTIMIZERS = {
    key: (CASES[name].factory("reference"), CASES[name].torch_factory())
    for key, name in {"adamw": "adamw-amsgrad", "adam": "adam-l2", "radam": "radam"}.items()
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_lr_written_to_group_each_step(name):
    make_ours, make_torch = _OPTIMIZERS[name]

    def schedule(step, opt_a, opt_b):
        for opt in (opt_a, opt_b):
            for k, group in enumerate(opt.param_groups):
                group["lr"] = 1e-2 * (0.7 ** step) * (k + 1) + (1e-3 if step % 3 == 0 else 0.0)

    run = run_pair(make_ours, make_torch, steps=STEPS, before_step=schedule)
    assert_moved(run)
    assert_run_close(run)


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_step_lr_scheduler(name):
    make_ours, make_torch = _OPTIMIZERS[name]
    schedulers = []

    def schedule(step, opt_a, opt_b):
        if step == 0:
            schedulers.extend(torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3) for o in (opt_a, opt_b))
        else:
            for s in schedulers:
                s.step()

    run = run_pair(make_ours, make_torch, steps=STEPS, before_step=schedule)
    assert_run_close(run)
    lrs = [g["lr"] for g in run.opt_a.param_groups]
    assert lrs == [g["lr"] for g in run.opt_b.param_groups]
    assert lrs[0] == pytest.approx(1e-2 * 0.3 ** ((STEPS - 1) // 3))


def test_lr_change_really_matters():
    """Guards the schedule tests: a changed lr changes the result."""
    fixed = run_pair(*_OPTIMIZERS["adamw"], steps=4)

    def halve(step, opt_a, opt_b):
        for opt in (opt_a, opt_b):
            for group in opt.param_groups:
                group["lr"] = 5e-3

    changed = run_pair(*_OPTIMIZERS["adamw"], steps=4, before_step=halve)
    assert_run_close(changed)
    assert not torch.allclose(fixed.params_a[2].detach(), changed.params_a[2].detach())


# ---------------------------------------------------------------------------
# closure, zero_grad
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_closure_returns_loss_and_matches_torch(backend):
    base = make_params(torch.float64)
    targets = [torch.full_like(p, 0.5) for p in base]
    ours_params, torch_params = clone_params(base), clone_params(base)
    ours = af.AdamW(param_groups(ours_params), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(param_groups(torch_params), lr=1e-2)

    def closure_for(opt, params):
        def closure():
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() * (i + 1) for i, (p, t) in enumerate(zip(params, targets)))
            loss.backward()
            return loss
        return closure

    losses = []
    for _ in range(10):
        loss_ours = ours.step(closure_for(ours, ours_params))
        loss_theirs = theirs.step(closure_for(theirs, torch_params))
        assert isinstance(loss_ours, torch.Tensor) and loss_ours.requires_grad
        torch.testing.assert_close(loss_ours.detach(), loss_theirs.detach())
        losses.append(float(loss_ours.detach()))
    assert losses[-1] < losses[0]  # it optimizes
    assert_params_close(ours_params, torch_params)
    assert_state_close(states_of(ours, ours_params), states_of(theirs, torch_params))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_without_closure_returns_none(backend):
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.float64)
    assert af.Adam([p], backend=backend).step() is None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_grad(backend):
    params = make_params(torch.float64)
    opt = af.AdamW(param_groups(params), lr=1e-2, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    # A step with no grads at all changes nothing (as in torch.optim).
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert [float(opt.state[p]["step"]) for p in params] == steps


# ---------------------------------------------------------------------------
# several buckets in one group
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_mixed_dtypes_in_one_group_matches_torch(name):
    """float32 and float64 params in ONE group (two buckets) are all stepped, every step."""
    make_ours, make_torch = _OPTIMIZERS[name]
    base = make_params(torch.float64, seed=3)
    params = [p.detach().to(torch.float32 if i % 2 else torch.float64).requires_grad_(True)
              for i, p in enumerate(base)]
    run = run_pair(make_ours, make_torch, params=params, steps=6, split=len(params), none_grads={})
    assert len(run.opt_a.param_groups) == 1
    assert_moved(run)
    assert_run_close(run)
    assert all(float(s["step"]) == 6 for s in run.states_a())


# ---------------------------------------------------------------------------
# An independent Amos, straight from the paper and jestimator's amos.py
# ---------------------------------------------------------------------------

def _reduced_dims(reduce_axes, ndim):
    if reduce_axes is None:
        return None
    if reduce_axes == "all":
        return list(range(ndim))
    return sorted(a % ndim for a in reduce_axes)


class IndependentAmos(torch.optim.Optimizer):
    """Per tensor, per step (t 1-based):
        g ← clamp(g, ±clip);  g2 = mean(g², reduce_axes);  v ← βv + (1−β)g2
        r = (1−β^t)/max(v, ε);  c = (1 + c_coef·√ξ·b)^(−1/2);  γ = c·ξ²·r·g2
        α = ξη;  d = 1/(1 + d_coef·√α·b)
        Δ = d·((−γ/2 − extra_l2)·θ − α·√r·g);  b ← b + γ(1 + b)
        mu ← momentum·mu + (1−momentum)·Δ, Δ ← mu;  θ ← θ + Δ
    Empty tensors are skipped (their mean is undefined; there is nothing to move)."""

    def __init__(self, params, lr, etas, reduce_axes=None, beta=0.999, momentum=None,
                 clip_value=None, extra_l2=0.0, d_coef=0.25, c_coef=0.25, epsilon=2.0**-125):
        super().__init__(params, dict(lr=lr, reduce_axes=reduce_axes, beta=beta, momentum=momentum,
                                      clip_value=clip_value, extra_l2=extra_l2, d_coef=d_coef,
                                      c_coef=c_coef, epsilon=epsilon))
        self.etas = etas  # {id(param): eta}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            xi, beta = group["lr"], group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"] = 0
                    dims = _reduced_dims(group["reduce_axes"], p.dim())
                    if dims is None:
                        slot = tuple(p.shape)
                    elif group["reduce_axes"] == "all":
                        slot = ()
                    else:
                        slot = tuple(1 if i in dims else n for i, n in enumerate(p.shape))
                    state["v"] = torch.zeros(slot, dtype=p.dtype)
                    state["b"] = torch.zeros(slot, dtype=p.dtype)
                    if group["momentum"] is not None:
                        state["mu"] = torch.zeros_like(p)
                state["t"] += 1
                if p.numel() == 0:
                    continue
                t = state["t"]
                g = p.grad.clone()
                if group["clip_value"] is not None:
                    g = torch.clamp(g, min=-group["clip_value"], max=group["clip_value"])
                dims = _reduced_dims(group["reduce_axes"], p.dim())
                if dims is None:
                    g2 = g.square()
                elif len(dims) == 0:  # 'all' of a 0-dim tensor
                    g2 = g.square()
                else:
                    count = math.prod(p.shape[d] for d in dims)
                    g2 = g.square().sum(dim=dims, keepdim=True) / count
                    g2 = g2.reshape(state["v"].shape)
                v, b = state["v"], state["b"]
                v_new = v * beta + g2 * (1.0 - beta)
                r = (1.0 - beta**t) / torch.maximum(v_new, torch.full_like(v_new, group["epsilon"]))
                c = torch.rsqrt(1.0 + group["c_coef"] * math.sqrt(xi) * b)
                gamma = c * xi * xi * r * g2
                alpha = xi * self.etas[id(p)]
                d = 1.0 / (1.0 + group["d_coef"] * math.sqrt(alpha) * b)
                delta = d * ((-gamma / 2.0 - group["extra_l2"]) * p - alpha * torch.sqrt(r) * g)
                b_new = b + gamma * (1.0 + b)
                if group["momentum"] is not None:
                    mu = state["mu"]
                    mu.copy_(group["momentum"] * mu + (1.0 - group["momentum"]) * delta)
                    delta = mu
                v.copy_(v_new)
                b.copy_(b_new)
                p.add_(delta)


def _rms_eta(p):
    if p.numel() == 0:
        return 0.5
    rms = p.detach().square().mean().sqrt().item()
    return rms if rms > 0 else 0.5


# Param sets per kind of slot.  Tuple slots need every param to have the axes.
SLOT_CASES = {
    "elementwise": (None, SHAPES),
    "all": ("all", SHAPES),
    "rows": ((1,), [(37, 5), (16, 3), (3, 1, 7), (0, 4), (9, 33), (2, 2), (5, 19)]),
    "columns": ((0,), [(37, 5), (16, 3), (3, 1, 7), (0, 4), (9, 33), (2, 2), (5, 19)]),
}
CONFIGS = {
    "plain": dict(),
    "momentum": dict(momentum=0.9),
    "clip": dict(clip_value=0.5),
    "extra_l2": dict(extra_l2=1e-2),
    "everything": dict(momentum=0.8, clip_value=0.7, extra_l2=1e-3, beta=0.95, d_coef=0.5, c_coef=0.3),
}
FIRST = dict(lr=0.1, eta=0.7, beta=0.99)
SECOND = {"lr": 0.03, "eta": 0.3}


def _run_against_independent(reduce_axes, shapes, config, infer_eta=False, dtype=torch.float64, **kw):
    """Ours (eta 0.7 / 0.3 per group, or eta=None: inferred) vs IndependentAmos."""
    settings = {**FIRST, **config}
    second = dict(SECOND)
    if infer_eta:
        settings["eta"] = None
        del second["eta"]
    base = make_params(dtype, shapes=shapes)

    def ours(groups):
        return af.Amos(groups, reduce_axes=reduce_axes, backend="reference", **settings)

    def independent(groups):
        if infer_eta:  # the RMS of each initial tensor (0.5 where it is zero or empty)
            etas = {id(p): _rms_eta(p) for group in groups for p in group["params"]}
        else:
            etas = {id(p): group.get("eta", settings["eta"]) for group in groups for p in group["params"]}
        plain = {k: v for k, v in settings.items() if k != "eta"}
        plain_groups = [{k: v for k, v in g.items() if k != "eta"} for g in groups]
        return IndependentAmos(plain_groups, etas=etas, reduce_axes=reduce_axes, **plain)

    return run_pair(ours, independent, dtype=dtype, steps=STEPS, shapes=shapes, second_group=second,
                    params=base, **kw)


def _compare(run, tol=TIGHT):
    assert_moved(run)
    for i, (a, b) in enumerate(zip(run.params_a, run.params_b)):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, i=i: f"param {i}: {m}", **tol)
    for i, (sa, sb) in enumerate(zip(run.states_a(), run.states_b())):
        assert bool(sa) == bool(sb)
        if not sa:
            continue
        assert float(sa["step"]) == sb["t"], f"param {i}: step"
        for key in ("v", "b", "mu"):
            assert (key in sa) == (key in sb), f"param {i}: {key}"
            if key in sa:
                torch.testing.assert_close(sa[key], sb[key], msg=lambda m, i=i, key=key: f"param {i} {key}: {m}",
                                           **tol)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("slots", sorted(SLOT_CASES))
def test_reference_matches_independent(slots, config):
    reduce_axes, shapes = SLOT_CASES[slots]
    run = _run_against_independent(reduce_axes, shapes, CONFIGS[config])
    _compare(run)
    # b grew (the adaptive decay is active) wherever there were elements
    assert any(float(s["b"].abs().max()) > 0 for s in run.states_a() if s and s["b"].numel())


@pytest.mark.parametrize("slots", sorted(SLOT_CASES))
def test_reference_matches_independent_with_inferred_eta(slots):
    reduce_axes, shapes = SLOT_CASES[slots]
    run = _run_against_independent(reduce_axes, shapes, {"momentum": 0.9}, infer_eta=True)
    _compare(run)
    for group in run.opt_a.param_groups:
        assert isinstance(group["eta"], tuple) and len(group["eta"]) == len(group["params"])


def test_clip_value_matters():
    """Guards the clip case: with grads ~N(0,1) a clip at 0.5 changes the result."""
    reduce_axes, shapes = SLOT_CASES["all"]
    clipped = _run_against_independent(reduce_axes, shapes, {"clip_value": 0.5})
    plain = _run_against_independent(reduce_axes, shapes, {})
    assert not torch.allclose(clipped.params_a[3], plain.params_a[3])


# ---------------------------------------------------------------------------
# against pytorch-optimizer's Amos (PyPI `pytorch-optimizer`)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_matches_pytorch_optimizer_amos(momentum, foreach):
    po = pytest.importorskip("pytorch_optimizer")
    PoAmos = po.Amos
    # Its slots are scalars (the mean of g² over the whole tensor): reduce_axes='all'.
    # Its η is get_scale(p) (sqrt(2/fan_in) for matrices, 0.5 for vectors / scalars);
    # its eps is ADDED to v (ours is a floor), so eps=0 makes them identical (v > 0 here);
    # momentum 0.0 means "off" there; its extra_l2 term differs from jestimator's amos.py: 0 here.
    # No None grads: its step counter is per group, ours per param.
    shapes = [s for s in SHAPES if math.prod(s) > 0] + [(8, 3, 2)]
    lr, beta = 0.05, 0.99

    def ours(groups):
        for group in groups:
            group["eta"] = tuple(PoAmos.get_scale(p) for p in group["params"])
        return af.Amos(groups, lr=lr, beta=beta, reduce_axes="all", momentum=momentum, backend="reference")

    def theirs(groups):
        return PoAmos(groups, lr=lr, beta=beta, momentum=momentum or 0.0, extra_l2=0.0, eps=0.0,
                      foreach=foreach)

    run = run_pair(ours, theirs, steps=STEPS, shapes=shapes, second_group={"lr": 0.02}, none_grads={})
    assert_moved(run)
    for i, (a, b) in enumerate(zip(run.params_a, run.params_b)):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, i=i: f"param {i}: {m}", **TIGHT)
    for i, (sa, sb) in enumerate(zip(run.states_a(), run.states_b())):
        torch.testing.assert_close(sa["v"], sb["exp_avg_sq"], **TIGHT)
        torch.testing.assert_close(sa["b"], sb["decay"], **TIGHT)
        if momentum is not None:
            # theirs keeps the EMA of the update it subtracts: −Δ
            torch.testing.assert_close(sa["mu"], -sb["exp_avg"], **TIGHT)
        assert float(sa["step"]) == STEPS


@pytest.mark.parametrize("make", [lambda ps, b: af.Amos(ps, lr=0.1, backend=b),
                                  lambda ps, b: af.ScaledAdamW(ps, lr=0.1, half_life=10, backend=b)],
                         ids=["Amos", "ScaledAdamW"])
def test_a_huge_finite_lr_on_float64_params_steps_as_on_the_kernels(make):
    """float64 params take any finite lr (refused past float32's range only for
    float32 steps); lr² overflows to inf in the host coefficients, on the reference
    as in C++, rather than raising OverflowError half-way through a step."""
    results = []
    for backend in ("reference", "cpu"):
        p = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        opt = make([p], backend)
        for lr in (0.1, 1e300):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0].isnan(), results[1].isnan())
    assert torch.allclose(torch.nan_to_num(results[0]), torch.nan_to_num(results[1]), rtol=1e-12, atol=0)
