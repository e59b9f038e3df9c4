"""The reference Amos (backend='reference') against an independent, deliberately
plain implementation of the Amos update (Tian & Parikh, arXiv:2210.11693, with the
semantics of google-research/jestimator's amos.py) written here, in float64
(tight), for every kind of slot; its state layout; η inference; and against the
PyPI package pytorch-optimizer's Amos (scalar slots only, extra_l2 = 0) when it
is installed.

Tolerance: rtol=1e-10, atol=1e-12 in float64.  Both sides do the same math in
double with a different operation order (sum/count vs mean, division vs
reciprocal), ~1e-16 relative per operation, over 12 steps."""
from __future__ import annotations

import math

import pytest
import torch

import amos_fused as af
from conftest import (
    SHAPES,
    assert_moved,
    clone_params,
    make_grads,
    make_params,
    run_pair,
    set_grads,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)
STEPS = 12


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
# state layout and eta inference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("reduce_axes, expected", [
    (None, lambda shape: shape),
    ("all", lambda shape: ()),
    ((1,), lambda shape: (shape[0], 1) + shape[2:]),
    ((0,), lambda shape: (1,) + shape[1:]),
    ((-1,), lambda shape: shape[:-1] + (1,)),
    ((0, 1), lambda shape: (1, 1) + shape[2:]),
])
def test_state_keys_and_slot_shapes(reduce_axes, expected, momentum):
    shapes = [(6, 4), (5, 3, 2), (2, 7)]
    params = make_params(torch.float64, shapes=shapes)
    opt = af.Amos(params, lr=0.05, eta=0.5, reduce_axes=reduce_axes, momentum=momentum, backend="reference")
    set_grads(params, make_grads(params, 0))
    opt.step()
    for p in params:
        state = opt.state[p]
        keys = {"step", "v", "b"} | ({"mu"} if momentum is not None else set())
        assert set(state) == keys
        assert tuple(state["v"].shape) == expected(tuple(p.shape))
        assert tuple(state["b"].shape) == expected(tuple(p.shape))
        assert state["v"].dtype == p.dtype and state["b"].dtype == p.dtype
        if momentum is not None:
            assert state["mu"].shape == p.shape
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 1.0


def test_linear_weight_rows_slot():
    """nn.Linear(5 -> 37) weight with reduce_axes=(1,): one slot per output row."""
    weight = torch.nn.Linear(5, 37, dtype=torch.float64).weight
    weight.grad = torch.randn_like(weight)
    opt = af.Amos([weight], lr=0.05, reduce_axes=(1,), backend="reference")
    opt.step()
    assert opt.state[weight]["v"].shape == (37, 1)
    torch.testing.assert_close(opt.state[weight]["v"], (1 - 0.999) * weight.grad.square().mean(1, keepdim=True))


def test_eta_none_is_inferred_per_param():
    params = [
        torch.nn.Linear(30, 8, dtype=torch.float64).weight.detach().requires_grad_(True),
        torch.zeros(8, dtype=torch.float64, requires_grad=True),
        torch.ones(4, dtype=torch.float64, requires_grad=True),
        torch.empty(0, dtype=torch.float64, requires_grad=True),
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
    ]
    opt = af.Amos([{"params": params[:3]}, {"params": params[3:], "lr": 0.01}], lr=0.05, backend="reference")
    first, second = (g["eta"] for g in opt.param_groups)
    assert isinstance(first, tuple) and isinstance(second, tuple)
    assert len(first) == 3 and len(second) == 2
    expected_weight = params[0].detach().square().mean().sqrt().item()
    assert first[0] == pytest.approx(expected_weight, rel=1e-12)
    assert 0.05 < first[0] < 1 / math.sqrt(30)  # torch's default init: RMS ~ 1/sqrt(3*in)
    assert first[1] == 0.5 and first[2] == pytest.approx(1.0)
    assert second == (0.5, pytest.approx(2.5))
    # an explicit eta is kept as given
    opt2 = af.Amos(clone_params(params[:2]), lr=0.05, eta=0.25, backend="reference")
    assert opt2.param_groups[0]["eta"] == 0.25


def test_eta_survives_a_checkpoint():
    params = make_params(torch.float64, shapes=[(6, 4), (3,)])
    opt = af.Amos(params, lr=0.05, backend="reference")
    set_grads(params, make_grads(params, 0))
    opt.step()
    copies = clone_params(params)
    other = af.Amos(copies, lr=0.05, eta=0.9, backend="reference")
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["eta"] == opt.param_groups[0]["eta"]
    for step in (1, 2):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(copies, grads)
        opt.step()
        other.step()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


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
