"""The eager reference backend against torch.optim (and an independent Lion), in
float64 with torch.testing.assert_close's default tolerances (rtol 1e-7,
atol 1e-7 for float64).  Params AND states are compared after 10+ steps over
two param groups, a 0-dim and a 0-element param, and None grads on some steps."""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from conftest import (
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

STEPS = 12


# ---------------------------------------------------------------------------
# Adam family vs torch.optim
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(amsgrad, weight_decay):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad)
    run = run_pair(
        lambda g: af.AdamW(g, backend="reference", **kw),
        lambda g: torch.optim.AdamW(g, **kw),
        steps=STEPS,
    )
    assert_moved(run)
    assert_run_close(run)
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    assert all(set(s) == keys for s in run.states_a())


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_l2_matches_torch(amsgrad, weight_decay):
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad)
    run = run_pair(
        lambda g: af.Adam(g, backend="reference", **kw),
        lambda g: torch.optim.Adam(g, **kw),
        steps=STEPS,
    )
    assert_moved(run)
    assert_run_close(run)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_radam_matches_torch(decoupled, weight_decay):
    # β2 = 0.999: ρ_t ≤ 5 for t ≤ 5, so the first steps take the momentum-only
    # branch and the later ones the rectified one.
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
              decoupled_weight_decay=decoupled)
    run = run_pair(
        lambda g: af.RAdam(g, backend="reference", **kw),
        lambda g: torch.optim.RAdam(g, **kw),
        steps=STEPS,
    )
    assert_moved(run)
    assert_run_close(run)


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

_OPTIMIZERS = {
    "adamw": (lambda g: af.AdamW(g, lr=1e-2, amsgrad=True, backend="reference"),
              lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True)),
    "adam": (lambda g: af.Adam(g, lr=1e-2, weight_decay=0.1, backend="reference"),
             lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1)),
    "radam": (lambda g: af.RAdam(g, lr=1e-2, weight_decay=0.1, backend="reference"),
              lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=0.1)),
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
