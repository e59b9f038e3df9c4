"""Telemetry (``track_rms=True``, ``opt.rms()``): the step's own Σθ² and Σ(Δθ)²
against sums taken independently from the stored params, on every CPU backend;
bitwise the same at any thread count; a skipped step; bad input refused before any
write."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import amos_fused as af
from registry import CASES, CLASS_CASES, amos_case, seeded_grads, seeded_params

CPU_BACKENDS = ["cpu", "reference"]
SHAPES = [(37, 70), (5001,), (3, 4, 5, 6), (), (0, 3), (2, 9000)]


def _params(shapes, dtype=torch.float32):
    return seeded_params(shapes, dtype)


_grads = seeded_grads


def _expected(after, before, lr):
    """RMS from the stored values, in float64."""
    n = max(after.numel() * (2 if after.is_complex() else 1), 1)
    a = torch.view_as_real(after.detach()) if after.is_complex() else after.detach()
    b = torch.view_as_real(before) if before.is_complex() else before
    a, b = a.double(), b.double()
    return math.sqrt(a.square().sum().item() / n), math.sqrt((a - b).square().sum().item() / n) / lr


def _run(case, backend, shapes=SHAPES, dtype=torch.float32, steps=3, **extra):
    """Steps a fresh optimizer; returns (opt, params, rms after the last step, the
    params before the last step)."""
    params = _params(shapes, dtype)
    opt = case.make(params, backend, track_rms=True, **extra)
    before = None
    for step in range(steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        before = [p.detach().clone() for p in params]
        opt.step()
    return opt, params, opt.rms(), before


def _close(actual, expected, rtol):
    assert actual == pytest.approx(expected, rel=rtol, abs=1e-12), (actual, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_every_optimizer_measures_its_own_step(name, backend):
    """opt.rms() equals the RMS of the stored params and of their change, per param."""
    case = CASES[CLASS_CASES[name]]
    opt, params, rms, before = _run(case, backend)
    lr = opt.param_groups[0]["lr"]
    assert set(rms) == set(params)
    moved = 0
    for p, b in zip(params, before):
        weight, update = _expected(p, b, lr)
        _close(rms[p].weight, weight, 1e-6)
        _close(rms[p].update, update, 1e-5)
        moved += update > 0
    assert moved >= len(params) - 1  # every non-empty param moved


@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_fused_matches_reference(name):
    case = CASES[CLASS_CASES[name]]
    _, params_c, rms_c, _ = _run(case, "cpu")
    _, params_r, rms_r, _ = _run(case, "reference")
    for pc, pr in zip(params_c, params_r):
        _close(rms_c[pc].weight, rms_r[pr].weight, 1e-5)
        _close(rms_c[pc].update, rms_r[pr].update, 1e-4)


@pytest.mark.parametrize("reduce_axes", ["all", (1,), (0,), (0, 2), None])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_amos_every_slot_layout(reduce_axes, momentum):
    """Elementwise, row and general slot layouts (amos_fused's three Amos walks)."""
    case = amos_case(reduce_axes)
    shapes = [(33, 7, 300), (4, 5, 6)]
    opt, params, rms, before = _run(case, "cpu", shapes=shapes, momentum=momentum)
    for p, b in zip(params, before):
        weight, update = _expected(p, b, opt.param_groups[0]["lr"])
        _close(rms[p].weight, weight, 1e-6)
        _close(rms[p].update, update, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64],
                         ids=["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("name", ["AdamW", "Amos", "Lamb"])
def test_narrow_and_wide_dtypes_measure_the_stored_values(name, dtype):
    """bf16/fp16: Δθ is the change of the rounded stored value, not of the float32 math."""
    case = CASES[CLASS_CASES[name]]
    opt, params, rms, before = _run(case, "cpu", dtype=dtype)
    for p, b in zip(params, before):
        weight, update = _expected(p, b, opt.param_groups[0]["lr"])
        _close(rms[p].weight, weight, 1e-5)
        _close(rms[p].update, update, 1e-4)


@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_bitwise_the_same_at_any_thread_count(name):
    """Fixed blocks, added in order: the sums do not depend on how many threads step them."""
    case = CASES[CLASS_CASES[name]]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            _, params, rms, _ = _run(case, "cpu", shapes=[(300, 700), (70001,), (5, 7)])
            results.append([tuple(rms[p]) for p in params])
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


def test_skipped_step_reports_no_update_and_changes_nothing():
    for backend in CPU_BACKENDS:
        params = _params([(10, 10), (7,)])
        opt = af.AdamW(params, lr=0.1, backend=backend, track_rms=True)
        for p, g in zip(params, _grads(params, 0)):
            p.grad = g
        before = [p.detach().clone() for p in params]
        opt.found_inf = torch.tensor(1.0)
        opt.grad_scale = torch.tensor(1.0)
        opt.step()
        rms = opt.rms()
        for p, b in zip(params, before):
            assert torch.equal(p, b)
            assert rms[p].update == 0.0 and math.isnan(rms[p].weight), backend


def test_off_by_default_and_per_group():
    a, b = _params([(4, 4), (3,)])
    opt = af.AdamW([{"params": [a]}, {"params": [b], "track_rms": True}], lr=0.1)
    assert opt.defaults["track_rms"] is False
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert set(opt.rms()) == {b}
    plain = af.AdamW([a], lr=0.1)
    plain.step()
    assert plain.rms() == {}


def test_params_removed_from_the_optimizer_are_not_reported():
    a, b = _params([(4, 4), (3,)])
    opt = af.AdamW([a, b], lr=0.1, track_rms=True)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    opt.param_groups[0]["params"] = [b]
    assert set(opt.rms()) == {b}


def test_update_rms_is_per_unit_of_lr():
    """Adam's first step moves every element by lr (m̂/sqrt(v̂) = ±1): update RMS 1."""
    for lr in (0.1, 0.003):
        (p,) = _params([(64,)])
        opt = af.Adam([p], lr=lr, eps=0.0, track_rms=True)
        p.grad = torch.randn_like(p)
        opt.step()
        _close(opt.rms()[p].update, 1.0, 1e-5)


def test_zero_lr_update_is_nan():
    (p,) = _params([(8,)])
    opt = af.AdamW([p], lr=0.0, track_rms=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert math.isnan(opt.rms()[p].update)


def test_complex_params_count_real_numbers():
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.complex64))
    opt = af.AdamW([p], lr=0.01, track_rms=True)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    weight, update = _expected(p, before, 0.01)
    _close(opt.rms()[p].weight, weight, 1e-6)
    _close(opt.rms()[p].update, update, 1e-5)


def test_track_rms_must_be_a_bool():
    with pytest.raises(ValueError, match="track_rms must be True or False, got 1"):
        af.AdamW(_params([(3,)]), track_rms=1)


@pytest.mark.parametrize("bad, message", [
    (lambda n: torch.zeros(n, 2), "contiguous float64 tensor of shape"),
    (lambda n: torch.zeros(n + 1, 2, dtype=torch.float64), r"shape \[2, 2\]"),
    (lambda n: torch.zeros(2, n, dtype=torch.float64).t(), "not contiguous"),
])
def test_op_refuses_bad_telemetry_before_writing(bad, message):
    params = [p.detach() for p in _params([(5,), (6,)])]
    grads = [torch.ones_like(p) for p in params]
    states = [torch.zeros_like(p) for _ in range(2) for p in params]  # exp_avgs, exp_avg_sqs
    steps = [torch.tensor(0.0) for _ in params]
    kept = [t.clone() for t in params + states + steps]
    # lr, beta1, beta1_weight, beta2, eps, weight_decay, decoupled, amsgrad, bias_correction
    hyper = [0.1, 0.9, 1 - 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=message):
        torch.ops.amos_fused.step("adam", params, grads, states, steps, hyper, [], None, None, bad(len(params)))
    for t, k in zip(params + states + steps, kept):
        assert torch.equal(t, k)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    name=st.sampled_from(sorted(CLASS_CASES)),
    with_grad=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_property_any_bucket(shapes, dtype, name, with_grad):
    """Any shapes, dtypes and None grads: the measured RMS is that of the stored values;
    a param without a grad keeps the RMS of its last step (or has none yet)."""
    case = CASES[CLASS_CASES[name]]
    params = _params(shapes, dtype)
    opt = case.make(params, "cpu", track_rms=True)
    for p, g, has in zip(params, _grads(params, 0), with_grad):
        p.grad = g if has else None
    before = [p.detach().clone() for p in params]
    opt.step()
    rms = opt.rms()
    lr = opt.param_groups[0]["lr"]
    for p, b, has in zip(params, before, with_grad):
        if not has:
            assert p not in rms
            continue
        weight, update = _expected(p, b, lr)
        _close(rms[p].weight, weight, 1e-5)
        _close(rms[p].update, update, 1e-4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_param_stepped_without_tracking_leaves_rms(backend):
    """rms() holds each tracked param at its latest step: a step of its group with
    track_rms switched off drops it (its old record is no longer its latest), and
    tracking it again brings it back."""
    p = torch.nn.Parameter(torch.randn(300))
    opt = af.AdamW([p], lr=1e-2, track_rms=True, backend=backend)
    for step, track in enumerate([True, False, True]):
        opt.param_groups[0]["track_rms"] = track
        p.grad = torch.randn(300)
        opt.step()
        assert (p in opt.rms()) == track, step


def test_reference_telemetry_is_bitwise_the_same_at_any_thread_count():
    """The reference backend's sums are taken in a fixed order too (tensors large
    enough for torch's own sum to split them between threads): 1, 2 and 3 threads."""
    from conftest import num_threads

    results = []
    for threads in (1, 2, 3):
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(70001,), (33, 1001), (300_000,)]]
        opt = af.AdamW(params, lr=1e-2, track_rms=True, backend="reference")
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with num_threads(threads):
            opt.step()
            results.append([tuple(opt.rms()[p]) for p in params])
    assert results[0] == results[1] == results[2]
