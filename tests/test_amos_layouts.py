"""Amos on params of any dense layout (channels_last, transposed, permuted): the
slots are defined in logical dims; the fused kernels walk memory in the param's
own order.  Results equal the reference and a contiguous twin."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af

FUSED = [b for b in af.available_backends() if b != "reference"]


def _layouts():
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 5, 3, 4, generator=gen, dtype=torch.float64)
    return {
        "channels_last": conv.to(memory_format=torch.channels_last),
        "transposed": torch.randn(7, 9, generator=gen, dtype=torch.float64).t(),
        "permuted": torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).permute(2, 0, 1),
    }


REDUCE = {
    "channels_last": [None, "all", (1, 2, 3), (1,), (2,), (0, 3)],
    "transposed": [None, "all", (1,), (0,)],
    "permuted": [None, "all", (2,), (0, 1), (1,)],
}
CASES = [(layout, axes) for layout, options in REDUCE.items() for axes in options]


@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout, reduce_axes", CASES, ids=[f"{l}-{a}" for l, a in CASES])
def test_amos_any_dense_layout(layout, reduce_axes, backend, momentum):
    base = _layouts()[layout]
    assert not base.is_contiguous()
    ours = base.clone(memory_format=torch.preserve_format).requires_grad_()
    ref = base.clone(memory_format=torch.preserve_format).requires_grad_()
    flat = base.contiguous().requires_grad_()
    kw = dict(lr=0.02, eta=0.5, reduce_axes=reduce_axes, momentum=momentum)
    opt = af.Amos([ours], backend=backend, **kw)
    ref_opt = af.Amos([ref], backend="reference", **kw)
    flat_opt = af.Amos([flat], backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(base.shape, generator=gen, dtype=torch.float64)
        ours.grad = torch.empty_like(ours).copy_(g)  # the param's layout, as autograd gives it
        ref.grad, flat.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        flat_opt.step()
    assert ours.stride() == base.stride()  # stepped in place, layout kept
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    if reduce_axes is None:  # elementwise: the same operations on every element
        assert torch.equal(ours.detach(), flat.detach())
    else:  # slot means summed in the param's memory order
        torch.testing.assert_close(ours, flat, rtol=1e-12, atol=1e-14)
    for key in ("v", "b") + (("mu",) if momentum else ()):
        torch.testing.assert_close(opt.state[ours][key], ref_opt.state[ref][key], rtol=1e-12, atol=1e-14)


def test_amos_checkpoint_into_channels_last_params():
    base = _layouts()["channels_last"]
    a = base.clone(memory_format=torch.preserve_format).requires_grad_()
    opt = af.Amos([a], lr=0.02, eta=0.5, reduce_axes=(2,), backend="reference")
    a.grad = torch.ones_like(a)
    opt.step()
    b = base.clone(memory_format=torch.preserve_format).requires_grad_()
    loaded = af.Amos([b], lr=0.02, eta=0.5, reduce_axes=(2,))
    loaded.load_state_dict(opt.state_dict())
    b.data.copy_(a.detach())
    for p in (a, b):
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    loaded.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,key", [(af.Amos, "mu"), (af.Amos, "v"), (af.Amos8bit, "mu")],
                         ids=["Amos-mu", "Amos-v", "Amos8bit-mu"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_a_refused_state_of_a_permuted_param_is_named_as_the_user_holds_it(cls, key, layout, backend):
    # the fused Amos walks step a dense param's views permuted into memory order; a state
    # that does not fit is still described by its own shape and strides, nothing written
    if layout == "channels_last":
        p = torch.randn(256, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    else:
        p = torch.randn(80, 64).t()
    p.requires_grad_(True)
    opt = cls([p], lr=0.01, momentum=0.9, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    bad = opt.state[p][key].to(torch.float64)
    opt.state[p][key] = bad
    before = p.detach().clone()
    with pytest.raises(ValueError) as refused:
        opt.step()
    assert f"shape {tuple(bad.shape)}, strides {bad.stride()}" in str(refused.value)
    assert torch.equal(p.detach(), before)
