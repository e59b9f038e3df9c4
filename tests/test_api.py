"""The public API: what ``import amos_fused`` offers (the optimizer classes,
``available_backends``) and the hyper-parameters each constructor (and
``add_param_group``) refuses: a ValueError naming the parameter and value, like
torch.optim, before anything is written; unknown and unavailable backends."""
from __future__ import annotations

import re

import pytest
import torch

import amos_fused as af
from conftest import raises_naming, assert_unchanged, clone_params, make_grads, make_params, set_grads, snapshot
from registry import CASES, CLASS_CASES, Case


def test_public_names():
    for name in ("AdamW", "Adam", "RAdam", "Lion", "Amos", "ScaledAdamW", "Lamb"):
        assert issubclass(getattr(af, name), torch.optim.Optimizer), name
    assert callable(af.available_backends) and callable(af.amos_param_groups) and callable(af.half_life_p)


def _param():
    return [torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)]


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------

# class name -> constructor taking (params, **kwargs): every optimizer class of the
# registry (its defaults; Amos with its required lr)
ALL_CLASSES = {
    cls.__name__: (lambda params, cls=cls, **kw: Case(cls, {"lr": 0.01} if cls is af.Amos else {}).make(
        params, kw.pop("backend", None), **kw))
    for cls in {CASES[name].cls for name in CLASS_CASES.values()}
}
WITH_EPS = ["AdamW", "Adam", "RAdam"]
WITH_BETAS = ["AdamW", "Adam", "RAdam", "Lion"]
WITH_WEIGHT_DECAY = ["AdamW", "Adam", "RAdam", "Lion"]


@pytest.mark.parametrize("name", sorted(ALL_CLASSES))
@pytest.mark.parametrize("lr", [-0.5, float("nan")])
def test_bad_lr(name, lr):
    raises_naming(ValueError, lambda: ALL_CLASSES[name](_param(), lr=lr),
                   r"lr|learning rate", re.escape(str(lr)))


@pytest.mark.parametrize("name", WITH_EPS)
def test_negative_eps(name):
    raises_naming(ValueError, lambda: ALL_CLASSES[name](_param(), eps=-1e-8), r"eps", re.escape("-1e-08"))


@pytest.mark.parametrize("name", WITH_WEIGHT_DECAY)
def test_negative_weight_decay(name):
    raises_naming(ValueError, lambda: ALL_CLASSES[name](_param(), weight_decay=-0.25),
                   r"weight_decay", re.escape("-0.25"))


@pytest.mark.parametrize("name", WITH_BETAS)
@pytest.mark.parametrize("betas, index, value", [
    ((1.0, 0.999), 0, "1.0"),
    ((-0.1, 0.999), 0, "-0.1"),
    ((0.9, 1.0), 1, "1.0"),
    ((0.9, -0.01), 1, "-0.01"),
    ((0.9, 1.5), 1, "1.5"),
])
def test_betas_out_of_range(name, betas, index, value):
    raises_naming(ValueError, lambda: ALL_CLASSES[name](_param(), betas=betas),
                   r"beta", rf"index {index}", re.escape(value))


@pytest.mark.parametrize("name", sorted(ALL_CLASSES))
def test_unknown_backend(name):
    raises_naming(ValueError, lambda: ALL_CLASSES[name](_param(), backend="bogus"), "bogus")


@pytest.mark.parametrize("name", sorted(ALL_CLASSES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_gpu_backend(name, backend):
    if backend in af.available_backends():  # not on this CPU machine; keep the test honest elsewhere
        assert name  # construction on CPU params is then checked at step time
        return
    raises_naming(RuntimeError, lambda: ALL_CLASSES[name](_param(), backend=backend), backend)


def test_available_backends_on_this_machine():
    backends = af.available_backends()
    assert backends[:2] == ["reference", "cpu"]
    if not torch.cuda.is_available():
        assert "cuda" not in backends


@pytest.mark.parametrize("eta", [0.0, -1.0, (0.5, 0.0)])
def test_amos_eta_must_be_positive(eta):
    params = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    raises_naming(ValueError, lambda: af.Amos(params, lr=0.01, eta=eta, backend="reference"), "eta")


@pytest.mark.parametrize("reduce_axes", [(2,), (-3,), (1, 1), (0, -2), (1, -1), "most"])
def test_amos_bad_reduce_axes(reduce_axes):
    params = [torch.zeros(4, 3, dtype=torch.float64)]
    raises_naming(ValueError, lambda: af.Amos(params, lr=0.01, reduce_axes=reduce_axes,
                                               backend="reference"), "reduce_axes")


def test_amos_reduce_axes_checked_against_every_param():
    params = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    with pytest.raises(ValueError, match="reduce_axes"):
        af.Amos(params, lr=0.01, reduce_axes=(1,), backend="reference")


@pytest.mark.parametrize("threshold", [3.9, 0.0, -1.0, float("inf"), float("nan")])
def test_radam_rectify_threshold_below_four_is_refused(threshold):
    """Below ρt = 4 the rectification term is the square root of a negative number."""
    raises_naming(ValueError, lambda: af.RAdam(_param(), rectify_threshold=threshold),
                   "rectify_threshold", re.escape(str(threshold)))


# ---------------------------------------------------------------------------
# Amos
# ---------------------------------------------------------------------------

def _bad_input_params():
    return [p.requires_grad_(True) for p in make_params(torch.float32, 3, [(4, 3), (3,)])]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kwargs", [
    dict(eta=0.0), dict(eta=-1.0), dict(eta=(0.5, 0.0)), dict(eta=(0.5, -2.0)),
    dict(reduce_axes=(2,)), dict(reduce_axes=(-3,)), dict(reduce_axes=(1, 1)),
    dict(reduce_axes=(0, -2)), dict(reduce_axes="rows"), dict(reduce_axes="ALL"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_amos_bad_input_raises_at_construction(kwargs, backend):
    params = _bad_input_params()
    if "reduce_axes" in kwargs:
        params = params[:1]  # a 2-D param: only the bad value itself is at fault
    for i, p in enumerate(params):
        p.grad = torch.ones_like(p) * (i + 1)
    before = [p.detach().clone() for p in params]
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        af.Amos(params, lr=0.01, backend=backend, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("group", [
    dict(eta=0.0), dict(eta=(0.5, 0.5)),  # eta: a bad value; a tuple of the wrong length
    dict(reduce_axes=(1,)),  # out of range for the 1-D param of the new group
    dict(reduce_axes="rows"),
])
def test_amos_bad_param_group_leaves_the_optimizer_as_it_was(group, backend):
    """add_param_group with a bad value raises, writes nothing, and leaves an
    optimizer that steps exactly like one that never saw the bad group."""
    params = _bad_input_params()
    twin = clone_params(params)
    opts = [Case(af.Amos).make([ps[0]], backend, lr=0.1, reduce_axes=(1,), momentum=0.9) for ps in (params, twin)]
    for ps, opt in zip((params, twin), opts):
        set_grads(ps, make_grads(ps, 0))
        opt.step()
    before = snapshot(opts[0], params)
    with pytest.raises(ValueError):
        opts[0].add_param_group({"params": [params[1]], "reduce_axes": "all", **group})
    assert_unchanged(before, opts[0], params)
    groups = len(opts[0].param_groups)
    assert groups == 1, f"the rejected group was kept: {groups} param groups"
    assert params[1] not in opts[0].state
    for ps, opt in zip((params, twin), opts):
        set_grads(ps, make_grads(ps, 1))
        opt.step()
    assert torch.equal(params[0], twin[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("keep_state", [True, False], ids=["state-kept", "state-cleared"])
def test_amos_param_reshaped_out_of_its_reduce_axes_is_named(keep_state, backend):
    """p.data set to a tensor that the group's reduce_axes cannot reduce: the step
    raises naming the param, with or without its state, and writes nothing."""
    a, p = torch.randn(5, 2, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    opt = af.Amos([a, p], lr=0.01, backend=backend, reduce_axes=(1,))
    a.grad, p.grad = torch.randn_like(a), torch.randn_like(p)
    opt.step()
    p.data, p.grad = torch.randn(21), torch.randn(21)
    if not keep_state:
        del opt.state[p]
    before = snapshot(opt, [a, p])
    with pytest.raises(ValueError, match=r"Amos: param_groups\[0\]\['params'\]\[1\].*reduce_axes \(1,\)"):
        opt.step()
    assert_unchanged(before, opt, [a, p])


# ---------------------------------------------------------------------------
# ScaledAdamW and LAMB
# ---------------------------------------------------------------------------

def _norm_params():
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
def test_norm_scaled_bad_input_raises_at_construction(cls, kwargs, match, backend):
    params = _norm_params()
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        cls(params, backend=backend, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_p_and_half_life_in_one_group_raise():
    params = _norm_params()
    with pytest.raises(ValueError, match="half_life"):
        af.ScaledAdamW([{"params": params[:1]}, {"params": params[1:], "p": 0.1, "half_life": 10}],
                       lr=0.01, backend="cpu")
