"""Telemetry of the Triton kernels (``track_rms=True``; the step op's optional
[n, 2] float64 output of Σθ² and Σ(Δθ)² per param), on CUDA tensors when a GPU
is visible, otherwise on CPU tensors through Triton's interpreter.

* Every optimizer class (tests/registry.py CLASS_CASES) and the switches that
  pick other kernels (amsgrad, coupled / decoupled decay, every Amos walk with
  and without momentum): ``opt.rms()`` of backend='triton' equals the reference
  backend's (same params, same grads), and equals the RMS computed by torch from
  the stored params before and after the step.
* Two identical runs give bitwise-equal telemetry, and a tensor's row does not
  depend on the bucket it is stepped in (blocks are cut from its own start).
* A step skipped by found_inf: column 1 is 0, column 0 untouched, params unchanged.

Tolerances: weight RMS rtol 1e-5, update RMS rtol 1e-4.  The kernels square and
add a block in the compute dtype (fp32: one tree sum of ≤ 1024 values, ~1e-6
relative), then add the blocks in float64; the reference squares in float64.  The
update of a param that moved by a few fp32 ULPs on one side only (the backends
differ by operation order) is the only other difference.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from amos_fused.telemetry import new_table  # noqa: E402
from amos_fused.triton_kernels import amos, common  # noqa: E402

from registry import CASES, CLASS_CASES  # noqa: E402
from test_triton import (ADAM_CASES, ALL_CASES, AMOS_LAYOUTS, DEVICE, STEPS, Run, _bits, _bucket,  # noqa: E402
                         _clone, _grads, adam_case, amos_case, lamb_case)

WEIGHT_RTOL, UPDATE_RTOL = 1e-5, 1e-4

# 0-dim, 0-element, odd sizes, a size-1 dim, exactly one block, three blocks (masked tail).
SHAPES = [(), (0,), (37,), (5, 7), (3, 1, 9), (1024,), (2100,)]


# ---------------------------------------------------------------------------
# Through the optimizers: Triton against the reference and against torch
# ---------------------------------------------------------------------------

# Amos reduce_axes by the walks they take (test_triton.py's AMOS_LAYOUTS: its shapes).
AMOS_WALKS = {"elementwise": None, "all": "all", "rows": (1,), "dim0": (0,), "dims02": (0, 2)}

# test id -> (registry case, extra optimizer kwargs, shapes)
OPTIMIZER_CASES = {
    **{f"class-{name}": (case, {}, SHAPES) for name, case in CLASS_CASES.items()},
    "adamw-amsgrad": ("adamw-wd-amsgrad", {}, SHAPES),
    "adam-l2-amsgrad": ("adam-l2-amsgrad", {}, SHAPES),
    "radam-decoupled": ("radam-decoupled", {}, SHAPES),
    "lion-wd": ("lion-wd", {}, SHAPES),
    "scaled-time": ("scaled-time-p", {}, SHAPES),
    "lamb-wd": ("lamb-weight_decay", {}, SHAPES),
    # every Amos walk (common.py / amos.py), with and without momentum
    **{f"amos-{layout}-{'momentum' if momentum else 'plain'}": (
        "amos-all-momentum", dict(reduce_axes=axes, momentum=momentum), AMOS_LAYOUTS[axes])
       for layout, axes in AMOS_WALKS.items() for momentum in (None, 0.9)},
    "amos-clip": ("amos-all-momentum-clip", dict(reduce_axes=(1,)), AMOS_LAYOUTS[(1,)]),
}
BFLOAT16_CASES = ["class-AdamW", "class-Adam", "class-Amos", "amos-rows-momentum", "amos-dim0-plain",
                  "amos-elementwise-plain", "class-Lamb", "class-ScaledAdamW", "class-Lion"]


def _optimizer_run(name, backend, dtype, steps=STEPS):
    """Steps a fresh bucket; returns (params, [rms() after each step], [params before
    each step], [params after each step], lr)."""
    case_name, extra, shapes = OPTIMIZER_CASES[name]
    case = CASES[case_name]
    params = [p.requires_grad_(True) for p in _bucket(shapes, dtype)]
    opt = case.make([{"params": params}], backend, track_rms=True, **extra)
    rms, befores, afters = [], [], []
    for step in range(steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        befores.append([p.detach().clone() for p in params])
        opt.step()
        afters.append([p.detach().clone() for p in params])
        rms.append([opt.rms()[p] for p in params])
    return params, rms, befores, afters, float(opt.param_groups[0]["lr"])


def _torch_rms(before, after, lr):
    """RMS(weight, update) computed by torch from the stored values, in float64."""
    out = []
    for b, a in zip(before, after):
        n = max(a.numel(), 1)
        a64, b64 = a.double(), b.double()
        out.append((math.sqrt(float(a64.square().sum()) / n),
                    math.sqrt(float((a64 - b64).square().sum()) / n) / lr))
    return out


def _assert_rms(got, expected, what, update_rtol=UPDATE_RTOL):
    for i, ((weight, update), (weight_ex, update_ex)) in enumerate(zip(got, expected)):
        assert weight == pytest.approx(weight_ex, rel=WEIGHT_RTOL, abs=1e-12), \
            f"{what}: weight RMS of param {i}: {weight} != {weight_ex}"
        assert update == pytest.approx(update_ex, rel=update_rtol, abs=1e-12), \
            f"{what}: update RMS of param {i}: {update} != {update_ex}"


def _check_against_reference_and_torch(name, dtype):
    _, rms, befores, afters, lr = _optimizer_run(name, "triton", dtype)
    _, ref_rms, _, _, _ = _optimizer_run(name, "reference", dtype)
    for step in range(STEPS):
        _assert_rms(rms[step], _torch_rms(befores[step], afters[step], lr), f"step {step} vs torch")
        _assert_rms(rms[step], ref_rms[step], f"step {step} vs reference")
    assert any(update > 0 for _, update in rms[-1]), "no param moved"


@pytest.mark.parametrize("name", OPTIMIZER_CASES)
def test_rms_matches_reference_and_torch(name):
    _check_against_reference_and_torch(name, torch.float32)


@pytest.mark.parametrize("name", BFLOAT16_CASES)
def test_rms_matches_reference_and_torch_bfloat16(name):
    """bf16 params: the sums are of the rounded stored values (θ and Δθ exact in fp32)."""
    _check_against_reference_and_torch(name, torch.bfloat16)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_rms_amos_phased_walks(monkeypatch, momentum):
    """Amos rows longer than AMOS_MAX_ROW (split over programs) and GENERAL slots
    summed in several runs: telemetry from the phased blocks of amos_kernel."""
    monkeypatch.setattr(amos, "AMOS_MAX_ROW", 600)
    monkeypatch.setattr(amos, "AMOS_SUM_WORK", 256)
    monkeypatch.setitem(OPTIMIZER_CASES, "long", ("amos-all-momentum", dict(reduce_axes="all", momentum=momentum),
                                                  [(2500,), (37,), (), (0,)]))
    monkeypatch.setitem(OPTIMIZER_CASES, "general", ("amos-all-momentum", dict(reduce_axes=(0,), momentum=momentum),
                                                     [(1100, 3), (40, 1100)]))
    _check_against_reference_and_torch("long", torch.float32)
    _check_against_reference_and_torch("general", torch.float32)


# ---------------------------------------------------------------------------
# Through the op: determinism, independence of the bucket, skipped steps
# ---------------------------------------------------------------------------

def _tracked_steps(case, shapes, dtype=torch.float32, steps=STEPS, clear=True):
    """Steps a fresh bucket through the Triton op with telemetry; returns the run and
    the table of each step."""
    if clear:
        common.clear_cache()  # fresh scratch buffers as well
    run = Run(case, shapes, dtype)
    tables = []
    for step in range(steps):
        table = new_table(len(run.params), DEVICE)
        run.case.triton_step(run.params, _grads(run.params, step), run.lists(), run.steps, telemetry=table)
        tables.append(table)
    return run, tables


DETERMINISM_CASES = {
    **{name: (make, SHAPES + [(3000,)]) for name, make in ALL_CASES.items() if name != "amos"},
    "amos-dim0": (lambda: amos_case((0,), 0.9, 0.5), [(5, 7), (3, 1400), (40, 30)]),
    "amos-rows": (lambda: amos_case((1,), None, None), AMOS_LAYOUTS[(1,)] + [(3, 3000)]),
    "amos-elementwise": (lambda: amos_case(None, 0.9, None), SHAPES + [(3000,)]),
}


@pytest.mark.parametrize("name", DETERMINISM_CASES)
def test_telemetry_is_deterministic(name):
    """Two identical runs give bitwise-equal telemetry (and params)."""
    make, shapes = DETERMINISM_CASES[name]
    first, first_tables = _tracked_steps(make(), shapes)
    second, second_tables = _tracked_steps(make(), shapes)
    for step, (a, b) in enumerate(zip(first_tables, second_tables)):
        assert not torch.isnan(a).any(), f"step {step}: telemetry not written: {a}"
        assert torch.equal(_bits(a), _bits(b)), f"step {step}: telemetry differs between two runs"
    for a, b in zip(first.params, second.params):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("name", ["adamw", "lamb", "amos-dim0"])
def test_a_tensors_row_does_not_depend_on_its_bucket(name):
    """A tensor stepped in buckets of 1, 2, 3 tensors (other programs, other
    partial entries) gets the bitwise-same row: its blocks are cut from its own
    start."""
    make = {"adamw": lambda: adam_case(**ADAM_CASES["adamw"]), "lamb": lambda: lamb_case(True),
            "amos-dim0": lambda: amos_case((0,), 0.9, None)}[name]
    shapes = [(3, 1400), (5, 7), (40, 30)] if name.startswith("amos") else [(3000,), (37,), (2100,)]
    _, together = _tracked_steps(make(), shapes)
    for i, shape in enumerate(shapes):
        # the same values: _bucket draws tensor i after tensors 0 … i−1
        run, alone = _tracked_steps(make(), shapes[: i + 1])
        for step in range(STEPS):
            assert torch.equal(_bits(together[step][i]), _bits(alone[step][i])), \
                f"tensor {i} {shape}, step {step}: {together[step][i]} alone: {alone[step][i]}"


@pytest.mark.parametrize("name", ALL_CASES)
def test_skipped_step_zeroes_the_update_column(name):
    shapes = [(5, 7), (3, 1, 9), (4, 3, 5)] if name == "amos" else SHAPES
    run, _ = _tracked_steps(ALL_CASES[name](), shapes, steps=1)
    params = _clone(run.params)
    table = new_table(len(run.params), DEVICE)
    run.case.triton_step(run.params, _grads(run.params, 1), run.lists(), run.steps, telemetry=table,
                         found_inf=torch.tensor(1.0, device=DEVICE), grad_scale=torch.tensor(2.0, device=DEVICE))
    assert torch.equal(table[:, 1], torch.zeros(len(params), dtype=torch.float64, device=DEVICE))
    assert torch.isnan(table[:, 0]).all(), "Σθ² of a skipped step is not measured (stays NaN)"
    assert all(torch.equal(a, b) for a, b in zip(run.params, params)), "a skipped step moved a param"
    assert all(float(s) == 1.0 for s in run.steps)


def test_bad_telemetry_raises_before_any_write():
    run = Run(adam_case(**ADAM_CASES["adamw"]), SHAPES, torch.float32)
    params = _clone(run.params)
    grads = _grads(run.params, 0)
    n = len(run.params)
    for bad in (torch.zeros(n, 2, device=DEVICE),                       # float32
                torch.zeros(n + 1, 2, dtype=torch.float64, device=DEVICE),  # a row too many
                torch.zeros(2, n, dtype=torch.float64, device=DEVICE).t()):  # not contiguous
        with pytest.raises(ValueError, match="telemetry"):
            run.case.triton_step(run.params, grads, run.lists(), run.steps, telemetry=bad)
    assert all(torch.equal(a, b) for a, b in zip(run.params, params))
    assert all(float(s) == 0.0 for s in run.steps)
