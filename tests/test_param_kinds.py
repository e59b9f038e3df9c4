"""Params of every kind torch.optim steps: complex (as real views, like
torch.optim), 0-element of any shape; params that share memory are refused;
params of unsupported dtypes are refused before anything is written."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from conftest import make_grads

BACKENDS = af.available_backends()
ELEMENTWISE = {
    "AdamW": (lambda ps, b: af.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True)),
    "Adam": (lambda ps, b: af.Adam(ps, lr=0.05, weight_decay=0.1, backend=b),
             lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1)),
    "RAdam": (lambda ps, b: af.RAdam(ps, lr=0.05, weight_decay=0.1, backend=b),
              lambda ps: torch.optim.RAdam(ps, lr=0.05, weight_decay=0.1)),
    "RAdam-decoupled": (
        lambda ps, b: af.RAdam(ps, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, backend=b),
        lambda ps: torch.optim.RAdam(ps, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
}
ALL = {
    "AdamW": lambda ps, b: af.AdamW(ps, lr=0.05, backend=b),
    "RAdam": lambda ps, b: af.RAdam(ps, lr=0.05, backend=b),
    "Lion": lambda ps, b: af.Lion(ps, lr=0.05, weight_decay=0.1, backend=b),
    "Amos": lambda ps, b: af.Amos(ps, lr=0.05, eta=0.5, momentum=0.9, backend=b),
    "Amos-rows": lambda ps, b: af.Amos(ps, lr=0.05, eta=0.5, reduce_axes=(-1,), backend=b),
    "Amos-all": lambda ps, b: af.Amos(ps, lr=0.05, eta=0.5, reduce_axes="all", backend=b),
    "ScaledAdamW": lambda ps, b: af.ScaledAdamW(ps, lr=0.05, backend=b),
    "Lamb": lambda ps, b: af.Lamb(ps, lr=0.05, weight_decay=0.1, backend=b),
}
NO_COMPLEX = ["Amos", "ScaledAdamW", "Lamb"]


def _complex_params(dtype):
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 3), (5,), (), (40,)]
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    params.insert(1, torch.randn(9, generator=gen, dtype=torch.float64 if dtype == torch.complex128
                                 else torch.float32).requires_grad_())  # a real param beside them
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_complex_params_match_torch(name, dtype, backend):
    ours_fn, torch_fn = ELEMENTWISE[name]
    ours = _complex_params(dtype)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, torch_opt = ours_fn(ours, backend), torch_fn(theirs)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    tol = {} if dtype == torch.complex64 else dict(rtol=1e-12, atol=1e-14)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(ours, theirs):
        for key, value in torch_opt.state[q].items():
            assert opt.state[p][key].dtype == value.dtype, key  # complex state, like torch
            torch.testing.assert_close(opt.state[p][key], value, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_lion_steps_the_real_view(backend):
    z = torch.randn(12, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    r = torch.view_as_real(z.detach().clone()).clone().requires_grad_()
    opt, twin = af.Lion([z], lr=0.05, backend=backend), af.Lion([r], lr=0.05, backend=backend)
    for step in range(3):
        g = torch.randn(12, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt.step()
        twin.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("name", NO_COMPLEX)
def test_complex_refused_at_construction(name):
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*complex"):
        ALL[name]([torch.randn(2, requires_grad=True), z], None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 0), (2, 0, 3), (3, 0, 1), (0, 5)])
@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_element_params_of_any_shape(name, shape, backend):
    if name == "Amos-rows" and len(shape) == 0:
        pytest.skip("no axis to reduce")
    empty = torch.zeros(shape, requires_grad=True)
    full = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    twin = full.detach().clone().requires_grad_()
    opt, alone = ALL[name]([empty, full], backend), ALL[name]([twin], backend)
    for step in range(2):
        g = make_grads([full], step)[0].float()
        empty.grad, full.grad, twin.grad = torch.zeros(shape), g.clone(), g.clone()
        opt.step()
        alone.step()
    assert float(opt.state[empty]["step"]) == 2.0
    assert torch.equal(full.detach(), twin.detach())


@pytest.mark.parametrize("name", sorted(ALL))
def test_overlapping_params_refused_at_construction(name):
    storage = torch.randn(40)
    with pytest.raises(ValueError, match=r"shares memory"):
        ALL[name]([storage[:24].view(4, 6), storage[20:]], None)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*shares memory"):
        ALL[name]([{"params": [storage[:20]]}, {"params": [storage[10:30]]}], None)


def test_overlap_refused_when_added_later():
    storage = torch.randn(40)
    opt = af.AdamW([storage[:20]], lr=0.1)
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group({"params": [storage[19:25]]})
    assert len(opt.param_groups) == 1


def test_overlap_refused_when_a_param_is_swapped_in():
    storage = torch.randn(40)
    a, b = storage[:20], storage[20:]
    opt = af.AdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(20), torch.ones(20)
    before = storage.clone()
    opt.param_groups[0]["params"][1] = storage[10:30]
    opt.param_groups[0]["params"][1].grad = torch.ones(20)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert torch.equal(storage, before) and not opt.state


def test_interleaved_views_of_one_storage_are_not_overlapping():
    storage = torch.randn(6, 10)
    even, odd = storage[:, ::2], storage[:, 1::2]
    opt = af.AdamW([even, odd], lr=0.1, backend="reference")
    even.grad, odd.grad = torch.ones(6, 5), -torch.ones(6, 5)
    opt.step()
    assert (storage[:, ::2] != storage[:, 1::2]).all()


@pytest.mark.parametrize("second_group", [False, True])
@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("name", sorted(ALL))
def test_unsupported_dtype_raises_before_any_write(name, bad_dtype, second_group):
    f = torch.randn(8, requires_grad=True)
    bad = torch.zeros(4, dtype=bad_dtype)
    groups = [{"params": [f]}, {"params": [bad]}] if second_group else [f, bad]
    opt = ALL[name](groups, None)
    f.grad = torch.randn(8)
    bad.grad = torch.ones(4, dtype=bad_dtype)
    before = f.detach().clone()
    with pytest.raises(TypeError, match=str(bad_dtype)):
        opt.step()
    assert torch.equal(f.detach(), before)
    assert not opt.state[f]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda ps, b: af.AdamW(ps, lr=0.05, master_weights=True, backend=b),
                                  lambda ps, b: af.Lion(ps, lr=0.05, backend=b),
                                  lambda ps, b: af.AdamW8bit(ps, lr=0.05, backend=b)],
                         ids=["AdamW-master", "Lion", "AdamW8bit"])
def test_complex32_params_are_refused_at_the_step_before_any_write(make, backend):
    """complex64 and complex128 step as their real views; complex32 (half-precision
    complex, which torch.optim's step turns NaN) raises a TypeError naming it, as
    the other dtypes the kernels do not take."""
    f = torch.nn.Parameter(torch.randn(8))
    half = torch.randn(4096).to(torch.complex32).requires_grad_()
    opt = make([f, half], backend)
    f.grad, half.grad = torch.randn(8), torch.randn(4096).to(torch.complex32)
    before = f.detach().clone()
    with pytest.raises(TypeError, match=r"params'\]\[1\].*params of dtype torch.complex32 are not supported"):
        opt.step()
    assert torch.equal(f.detach(), before) and not opt.state[f]
