"""A step writes its params, states and counters in place, and says so to autograd
as torch's in-place ops do: every tensor it writes has its version counter bumped,
so a backward through a graph that saved a param before the step raises instead of
running on the changed weights (torch.optim.AdamW's default step does the same)."""
import pytest
import torch

import amos_fused as af

BACKENDS = [b for b in ("cpu", "reference", "triton") if b in af.available_backends()]

MAKERS = {
    "AdamW": lambda ps, b: af.AdamW(ps, lr=0.1, backend=b),
    "Lion": lambda ps, b: af.Lion(ps, lr=0.1, backend=b),
    "Amos": lambda ps, b: af.Amos(ps, lr=0.1, eta=0.5, momentum=0.9, backend=b),
    "AdamW8bit": lambda ps, b: af.AdamW8bit(ps, lr=0.1, backend=b),
    "AdamW-master": lambda ps, b: af.AdamW(ps, lr=0.1, master_weights=True, backend=b),
}


def _linear(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 80)  # 5120 weights: FP8 states for the 8-bit classes
    return lin.to(torch.bfloat16) if name == "AdamW-master" else lin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_a_step_bumps_the_version_of_everything_it_writes(name, backend):
    lin = _linear(name)
    opt = MAKERS[name](list(lin.parameters()), backend)
    for p in lin.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    params = list(lin.parameters())
    before = {id(t): t._version for p in params for t in [p, *opt.state[p].values()] if isinstance(t, torch.Tensor)}
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert p._version > before[id(p)]
        for key, t in opt.state[p].items():
            if isinstance(t, torch.Tensor) and id(t) in before:
                assert t._version > before[id(t)], key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_a_backward_through_a_graph_saved_before_the_step_is_refused(name, backend):
    lin = _linear(name)
    dtype = lin.weight.dtype
    opt = MAKERS[name](list(lin.parameters()), backend)
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    lin(x).float().square().sum().backward()
    loss = lin(torch.randn(3, 64, dtype=dtype, requires_grad=True)).float().square().sum()  # saves lin.weight
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_skipped_step_bumps_nothing():
    """GradScaler's found_inf skips the step: nothing is written, nothing bumped."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = af.AdamW([p], lr=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    version = p._version
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert p._version == version


def test_a_step_inside_inference_mode_still_steps_inference_tensors():
    with torch.inference_mode():
        p = torch.nn.Parameter(torch.randn(64, 80))
        p.grad = torch.randn_like(p)
        opt = af.AdamW([p], lr=0.1)
        before = p.clone()
        opt.step()
        assert not torch.equal(p, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_with_master_weights_bumps_nothing(backend):
    """(the params are not copied from their unchanged masters either)"""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt = af.AdamW(lin.parameters(), lr=1e-2, master_weights=True, backend=backend)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().sum().backward()
    opt.step()
    loss = lin(x).float().sum()
    version = lin.weight._version
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert lin.weight._version == version
    loss.backward()
