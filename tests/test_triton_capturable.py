"""Capturable Triton steps (``capturable=True``): step counters on the params'
device, coefficients computed there (amos_fused/device_coefficients.py),
GradScaler's found_inf read by the kernels.  Held to the host-coefficient steps
(``ops.step``) on the interpreter (CPU tensors) and, with a GPU, captured in a
CUDA graph and replayed."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import amos_fused as af  # noqa: E402
from amos_fused.contracts import contract, step_arguments  # noqa: E402
from amos_fused import device_coefficients  # noqa: E402
from amos_fused.triton_kernels import ops  # noqa: E402
from amos_fused.triton_kernels.common import kernels_interpreted  # noqa: E402
from conftest import assert_captured_steps_replay_like_eager, assert_grad_scaler_steps_do_not_sync  # noqa: E402

DEVICE = torch.device("cpu" if kernels_interpreted() else "cuda")
SHAPES = [(37,), (5, 7), (1500,), (3, 1, 9)]

# algorithm -> hyper-parameters by the contract's names, state keys, per-tensor values
CASES = {
    "adamw": ("adam", dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                           decoupled=1, amsgrad=0,
                           bias_correction=1), ("exp_avg", "exp_avg_sq"), None),
    "adam-l2-amsgrad": ("adam", dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8,
                                     weight_decay=0.1, decoupled=0,
                                     amsgrad=1, bias_correction=1), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), None),
    "radam": ("radam", dict(lr=0.01, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.1, decoupled=1,
                            rectify_threshold=5.0), ("exp_avg", "exp_avg_sq"), None),
    "lion": ("lion", dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1), ("exp_avg",), None),
    "amos": ("amos", dict(lr=0.05, beta=0.98, momentum=0.9, clip_value=0.5, extra_l2=0.01, d_coef=0.25,
                          c_coef=0.25, epsilon=2.0**-125, use_momentum=1, clip=1), ("v", "b", "mu"), 0.3),
    "scaled_adam": ("scaled_adam", dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, p=5.0, inverse_time=0, q=1.0),
                    ("exp_avg", "exp_avg_sq"), 2.0),
    "lamb": ("lamb", dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, bias_correction=1),
             ("exp_avg", "exp_avg_sq"), None),
}


def _bucket(name, dtype):
    algorithm, hyper, keys, per = CASES[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE) for s in SHAPES]
    state = {}
    for key in keys:
        if key in ("v", "b"):  # Amos slots of reduce_axes (last dim,): one per row
            state[key] = [torch.zeros(p.shape[:-1] + (1,) if p.dim() else (), dtype=dtype, device=DEVICE)
                          for p in params]
        else:
            state[key] = [torch.zeros_like(p) for p in params]
    per_tensor = [per * (i + 1) for i in range(len(params))] if per is not None else []
    return algorithm, hyper, params, state, per_tensor


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
            for p in params]


def _clone(params, state):
    return [p.clone() for p in params], {k: [t.clone() for t in v] for k, v in state.items()}


def _step_host(algorithm, hyper, params, grads, state, steps, per_tensor, scaling):
    states, values = step_arguments(algorithm, hyper, state)
    ops.step(algorithm, params, grads, states, steps, values, per_tensor, scaling.get("grad_scale"),
             scaling.get("found_inf"))


def _step_device(algorithm, hyper, params, grads, state, steps, per_tensor, scaling, lr_tensor):
    states, _ = step_arguments(algorithm, hyper, state)
    h = dict(hyper)
    if lr_tensor:
        h["lr"] = torch.tensor(hyper["lr"], dtype=torch.float64, device=DEVICE)
    ops.step_capturable(algorithm, params, grads, states, steps, h, per_tensor, **scaling)


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_capturable_step_matches_the_host_coefficient_step(name, dtype, lr_tensor):
    """Four steps, the third with found_inf set (nothing written, counters kept), a
    GradScaler scale of 2^10: the same params and states as ``ops.step`` (its
    coefficients computed on the host in double; the device's may differ in the
    last bit of a double, so float64 params match to 1e-12), counters on the
    device advanced like the host's."""
    algorithm, hyper, params, state, per_tensor = _bucket(name, dtype)
    (pa, sa), (pb, sb) = _clone(params, state), _clone(params, state)
    host_steps = [torch.tensor(0.0) for _ in params]
    device_steps = [torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in params]
    scale = torch.tensor(1024.0, device=DEVICE)
    for step in range(4):
        found = torch.tensor(1.0 if step == 2 else 0.0, device=DEVICE)
        grads = [g * 1024.0 for g in _grads(params, step)]
        if step == 2:
            grads[0].view(-1)[0] = float("inf")
        scaling = dict(grad_scale=scale, found_inf=found)
        _step_host(algorithm, hyper, pa, [g.clone() for g in grads], sa, host_steps, per_tensor, scaling)
        _step_device(algorithm, hyper, pb, grads, sb, device_steps, per_tensor, scaling, lr_tensor)
    assert [float(s) for s in device_steps] == [float(s) for s in host_steps] == [3.0] * len(params)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=0, atol=0)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, **tol)
    for key in sa:
        for a, b in zip(sa[key], sb[key]):
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_device_coefficients_are_the_host_table(name):
    """The device table equals the C++ prologue's (begin_step) column by column, up
    to the last bit of a double, at several step counts and with a GradScaler scale."""
    algorithm, hyper, params, state, per_tensor = _bucket(name, torch.float64)
    states, values = step_arguments(algorithm, hyper, state)
    for count in (0.0, 1.0, 9.0, 999.0):
        steps = [torch.tensor(count) for _ in params]
        grads = _grads(params, 0)
        run, host = torch.ops.amos_fused.begin_step(algorithm, params, grads, states, steps, values, per_tensor,
                                                    torch.tensor(4.0), None, None, None)
        assert run
        device = device_coefficients.coefficient_table(algorithm, steps, hyper, per_tensor, torch.tensor(4.0),
                                                       float32_math=False)
        assert device.shape == host.shape == (len(params), len(contract(algorithm).columns))
        torch.testing.assert_close(device.cpu(), host, rtol=4e-16, atol=0)


def test_bad_capturable_inputs_raise_before_any_write():
    algorithm, hyper, params, state, per_tensor = _bucket("adamw", torch.float32)
    states, _ = step_arguments(algorithm, hyper, state)
    before = [p.clone() for p in params]
    grads = _grads(params, 0)
    host_steps = [torch.tensor(0.0, dtype=torch.float64) for _ in params]
    with pytest.raises(ValueError, match=r"steps\[0\] must be a one-element float32 tensor"):
        ops.step_capturable(algorithm, params, grads, states, host_steps, hyper, per_tensor)
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    with pytest.raises(ValueError, match="lr must be a one-element"):
        ops.step_capturable(algorithm, params, grads, states, steps, dict(hyper, lr=torch.ones(2, device=DEVICE)),
                            per_tensor)
    with pytest.raises(ValueError, match="expected the hyper-parameters"):
        ops.step_capturable(algorithm, params, grads, states, steps, {"lr": 0.1}, per_tensor)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(float(s) == 0.0 for s in steps)


@pytest.mark.skipif(kernels_interpreted(), reason="needs a CUDA device (CUDA graph capture)")
@pytest.mark.parametrize("cls,kwargs", [(af.AdamW, {}), (af.Lion, {}), (af.RAdam, {}),
                                        (af.Amos, dict(reduce_axes=(-1,))), (af.Lamb, {})],
                         ids=["AdamW", "Lion", "RAdam", "Amos", "Lamb"])
def test_a_captured_step_replays_like_eager_steps(cls, kwargs):
    """torch's capturable semantics: a step captured in a CUDA graph and replayed 10
    times with a changing lr (a device tensor) equals 10 eager capturable steps."""
    def model():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(64, 33, device="cuda")),
                torch.nn.Parameter(torch.randn(70, device="cuda"))]
    assert_captured_steps_replay_like_eager(cls, kwargs, "triton", model)


# ---- the optimizers with capturable=True -------------------------------------------

CLASS_CASES = {
    "AdamW": (af.AdamW, dict(weight_decay=0.1)),
    "Adam-amsgrad": (af.Adam, dict(weight_decay=0.1, amsgrad=True)),
    "RAdam": (af.RAdam, dict(betas=(0.9, 0.9))),
    "Lion": (af.Lion, dict(weight_decay=0.1)),
    "Amos": (af.Amos, dict(eta=0.3, reduce_axes="all", momentum=0.9)),
    "ScaledAdamW": (af.ScaledAdamW, dict(half_life=3)),
    "Lamb": (af.Lamb, dict(weight_decay=0.01)),
    "AdamW-master": (af.AdamW, dict(master_weights=True)),
}


def _model(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE))
            for s in [(5, 7), (1500, 3), (33,)]]


@pytest.mark.parametrize("lr_dtype", [None, torch.float64, torch.float32], ids=["lr-float", "lr-tensor", "lr-f32"])
@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_capturable_optimizer_steps_like_the_host_step(name, lr_dtype):
    """capturable=True on the triton backend: counters on the params' device, the
    same params and states as capturable=False over five steps with a changing lr
    (a float, or a float64 or float32 tensor: the host step then takes the value
    the tensor holds) and GradScaler's found_inf set at the third (nothing changes
    there)."""
    cls, kwargs = CLASS_CASES[name]
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    ours, twin = _model(dtype), _model(dtype)
    lr_tensor = lr_dtype is not None
    lrs = [float(torch.tensor(x, dtype=lr_dtype or torch.float64)) for x in [1e-2, 2e-2, 3e-2, 1.5e-2, 5e-3]]
    lr = torch.tensor(lrs[0], dtype=lr_dtype, device=DEVICE) if lr_tensor else lrs[0]
    opt = cls(ours, lr=lr, capturable=True, backend="triton", **kwargs)
    ref = cls(twin, lr=lrs[0], backend="triton", **kwargs)
    for step in range(5):
        if lr_tensor:
            opt.param_groups[0]["lr"].fill_(lrs[step])
        else:
            opt.param_groups[0]["lr"] = lrs[step]
        ref.param_groups[0]["lr"] = lrs[step]
        for o, (a, b) in ((opt, (ours, None)), (ref, (twin, None))):
            grads = _grads(a, step)
            if step == 2:
                grads[1].view(-1)[3] = float("nan")
            for p, g in zip(a, grads):
                p.grad = g
            o.grad_scale = torch.tensor(1.0, device=DEVICE)  # as torch.amp.GradScaler.step sets them
            o.found_inf = torch.tensor(1.0 if step == 2 else 0.0, device=DEVICE)
            o.step()
            del o.grad_scale, o.found_inf
    for p, q in zip(ours, twin):
        assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 4.0
        assert torch.equal(p.detach(), q.detach())
        for key, value in ref.state[q].items():
            if key != "step":
                assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("cls", [af.AdamW, af.Adam], ids=lambda c: c.__name__)
def test_a_capturable_step_reads_a_tensor_beta1_as_the_host_step(cls):
    """A float64 tensor β1 is cast to the params' dtype for m's weight 1 − β1 (as
    torch.optim's Adam and AdamW do) by the capturable step as by the host step."""
    betas = (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))
    ours, twin = _model(torch.float32), _model(torch.float32)
    opt = cls(ours, lr=1e-2, betas=betas, capturable=True, backend="triton")
    ref = cls(twin, lr=1e-2, betas=betas, backend="triton")
    for step in range(3):
        for o, params in ((opt, ours), (ref, twin)):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            o.step()
    for p, q in zip(ours, twin):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


@pytest.mark.parametrize("kwargs, message", [
    # (the default is refused on CPU params only: on CUDA ones it picks a capturable
    # backend, tests/test_cuda_capturable.py)
    *([(dict(), "capturable=True .*backend='triton'")] if kernels_interpreted() else []),
    (dict(backend="cpu"), "capturable=True .*backend='triton'"),
    (dict(backend="reference"), "capturable=True .*backend='triton'"),
    (dict(backend="triton", track_rms=True), "track_rms"),
    (dict(backend="triton", bf16_stochastic_round=True), "bf16_stochastic_round"),
])
def test_capturable_refusals_name_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        af.AdamW(_model(torch.float32), capturable=True, **kwargs)


def test_capturable_8bit_states_are_refused():
    with pytest.raises(ValueError, match="8-bit states"):
        af.AdamW8bit(_model(torch.float32), capturable=True, backend="triton")


@pytest.mark.parametrize("name", ["found_inf", "grad_scale"])
def test_grad_scaler_tensors_without_data_are_refused_before_any_write(name):
    """A found_inf / grad_scale that cannot be read (a meta tensor) is refused by
    name before a first step creates any state."""
    params = _model(torch.float32)
    opt = af.AdamW(params, lr=0.1, capturable=True, backend="triton")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    setattr(opt, name, torch.zeros((), device="meta"))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=f"{name} .*must be a one-element floating tensor with data"):
        opt.step()
    assert not opt.state and all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_a_capturable_step_that_raises_changes_nothing():
    params = _model(torch.float32)
    opt = af.AdamW(params, lr=0.1, capturable=True, backend="triton")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    opt.state[params[2]]["step"] = torch.zeros(2, device=DEVICE)
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    with pytest.raises(ValueError, match=r"params'\]\[2\].*state\['step'\] must be a one-element float32 tensor"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert all(torch.equal(a, opt.state[p]["step"]) for a, p in zip(steps, params))


def test_capturable_counters_move_to_the_device_and_back():
    """Switching capturable on moves host counters to the params' device (torch's
    capturable keeps them there); switching it off brings them back as float32 CPU
    scalars: both steps continue the count."""
    params = _model(torch.float32)
    opt = af.AdamW(params, lr=0.1, backend="triton")
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.param_groups[0]["capturable"] = step == 1
        opt.step()
        expected = "cpu" if step != 1 else DEVICE.type
        assert all(opt.state[p]["step"].device.type == expected for p in params)
    assert all(float(opt.state[p]["step"]) == 3.0 for p in params)


@pytest.mark.skipif(kernels_interpreted(), reason="needs a CUDA device (host syncs of a CUDA step)")
@pytest.mark.parametrize("cls", [af.AdamW, af.Amos, af.Lamb], ids=lambda c: c.__name__)
def test_a_capturable_step_under_grad_scaler_does_not_sync_the_host(cls):
    """With capturable=True even a GradScaler step (found_inf, grad_scale on the
    device) reads nothing on the host: it runs under set_sync_debug_mode('error')."""
    params = [torch.nn.Parameter(torch.randn(64, 33, device="cuda")),
              torch.nn.Parameter(torch.randn(70, device="cuda"))]
    opt = cls(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True, backend="triton")
    assert_grad_scaler_steps_do_not_sync(opt, params)


def test_capturable_lr_of_an_integer_dtype_steps_like_a_float():
    """torch.optim takes an integer tensor lr; the capturable step reads it on the device."""
    ours, twin = _model(torch.float32), _model(torch.float32)
    opt = af.Lion(ours, lr=torch.tensor(1, device=DEVICE), capturable=True, backend="triton")
    ref = af.Lion(twin, lr=1.0, backend="triton")
    for o, params in ((opt, ours), (ref, twin)):
        for p, g in zip(params, _grads(params, 0)):
            p.grad = g
        o.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(ours, twin))


@pytest.mark.parametrize("lr", [torch.ones(2), torch.tensor(True), torch.tensor(1 + 1j)], ids=["2-elements", "bool",
                                                                                               "complex"])
def test_a_bad_capturable_lr_is_refused_before_any_write(lr):
    """Checked with the step's other inputs: group 0 is not stepped when group 1's
    lr cannot be read on the device."""
    a, b = _model(torch.float32)[:2]
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, capturable=True, backend="triton")
    for p, g in zip((a, b), _grads([a, b], 0)):
        p.grad = g
    opt.param_groups[1]["lr"] = lr.to(DEVICE)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match=r"(param_groups\[1\]\['lr'\]|must be 1-element|Invalid learning rate)"):
        opt.step()
    assert torch.equal(before[0], a.detach()) and torch.equal(before[1], b.detach())
    assert not opt.state


def test_capturable_scaled_adamw_half_life_at_a_zero_tensor_lr():
    """p = (α0·p)/α0 from a tensor lr: 0 at lr = 0 (no step taken, no NaN), then the
    schedule of the host step."""
    ours, twin = _model(torch.float32), _model(torch.float32)
    lr = torch.tensor(0.0, dtype=torch.float64, device=DEVICE)
    opt = af.ScaledAdamW(ours, lr=lr, half_life=3, capturable=True, backend="triton")
    ref = af.ScaledAdamW(twin, lr=0.0, half_life=3, backend="triton")
    for step, value in enumerate([0.0, 1e-2, 2e-2]):
        lr.fill_(value)
        ref.param_groups[0]["lr"] = value
        for o, params in ((opt, ours), (ref, twin)):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            o.step()
        assert all(torch.isfinite(p).all() for p in ours)
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(ours, twin))


def test_a_found_inf_summed_over_devices_skips_without_moving_the_counters():
    """GradScaler sums found_inf over devices: 2 skips the step like 1, and the
    capturable counters stay where the host step's stay."""
    out = {}
    for capturable in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(100).to(DEVICE))
        opt = af.AdamW([p], lr=1e-2, backend="triton", capturable=capturable)
        grads = [torch.randn(100).to(DEVICE) for _ in range(3)]
        p.grad = grads[0].clone()
        opt.step()
        p.grad = grads[1].clone()
        opt.grad_scale, opt.found_inf = torch.tensor(1.0, device=DEVICE), torch.tensor(2.0, device=DEVICE)
        opt.step()
        del opt.grad_scale, opt.found_inf
        after_skip = float(opt.state[p]["step"])
        p.grad = grads[2].clone()
        opt.step()
        out[capturable] = (after_skip, p.detach().clone())
    assert out[False][0] == out[True][0] == 1.0
    assert torch.equal(out[False][1], out[True][1])
