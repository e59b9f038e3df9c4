"""Capturable steps on the CUDA backend (``capturable=True``, ``backend='cuda'`` or
the default on CUDA params when the CUDA kernels are built): the coefficients are a
table computed on the device (amos_fused/device_coefficients.py) and read there by
the kernels (csrc/cuda/device_coefficients.cuh), found_inf is read by the kernels,
the counters live on the device (amos_fused/capturable.py).

Here, without a GPU: the choice of backend and the refusals.  With a GPU and the
CUDA kernels: the same params and states as capturable=False, a step captured in a
CUDA graph and replayed, and GradScaler steps under set_sync_debug_mode('error').
The kernels' logic is also checked without a GPU by the CUDA emulation
(tools/cuda_emulation/compare_with_cpu.py capturable)."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from amos_fused import capturable
from amos_fused.backends import capturable_backend
from conftest import assert_captured_steps_replay_like_eager, assert_grad_scaler_steps_do_not_sync

needs_cuda_kernels = pytest.mark.skipif("cuda" not in af.available_backends(),
                                        reason="needs a CUDA device and amos_fused built with CUDA kernels")

CLASS_CASES = {
    "AdamW": (af.AdamW, dict(weight_decay=0.1)),
    "Adam-amsgrad-L2": (af.Adam, dict(weight_decay=0.1, amsgrad=True)),
    "RAdam": (af.RAdam, dict(betas=(0.9, 0.9))),
    "Lion": (af.Lion, dict(weight_decay=0.1)),
    "Amos-rows": (af.Amos, dict(eta=0.3, reduce_axes=(-1,), momentum=0.9)),
    "Amos-all": (af.Amos, dict(eta=0.3, reduce_axes="all", clip_value=1.0)),
    "ScaledAdamW": (af.ScaledAdamW, dict(half_life=3)),
    "Lamb": (af.Lamb, dict(weight_decay=0.01)),
    "AdamW-master": (af.AdamW, dict(master_weights=True)),
}


def _model(dtype, device="cuda"):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))
            for s in [(5, 7), (1500, 3), (33,), (40, 3000)]]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(dtype=p.dtype, device=p.device) for p in params]


# ---- without a GPU ----------------------------------------------------------------

def test_the_cuda_backend_is_a_capturable_backend():
    """backend='cuda' is taken for capturable=True; on CPU params it is refused with the reason."""
    with pytest.raises(ValueError, match="capturable=True steps on the 'cuda' backend, which cannot step parameters "
                                         "on cpu"):
        capturable_backend("cuda", torch.device("cpu"), "AdamW")
    with pytest.raises(ValueError, match="capturable=True steps on the 'cuda' backend"):
        af.AdamW([torch.nn.Parameter(torch.zeros(3))], capturable=True, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' or backend='triton'"):
        capturable_backend("cpu", torch.device("cpu"), "AdamW")


def test_the_capturable_op_refuses_host_counters_before_any_write():
    """amos_fused/capturable.py checks the device arguments before the op runs."""
    params = [torch.randn(4)]
    before = params[0].clone()
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"steps\[0\] must be a one-element float32 tensor"):
        capturable.step_capturable("lion", params, [torch.randn(4)], [torch.zeros(4)],
                                   [torch.zeros((), dtype=torch.float64)], hyper, [])
    with pytest.raises(ValueError, match="expected the hyper-parameters"):
        capturable.step_capturable("lion", params, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(())],
                                   {"lr": 0.1}, [])
    with pytest.raises(ValueError, match="no capturable step for 'sgd'"):
        capturable.step_capturable("sgd", params, [torch.randn(4)], [], [torch.zeros(())], hyper, [])
    assert torch.equal(params[0], before)


def test_the_compiled_op_checks_its_coefficient_table():
    """The op's own checks (csrc/step_prologue.h begin_capturable_step) come before
    the device dispatch matters: a table of the wrong shape is refused by name."""
    schema = str(torch.ops.amos_fused.step_capturable.default._schema)
    assert "Tensor coef" in schema and "Tensor? found_inf" in schema
    if "cuda" not in af.available_backends():
        return
    p = [torch.randn(4, device="cuda")]
    with pytest.raises(ValueError, match="coef must be a contiguous float64 tensor of shape"):
        torch.ops.amos_fused.step_capturable("lion", p, [torch.randn(4, device="cuda")],
                                             [torch.zeros(4, device="cuda")], [0.1, 0.9, 0.99, 0.0], [],
                                             torch.zeros(1, 3, dtype=torch.float64, device="cuda"), None)


@pytest.mark.parametrize("algorithm", ["adam", "radam", "lion", "amos", "scaled_adam", "lamb"])
def test_the_device_coefficient_table_makes_no_host_to_device_copy(algorithm, monkeypatch):
    """Graph capture forbids copies from pageable host memory: the table's host numbers
    (hyper-parameters, per-tensor values) reach the device through fill kernels, so
    building it never calls torch.tensor / torch.as_tensor (which copy)."""
    from amos_fused import device_coefficients
    from amos_fused.contracts import contract

    hyper = {name: 0.5 for name in contract(algorithm).hyper}
    hyper["lr"] = torch.tensor(0.01, dtype=torch.float64)
    steps = [torch.full((), float(k), dtype=torch.float32) for k in range(3)]
    scale = torch.tensor(8.0)
    expected = device_coefficients.coefficient_table(algorithm, steps, hyper, [0.5, 0.5, 2.0], scale,
                                                     float32_math=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a host-to-device copy while building the coefficient table")
    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    table = device_coefficients.coefficient_table(algorithm, steps, hyper, [0.5, 0.5, 2.0], scale,
                                                  float32_math=True)
    torch.testing.assert_close(table, expected, rtol=0, atol=0, equal_nan=True)
    assert table.shape == (3, len(contract(algorithm).columns)) and table.dtype == torch.float64


# ---- with a GPU -------------------------------------------------------------------

@needs_cuda_kernels
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_capturable_cuda_steps_like_the_host_cuda_step(name, lr_tensor):
    """Five steps with a changing lr and found_inf set at the third: the same params
    and states as capturable=False (coefficients from the device table may differ
    from the host's in the last bit of a float64, hence a float32-ulp tolerance)."""
    cls, kwargs = CLASS_CASES[name]
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    ours, twin = _model(dtype), _model(dtype)
    lrs = [1e-2, 2e-2, 3e-2, 1.5e-2, 5e-3]
    lr = torch.tensor(lrs[0], dtype=torch.float64, device="cuda") if lr_tensor else lrs[0]
    opt = cls(ours, lr=lr, capturable=True, backend="cuda", **kwargs)
    ref = cls(twin, lr=lrs[0], backend="cuda", **kwargs)
    for step in range(5):
        if lr_tensor:
            lr.fill_(lrs[step])
        else:
            opt.param_groups[0]["lr"] = lrs[step]
        ref.param_groups[0]["lr"] = lrs[step]
        for o, params in ((opt, ours), (ref, twin)):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            o.found_inf = torch.tensor(float(step == 2), device="cuda")
            o.grad_scale = None
            o.step()
            del o.found_inf, o.grad_scale
    torch.cuda.synchronize()
    for p, q in zip(ours, twin):
        assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 4.0
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in ref.state[q].items():
            if key != "step" and value.is_floating_point():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-7)


@needs_cuda_kernels
@pytest.mark.parametrize("name", ["AdamW", "Lion", "RAdam", "Amos-rows", "Lamb"])
def test_a_captured_cuda_step_replays_like_eager_steps(name):
    """torch's capturable semantics: a step captured in a CUDA graph and replayed 10
    times with a changing lr (a device tensor) equals 10 eager capturable steps."""
    cls, kwargs = CLASS_CASES[name]
    assert_captured_steps_replay_like_eager(cls, kwargs, "cuda", lambda: _model(torch.float32))


@needs_cuda_kernels
@pytest.mark.parametrize("name", ["AdamW", "Amos-rows", "Lamb"])
def test_a_capturable_cuda_step_under_grad_scaler_does_not_sync_the_host(name):
    """With capturable=True a GradScaler step (found_inf, grad_scale on the device)
    reads nothing on the host: it runs under set_sync_debug_mode('error')."""
    cls, kwargs = CLASS_CASES[name]
    params = _model(torch.float32)
    opt = cls(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True, backend="cuda", **kwargs)
    assert_grad_scaler_steps_do_not_sync(opt, params)
