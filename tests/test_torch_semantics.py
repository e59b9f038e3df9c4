"""torch.optim reads ``group['params']``, each param's ``.grad`` and
``optimizer.state`` afresh at every step; so do we, on every backend.  Each case
edits the optimizer between steps exactly as a user would and must give what
torch.optim.AdamW gives after the same edit."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from conftest import make_grads

BACKENDS = [b for b in af.available_backends()]
SHAPES = [(5, 3), (7,), (), (33,)]


def _pair(backend, amsgrad=False):
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=amsgrad)
    return ours, af.AdamW(ours, backend=backend, **kw), theirs, torch.optim.AdamW(theirs, **kw)


def _step(ours, opt, theirs, torch_opt, step):
    for p, q, g in zip(ours, theirs, make_grads(ours, step)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    torch_opt.step()


def _same(ours, opt, theirs, torch_opt):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    a, b = opt.state_dict()["state"], torch_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for key in a[index]:
            torch.testing.assert_close(torch.as_tensor(a[index][key]).double(),
                                       torch.as_tensor(b[index][key]).double(), rtol=1e-12, atol=1e-14)


def _run(backend, edit, amsgrad=False):
    ours, opt, theirs, torch_opt = _pair(backend, amsgrad)
    for step in range(3):
        _step(ours, opt, theirs, torch_opt, step)
    edit(ours, opt)
    edit(theirs, torch_opt)
    for step in range(3, 6):
        _step(ours, opt, theirs, torch_opt, step)
    _same(ours, opt, theirs, torch_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_cleared(backend):
    def edit(params, opt):
        opt.state.clear()
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_cleared_then_saved_keeps_new_state(backend):
    ours, opt, theirs, torch_opt = _pair(backend)
    for step in range(3):
        _step(ours, opt, theirs, torch_opt, step)
    opt.state.clear()
    assert opt.state_dict()["state"] == {}
    _step(ours, opt, theirs, torch_opt, 3)
    assert float(opt.state_dict()["state"][0]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_param_state_deleted(backend):
    def edit(params, opt):
        del opt.state[params[1]]
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_state_tensor_replaced(backend, key):
    def edit(params, opt):
        for p in params:
            opt.state[p][key] = torch.full_like(p, 0.25)
    _run(backend, edit, amsgrad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_counter_replaced(backend):
    def edit(params, opt):
        opt.state[params[0]]["step"] = torch.tensor(100.0)
        opt.state[params[2]]["step"] = torch.tensor(1.0)
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_replaced_in_group(backend):
    def edit(params, opt):
        fresh = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(5, 3).requires_grad_()
        old = opt.param_groups[0]["params"][0]
        opt.param_groups[0]["params"][0] = fresh
        opt.state.pop(old, None)  # torch's state_dict() needs every state to belong to a param
        params[0] = fresh
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_reordered(backend):
    def edit(params, opt):
        opt.param_groups[0]["params"].reverse()
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_removed_and_appended(backend):
    def edit(params, opt):
        group = opt.param_groups[0]["params"]
        group.append(group.pop(0))
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_data_replaced(backend):
    def edit(params, opt):
        with torch.no_grad():
            params[0].data = torch.arange(15, dtype=torch.float64).reshape(5, 3) / 10
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_group_added_later(backend):
    def edit(params, opt):
        extra = torch.ones(4, 4, dtype=torch.float64, requires_grad=True)
        opt.add_param_group({"params": [extra], "lr": 0.01})
        params.append(extra)
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_switched_on(backend):
    """torch.optim creates max_exp_avg_sq only with amsgrad; we create it when
    amsgrad is switched on, as a fresh optimizer with amsgrad would have it."""
    ours, opt, theirs, _ = _pair(backend)
    for step in range(2):
        for p, g in zip(ours, make_grads(ours, step)):
            p.grad = g
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.step()
    assert all("max_exp_avg_sq" in opt.state[p] for p in ours)
    for p in ours:
        torch.testing.assert_close(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])
