"""A default device set by the user (``torch.set_default_device``, ``with
torch.device(...)``) changes none of a step's own tensors: as torch.optim, the
step counters it makes or loads, and the host tensors of its checks and of
GradScaler's unscaling, stay on the CPU, so every class steps (and loads) under
one as it does without it.  'meta' stands for the other device on a machine
without a GPU: any tensor made there by the step would fail it."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af

from registry import ALL_CLASS_CASES, backends


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen).to(dtype)) for shape in ((64, 80), (5,))]


def _set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def _run(case, backend, under_meta, steps=3, load_at=None):
    """Params and states after ``steps`` steps; under_meta: every construction, step and
    load under ``with torch.device('meta')``; load_at: the step after which the state
    goes through state_dict into a fresh optimizer."""
    params = _params()
    default = torch.device("meta") if under_meta else torch.device("cpu")
    with default:
        opt = case.make(params, backend)
    for step in range(steps):
        _set_grads(params, step)
        with default:
            opt.step()
        if step == load_at:
            saved = opt.state_dict()
            with default:
                opt = case.make(params, backend)
                opt.load_state_dict(saved)
    return params, opt


@pytest.mark.parametrize("backend", backends("reference", "cpu"))
@pytest.mark.parametrize("name", sorted(ALL_CLASS_CASES))
def test_every_class_steps_and_loads_under_another_default_device_as_without_it(name, backend):
    case = ALL_CLASS_CASES[name]
    plain_params, plain = _run(case, backend, under_meta=False, load_at=1)
    params, opt = _run(case, backend, under_meta=True, load_at=1)
    for p, q in zip(params, plain_params):
        assert torch.equal(p.detach(), q.detach()), name
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cpu", (name, key, value.device)
                assert torch.equal(value, plain.state[q][key]), (name, key)


@pytest.mark.parametrize("backend", backends("reference", "cpu"))
def test_grad_scaled_bfloat16_grads_unscale_under_another_default_device(backend):
    # the float32 factor that unscales bf16 grads after the step is made beside the grads
    results = []
    for under_meta in (False, True):
        params = _params(torch.bfloat16)
        opt = ALL_CLASS_CASES["AdamW"].make(params, backend)
        _set_grads(params, 0, scale=4.0)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with torch.device("meta" if under_meta else "cpu"):
            opt.step()
        results.append([t.clone() for p in params for t in (p.detach(), p.grad, opt.state[p]["exp_avg"])])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.skipif("triton" not in af.available_backends(), reason="no Triton (nor its interpreter) here")
@pytest.mark.parametrize("name", ["AdamW", "Lion", "Amos", "Lamb", "AdamW8bit"])
def test_the_triton_backends_host_tables_ignore_another_default_device(name):
    # its program maps, per-tensor tables and rounding rows are made on the host, then moved
    # to the params' device (under the interpreter, the CPU)
    case = ALL_CLASS_CASES[name]
    runs = []
    for under_meta in (False, True):
        params = _params()
        opt = case.make(params, "triton")
        for step in range(2):
            _set_grads(params, step)
            with torch.device("meta" if under_meta else "cpu"):
                opt.step()
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
