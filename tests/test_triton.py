"""The Triton kernels (amos_fused.triton_kernels.ops) against the eager reference
(amos_fused.reference), on CUDA tensors when a GPU is visible, otherwise on CPU
tensors through Triton's interpreter.

Buckets mix a 0-dim, a 0-element and odd-sized tensors with one that spans two
blocks (a full, unmasked block and a masked tail), so one launch walks several
tensors of different sizes.  Every case runs several steps with fresh grads.

Tolerances:
* float32: rtol=1e-5, atol=1e-6.  Both sides compute in fp32; they differ only in
  operation order (η/bc1 folded into one scalar, the lerp form of m, reductions
  summed in another order, FMA contraction on a GPU): a few ULP per step.
* float64 (fp64 math in the kernels): rtol=1e-12, atol=1e-14, the same argument.
* bfloat16: rtol=2e-2, atol=1e-2 — as for the CPU kernels: both sides compute in
  fp32 and round every stored value to bf16 (nearest even; under the interpreter
  the kernels' stores round explicitly, since its own fp32→bf16 cast truncates).
  A one-ULP fp32 difference can flip one bf16 rounding (2^-8..2^-7 relative); it
  moves later steps by far less than a bf16 ULP, so values stay within ~2 ULP.
* float16: rtol=atol=2e-3, the same argument with fp16's ULP (2^-10).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import amos_fused as af  # noqa: E402
from amos_fused import reference  # noqa: E402
from amos_fused.contracts import call_step  # noqa: E402
from amos_fused.triton_kernels import amos, common, ops  # noqa: E402
from amos_fused.triton_kernels.common import kernels_interpreted  # noqa: E402

DEVICE = torch.device("cpu" if kernels_interpreted() else "cuda")

from registry import CASES, CLASS_CASES, tolerance  # noqa: E402

TOL = {dtype: tolerance("triton", "elementwise", dtype)  # the same for every family
       for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}

# 0-dim, 0-element, odd sizes, a size-1 dim, and two blocks (full + masked tail).
SHAPES = [(), (0,), (37,), (5, 7), (3, 1, 9), (1500,)]
STEPS = 3


def _bucket(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype).to(DEVICE)
            for p in params]


def _clone(tensors):
    return [t.clone() for t in tensors]


class Case:
    """One algorithm configuration: its state, the Triton op call on a whole bucket
    and the reference call on one tensor."""

    def __init__(self, state_keys, new_state, triton_step, reference_step):
        self.state_keys = state_keys
        self.new_state = new_state          # (param, index) -> {key: tensor}
        self.triton_step = triton_step      # (params, grads, states, steps, **scaling)
        self.reference_step = reference_step  # (param, grad, state, index, step)


def _zeros(p, _index):
    return torch.zeros_like(p)


def adam_case(amsgrad, decoupled, bias_correction, weight_decay):
    h = dict(lr=1e-2, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay,
             decoupled=decoupled, amsgrad=amsgrad)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def triton_step(params, grads, states, steps, **scaling):
        call_step(ops, "adam", params, grads, states, steps,
                  dict(h, bias_correction=bias_correction), **scaling)

    def reference_step(p, g, st, _i, step):
        reference.adam_step(p, g, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"], step,
                            bias_correction=bias_correction, **h)

    return Case(keys, lambda p, i: {k: _zeros(p, i) for k in keys}, triton_step, reference_step)


def radam_case(decoupled, threshold):
    h = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=decoupled,
             rectify_threshold=threshold)
    keys = ("exp_avg", "exp_avg_sq")

    def triton_step(params, grads, states, steps, **scaling):
        call_step(ops, "radam", params, grads, states, steps, h, **scaling)

    def reference_step(p, g, st, _i, step):
        reference.radam_step(p, g, st["exp_avg"], st["exp_avg_sq"], step, **h)

    return Case(keys, lambda p, i: {k: _zeros(p, i) for k in keys}, triton_step, reference_step)


def lion_case(weight_decay):
    h = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=weight_decay)

    def triton_step(params, grads, states, steps, **scaling):
        call_step(ops, "lion", params, grads, states, steps, h, **scaling)

    def reference_step(p, g, st, _i, _step):
        reference.lion_step(p, g, st["exp_avg"], **h)

    return Case(("exp_avg",), lambda p, i: {"exp_avg": _zeros(p, i)}, triton_step, reference_step)


ETAS = (0.5, 0.3, 0.05, 0.2, 1.0, 0.1, 0.4, 0.25)


def amos_case(reduce_axes, momentum, clip_value):
    h = dict(lr=0.05, beta=0.98, momentum=momentum, clip_value=clip_value, extra_l2=0.01,
             d_coef=0.25, c_coef=0.25, epsilon=2.0**-125)
    keys = ("v", "b") + (("mu",) if momentum is not None else ())

    def new_state(p, _i):
        slot = af.amos_slots.slot_shape(p.shape, reduce_axes)
        state = {"v": torch.zeros(slot, dtype=p.dtype, device=p.device),
                 "b": torch.zeros(slot, dtype=p.dtype, device=p.device)}
        if momentum is not None:
            state["mu"] = torch.zeros_like(p)
        return state

    def triton_step(params, grads, states, steps, **scaling):
        hyper = dict(h, momentum=momentum or 0.0, clip_value=clip_value or 0.0,
                     use_momentum=momentum is not None, clip=clip_value is not None)
        call_step(ops, "amos", params, grads, states, steps, hyper, list(ETAS[: len(params)]),
                  **scaling)

    def reference_step(p, g, st, i, step):
        reference.amos_step(p, g, st["v"], st["b"], st.get("mu"), step, eta=ETAS[i],
                            reduce_axes=reduce_axes, **h)

    return Case(keys, new_state, triton_step, reference_step)


def scaled_adam_case(inverse_time):
    h = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, p=5.0, q=1.0)

    def init_norm(p):
        return (max(p.numel(), 1) ** 0.5) * (0.5 if p.dim() < 2 else 0.2)

    def triton_step(params, grads, states, steps, **scaling):
        call_step(ops, "scaled_adam", params, grads, states, steps, dict(h, inverse_time=inverse_time),
                  [init_norm(p) for p in params], **scaling)

    def reference_step(p, g, st, _i, step):
        reference.scaled_adam_step(p, g, st["exp_avg"], st["exp_avg_sq"], step,
                                   init_norm=init_norm(p),
                                   decay="inverse_time" if inverse_time else "inverse_square", **h)

    keys = ("exp_avg", "exp_avg_sq")
    return Case(keys, lambda p, i: {k: _zeros(p, i) for k in keys}, triton_step, reference_step)


def lamb_case(bias_correction, weight_decay=0.01):
    h = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=weight_decay)

    def triton_step(params, grads, states, steps, **scaling):
        call_step(ops, "lamb", params, grads, states, steps, dict(h, bias_correction=bias_correction),
                  **scaling)

    def reference_step(p, g, st, _i, step):
        reference.lamb_step(p, g, st["exp_avg"], st["exp_avg_sq"], step,
                            bias_correction=bias_correction, **h)

    keys = ("exp_avg", "exp_avg_sq")
    return Case(keys, lambda p, i: {k: _zeros(p, i) for k in keys}, triton_step, reference_step)


class Run:
    """The same bucket stepped by the Triton op (whole bucket) and the reference
    (tensor by tensor)."""

    def __init__(self, case, shapes, dtype):
        self.case = case
        self.params = _bucket(shapes, dtype)
        self.ref_params = _clone(self.params)
        self.initial = _clone(self.params)
        self.states = [case.new_state(p, i) for i, p in enumerate(self.params)]
        self.ref_states = [{k: v.clone() for k, v in s.items()} for s in self.states]
        self.steps = [torch.tensor(0.0) for _ in self.params]

    def lists(self):
        return {k: [s[k] for s in self.states] for k in self.case.state_keys if k in self.states[0]}

    def step(self, step, grad_scale=None):
        grads = _grads(self.params, step)
        if grad_scale is None:
            self.case.triton_step(self.params, grads, self.lists(), self.steps)
        else:  # the kernels unscale in-kernel
            scaled = [g * grad_scale for g in grads]
            scale = torch.tensor(grad_scale, dtype=torch.float32, device=DEVICE)
            self.case.triton_step(self.params, scaled, self.lists(), self.steps, grad_scale=scale)
        for i, (p, g, st) in enumerate(zip(self.ref_params, grads, self.ref_states)):
            self.case.reference_step(p, g, st, i, step + 1)

    def check(self, steps_done, **tol):
        tol = tol or TOL[self.params[0].dtype]
        for i, (a, b) in enumerate(zip(self.params, self.ref_params)):
            torch.testing.assert_close(a, b, msg=lambda m, i=i: f"param {i}: {m}", **tol)
            for key in self.states[i]:
                torch.testing.assert_close(self.states[i][key], self.ref_states[i][key],
                                           msg=lambda m, i=i, key=key: f"{key}[{i}]: {m}", **tol)
        assert all(float(s) == steps_done for s in self.steps)
        moved = sum(int((p != q).sum()) for p, q in zip(self.params, self.initial))
        total = sum(p.numel() for p in self.params)
        assert moved > total // 2, f"only {moved} of {total} elements moved"


def run_and_check(case, shapes=SHAPES, dtype=torch.float32, steps=STEPS, **tol):
    run = Run(case, shapes, dtype)
    for step in range(steps):
        run.step(step)
    run.check(steps, **tol)
    return run


# ---------------------------------------------------------------------------
# Adam family
# ---------------------------------------------------------------------------

ADAM_CASES = {
    "adamw": dict(amsgrad=False, decoupled=True, bias_correction=True, weight_decay=0.1),
    "adamw-amsgrad-nobc": dict(amsgrad=True, decoupled=True, bias_correction=False, weight_decay=0.1),
    "adam-l2-amsgrad": dict(amsgrad=True, decoupled=False, bias_correction=True, weight_decay=0.1),
    "adam-nodecay": dict(amsgrad=False, decoupled=False, bias_correction=True, weight_decay=0.0),
}


@pytest.mark.parametrize("name", ADAM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam(name, dtype):
    run_and_check(adam_case(**ADAM_CASES[name]), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_adam_other_dtypes(dtype):
    run_and_check(adam_case(**ADAM_CASES["adam-l2-amsgrad"]), dtype=dtype)


def test_dense_non_contiguous_layout():
    """channels_last params (dense, not contiguous) with grads and states laid out
    alike: the elementwise kernels walk memory order."""
    run = Run(adam_case(**ADAM_CASES["adamw"]), [(2, 3, 4, 5), (37,)], torch.float32)
    run.params[0] = run.params[0].contiguous(memory_format=torch.channels_last)
    run.ref_params[0] = run.params[0].clone()
    run.initial[0] = run.params[0].clone()
    for states in (run.states, run.ref_states):
        states[0] = {k: torch.zeros_like(run.params[0]) for k in states[0]}
    for step in range(STEPS):
        grads = _grads(run.params, step)
        grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
        run.case.triton_step(run.params, grads, run.lists(), run.steps)
        for i, (p, g, st) in enumerate(zip(run.ref_params, grads, run.ref_states)):
            run.case.reference_step(p, g, st, i, step + 1)
    assert not run.params[0].is_contiguous()
    run.check(STEPS)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("threshold", [4.0, 5.0])
def test_radam(decoupled, threshold):
    # β2 = 0.999: ρ_t crosses 4 at t = 5 and 5 at t = 6, so 7 steps take both branches.
    run_and_check(radam_case(decoupled, threshold), steps=7)


def test_radam_bfloat16():
    run_and_check(radam_case(True, 5.0), dtype=torch.bfloat16, steps=7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lion(weight_decay, dtype):
    run_and_check(lion_case(weight_decay), dtype=dtype)


# ---------------------------------------------------------------------------
# Amos
# ---------------------------------------------------------------------------

# reduce_axes -> shapes that admit it, covering every walk of amos.py:
AMOS_LAYOUTS = {
    None: SHAPES,                                   # ELEMENTWISE
    "all": SHAPES,                                  # ROWS: one row per tensor
    (1,): [(5, 7), (3, 1, 9), (4, 3, 5), (2, 1100)],  # ROWS (two chunks/row), ELEMENTWISE, GENERAL
    (0,): [(5, 7), (3, 1, 9), (1100, 3)],           # GENERAL (one slot per column)
    (0, 2): [(3, 4, 5), (2, 1, 6)],                 # GENERAL with three merged dims
}


@pytest.mark.parametrize("reduce_axes", list(AMOS_LAYOUTS), ids=str)
@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("clip_value", [None, 0.5])
def test_amos(reduce_axes, momentum, clip_value):
    run_and_check(amos_case(reduce_axes, momentum, clip_value), shapes=AMOS_LAYOUTS[reduce_axes])


def test_amos_aligned_rows():
    """Row lengths that are multiples of 8: full row chunks take the aligned path."""
    run_and_check(amos_case((1,), 0.9, 0.5), shapes=[(3, 1040), (2, 16)])


SHORT_ROW_SHAPES = [(70, 5), (3, 33), (40, 64), (2, 100), (9, 1)]


def test_amos_short_rows_share_programs():
    """Rows of ≤ SHORT_ROW_MAX elements are walked as tiles of rows, one tile per
    program (the bucket's tile width set by its longest short row; last tiles
    partial), beside rows walked one per program; every row matches the reference."""
    params = [torch.zeros(s) for s in SHORT_ROW_SHAPES]
    slots = [torch.zeros(af.amos_slots.slot_shape(p.shape, (1,))) for p in params]
    meta = amos.amos_meta("check", params, slots, slots, None)
    assert meta.kinds == {amos.SHORT_ROWS, amos.ROWS, amos.ELEMENTWISE}  # (9, 1): one element per slot
    assert meta.row_tile == 64
    rows_per_program = amos.BLOCK // 64
    assert meta.program_counts == [-(-70 // rows_per_program), 1, -(-40 // rows_per_program), 2, 1]
    for momentum, clip in [(None, None), (0.9, 0.5)]:
        run_and_check(amos_case((1,), momentum, clip), shapes=SHORT_ROW_SHAPES)
    run_and_check(amos_case((1,), 0.9, None), shapes=SHORT_ROW_SHAPES, dtype=torch.bfloat16)


@pytest.mark.parametrize("reduce_axes", [None, "all", (1,), (0,)], ids=str)
def test_amos_bfloat16(reduce_axes):
    run_and_check(amos_case(reduce_axes, 0.9, 0.5), shapes=AMOS_LAYOUTS[reduce_axes],
                  dtype=torch.bfloat16)


@pytest.mark.parametrize("reduce_axes", [None, (1,), (0,)], ids=str)
def test_amos_float64(reduce_axes):
    run_and_check(amos_case(reduce_axes, 0.9, None), shapes=AMOS_LAYOUTS[reduce_axes],
                  dtype=torch.float64)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_amos_long_rows(monkeypatch, momentum):
    """Rows longer than AMOS_MAX_ROW are split into pieces that never cross a row."""
    monkeypatch.setattr(amos, "AMOS_MAX_ROW", 600)
    run_and_check(amos_case((1,), momentum, 0.5), shapes=[(2, 1100), (5, 7)])
    run_and_check(amos_case("all", momentum, None), shapes=[(1500,), (37,), ()])


@pytest.mark.parametrize("reduce_axes", [(0,), (0, 2)], ids=str)
def test_amos_general_sums_in_runs(monkeypatch, reduce_axes):
    """GENERAL slots whose Σg² is split into several runs of reduced elements (their
    partials added in order by the slot kernel), and slots over two slot blocks."""
    monkeypatch.setattr(amos, "AMOS_SUM_WORK", 8)
    extra = [(3, 1100)] if reduce_axes == (0,) else [(4, 2, 9)]
    run_and_check(amos_case(reduce_axes, 0.9, 0.5), shapes=AMOS_LAYOUTS[reduce_axes] + extra)


# ---------------------------------------------------------------------------
# Scale-aware Adam and LAMB (two phases)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("inverse_time", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_adam(inverse_time, dtype):
    run_and_check(scaled_adam_case(inverse_time), dtype=dtype)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lamb(bias_correction, dtype):
    run_and_check(lamb_case(bias_correction), dtype=dtype)


def test_norm_scaled_float64():
    run_and_check(lamb_case(True), dtype=torch.float64)
    run_and_check(scaled_adam_case(False), dtype=torch.float64)


@pytest.mark.parametrize("lamb", [True, False])
def test_norm_scaled_float16_matches_cpu_kernels(lamb):
    """float16: the Triton and C++ ops agree (both keep u unrounded across the two
    phases for narrow storage, so fp16's underflow of v = (1−β2)·g² in storage
    cannot change u between the phases)."""
    shapes = SHAPES
    params = _bucket(shapes, torch.float16)
    cpu_params = [p.cpu() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    cpu_m, cpu_v = [t.cpu() for t in m], [t.cpu() for t in v]
    steps, cpu_steps = [torch.tensor(0.0) for _ in params], [torch.tensor(0.0) for _ in params]
    norms = [0.5 * max(p.numel(), 1) ** 0.5 for p in params]
    for step in range(STEPS):
        grads = _grads(params, step)
        cpu_grads = [g.cpu() for g in grads]
        if lamb:
            algorithm, per_tensor = "lamb", []
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, bias_correction=True)
        else:
            algorithm, per_tensor = "scaled_adam", norms
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, p=5.0, inverse_time=False, q=1.0)
        call_step(ops, algorithm, params, grads, {"exp_avg": m, "exp_avg_sq": v}, steps, hyper, per_tensor)
        call_step(torch.ops.amos_fused, algorithm, cpu_params, cpu_grads,
                  {"exp_avg": cpu_m, "exp_avg_sq": cpu_v}, cpu_steps, hyper, per_tensor)
    for a, b in zip(params + m + v, cpu_params + cpu_m + cpu_v):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float16])
    assert [float(s) for s in steps] == [float(s) for s in cpu_steps]


def test_lamb_zero_norms():
    """Trust ratio 1 when ‖θ‖ = 0 (zero params, no decay): the plain Adam step."""
    run = Run(lamb_case(True, weight_decay=0.0), [(37,), (5, 7)], torch.float32)
    for p, q in zip(run.params, run.ref_params):
        p.zero_()
        q.zero_()
    run.step(0)
    run.check(1)


# ---------------------------------------------------------------------------
# GradScaler inputs
# ---------------------------------------------------------------------------

ALL_CASES = {
    "adam": lambda: adam_case(**ADAM_CASES["adam-l2-amsgrad"]),
    "radam": lambda: radam_case(True, 5.0),
    "lion": lambda: lion_case(0.5),
    "amos": lambda: amos_case((1,), 0.9, 0.5),
    "scaled_adam": lambda: scaled_adam_case(False),
    "lamb": lambda: lamb_case(True),
}
AMOS_SCALER_SHAPES = [(5, 7), (3, 1, 9), (4, 3, 5)]


def _shapes_for(name):
    return AMOS_SCALER_SHAPES if name == "amos" else SHAPES


@pytest.mark.parametrize("name", ALL_CASES)
def test_grad_scale_unscales_in_kernel(name):
    run = Run(ALL_CASES[name](), _shapes_for(name), torch.float32)
    for step in range(STEPS):
        run.step(step, grad_scale=1024.0)  # a power of two: the unscaled grads are exact
    run.check(STEPS)


@pytest.mark.parametrize("name", ALL_CASES)
def test_found_inf_skips_everything(name):
    run = Run(ALL_CASES[name](), _shapes_for(name), torch.float32)
    run.step(0)
    params, states = _clone(run.params), [{k: v.clone() for k, v in s.items()} for s in run.states]
    grads = _grads(run.params, 1)
    found_inf = torch.tensor(1.0, device=DEVICE)
    run.case.triton_step(run.params, grads, run.lists(), run.steps, found_inf=found_inf,
                         grad_scale=torch.tensor(2.0, device=DEVICE))
    assert all(float(s) == 1.0 for s in run.steps), "step counters advanced on a skipped step"
    for a, b in zip(run.params, params):
        assert torch.equal(a, b)
    for now, before in zip(run.states, states):
        for key in now:
            assert torch.equal(now[key], before[key])
    # found_inf = 0 steps normally.
    run.case.triton_step(run.params, grads, run.lists(), run.steps,
                         found_inf=torch.tensor(0.0, device=DEVICE))
    assert all(float(s) == 2.0 for s in run.steps)


# ---------------------------------------------------------------------------
# Checks before writing, metadata caching, lazy import
# ---------------------------------------------------------------------------

def _snapshot(run):
    return _clone(run.params), [{k: v.clone() for k, v in s.items()} for s in run.states], \
        [float(s) for s in run.steps]


def _assert_untouched(run, snapshot):
    params, states, steps = snapshot
    assert [float(s) for s in run.steps] == steps
    assert all(torch.equal(a, b) for a, b in zip(run.params, params))
    for now, before in zip(run.states, states):
        assert all(torch.equal(now[k], before[k]) for k in now)


def test_bad_inputs_raise_before_any_write():
    run = Run(adam_case(**ADAM_CASES["adamw"]), SHAPES, torch.float32)
    before = _snapshot(run)
    grads = _grads(run.params, 0)
    with pytest.raises(ValueError, match=r"grads\[3\]"):
        run.case.triton_step(run.params, grads[:3] + [None] + grads[4:], run.lists(), run.steps)
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        run.case.triton_step(run.params, grads[:2] + [grads[2].double()] + grads[3:], run.lists(),
                             run.steps)
    bad_states = run.lists()
    bad_states["exp_avg_sq"] = bad_states["exp_avg_sq"][:-1] + [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"exp_avg_sq"):
        run.case.triton_step(run.params, grads, bad_states, run.steps)
    with pytest.raises(ValueError, match=r"steps\[0\]"):
        run.case.triton_step(run.params, grads, run.lists(), [torch.tensor(0.0, dtype=torch.float64)]
                             + run.steps[1:])
    with pytest.raises(ValueError, match="found_inf"):
        run.case.triton_step(run.params, grads, run.lists(), run.steps,
                             found_inf=torch.zeros(2, device=DEVICE))
    strided = torch.zeros(5, 14, device=DEVICE)[:, ::2]  # a view with gaps
    with pytest.raises(ValueError, match="not dense"):
        run.case.triton_step(run.params[:3] + [strided] + run.params[4:], grads, run.lists(),
                             run.steps)
    _assert_untouched(run, before)


def test_a_failed_launch_leaves_the_step_counters(monkeypatch):
    """The counters advance only after the kernels were launched."""
    run = Run(adam_case(**ADAM_CASES["adamw"]), SHAPES, torch.float32)
    before = _snapshot(run)

    def failing(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setitem(ops._LAUNCH, "adam", failing)
    with pytest.raises(RuntimeError, match="launch failed"):
        run.case.triton_step(run.params, _grads(run.params, 0), run.lists(), run.steps)
    _assert_untouched(run, before)


def test_bad_amos_slots_raise_before_any_write():
    run = Run(amos_case((1,), None, None), [(5, 7), (4, 3)], torch.float32)
    before = _snapshot(run)
    lists = run.lists()
    lists["v"] = [lists["v"][0], torch.zeros(4, 2, device=DEVICE)]
    lists["b"] = [lists["b"][0], torch.zeros(4, 2, device=DEVICE)]
    with pytest.raises(ValueError, match="not a slot shape"):
        call_step(ops, "amos", run.params, _grads(run.params, 0), lists, run.steps,
                  dict(lr=0.05, beta=0.98, momentum=0.0, clip_value=0.0, extra_l2=0.0, d_coef=0.25,
                       c_coef=0.25, epsilon=2.0**-125, use_momentum=False, clip=False), [0.5, 0.5])
    _assert_untouched(run, before)


def test_bucket_cache_grows_to_the_working_set():
    """More buckets per round than the minimum: after one round, every lookup hits."""
    cache = common.BucketCache(minimum=4)
    builds = []

    class Meta:
        pass

    def build(key):
        builds.append(key)
        return Meta()

    for _ in range(3):
        for key in range(10):
            cache.get(key, lambda key=key: build(key))
    assert builds[:10] == list(range(10)) and len(builds) <= 10 + 6  # the first rounds learn the size
    builds.clear()
    for key in range(10):
        cache.get(key, lambda key=key: build(key))
    assert builds == [] and cache.capacity >= 10
    cache.clear()
    assert cache.capacity == 4 and not cache.entries


def test_metadata_is_cached_and_follows_addresses():
    run = Run(lion_case(0.0), [(37,), (5, 7)], torch.float32)
    run.step(0)
    key = common.elementwise_key("lion", [run.params, run.lists()["exp_avg"]], common.BLOCK)
    meta = common._cache.entries[key]
    run.step(1)  # new grad tensors every step: same bucket tables, grad table refreshed
    assert common._cache.entries[key] is meta
    assert meta.grad_addresses.key != ()
    # A state tensor replaced (e.g. by load_state_dict): new tables, same results.
    for st in run.states:
        st["exp_avg"] = st["exp_avg"].clone()
    run.step(2)
    new_key = common.elementwise_key("lion", [run.params, run.lists()["exp_avg"]], common.BLOCK)
    assert new_key != key and new_key in common._cache.entries
    run.check(3)


def test_importing_amos_fused_does_not_import_triton():
    code = ("import sys, amos_fused, amos_fused.triton_kernels as tk; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert tk.why_unavailable() is None")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# Through the optimizers (once backend='triton' dispatches to these ops)
# ---------------------------------------------------------------------------

# test id -> registry case: these, and every optimizer class of the registry (its first row)
OPTIMIZERS = {
    "adamw": "adamw", "radam": "radam", "lion": "lion", "amos": "amos-all-momentum",
    "scaled_adam": "scaled-lr1e-2-half_life100", "lamb": "lamb-lr1e-2-wd0.01",
    **{f"class-{name}": case for name, case in CLASS_CASES.items()},
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_backend_triton(name):
    case = CASES[OPTIMIZERS[name]]
    params = [p.requires_grad_(True) for p in _bucket(SHAPES, torch.float32)]
    opt = case.make([{"params": params}], "triton")
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref = case.make([{"params": ref_params}], "reference")
    for step in range(STEPS):
        for p, q, g in zip(params, ref_params, _grads(params, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host syncs of a CUDA step)")
@pytest.mark.parametrize("name", ["adamw", "amos", "lion"])
def test_a_step_without_grad_scaler_does_not_sync_the_host(name):
    """Tables reach the GPU from pinned memory without blocking: after a first step
    (compiles, caches), a step under ``set_sync_debug_mode('error')`` raises on any
    synchronizing call.  (GradScaler's found_inf and grad_scale are still read on the
    host.)"""
    case = CASES[OPTIMIZERS[name]]
    params = [p.requires_grad_(True) for p in _bucket(SHAPES, torch.float32)]
    opt = case.make([{"params": params}], "triton")
    for step in range(2):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        if step == 0:
            opt.step()
            torch.cuda.synchronize()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------------
# Deterministic reductions
# ---------------------------------------------------------------------------

def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


DETERMINISM_CASES = {
    "scaled_adam": (lambda: scaled_adam_case(False), SHAPES + [(3000,)]),
    "lamb": (lambda: lamb_case(True), SHAPES + [(3000,)]),
    "amos-dim0": (lambda: amos_case((0,), 0.9, 0.5), [(5, 7), (1100, 3), (40, 1100)]),
    "amos-dims02": (lambda: amos_case((0, 2), None, None), [(3, 4, 5), (4, 2, 9)]),
    "amos-all-long": (lambda: amos_case("all", 0.9, None), [(2500,), (37,), ()]),
}


@pytest.mark.parametrize("name", DETERMINISM_CASES)
def test_two_phase_reductions_are_deterministic(monkeypatch, name):
    """Two identical runs of the two-phase rules (ScaledAdamW, LAMB, phased Amos:
    a GENERAL layout and 'all' split over several blocks) are bitwise equal."""
    monkeypatch.setattr(amos, "AMOS_MAX_ROW", 600)   # 'all' over 2500 elements: LONG_ROWS
    monkeypatch.setattr(amos, "AMOS_SUM_WORK", 256)  # GENERAL Σg² in several runs
    make, shapes = DETERMINISM_CASES[name]
    runs = []
    for _ in range(2):
        common.clear_cache()  # fresh scratch buffers as well
        run = Run(make(), shapes, torch.float32)
        for step in range(STEPS):
            run.step(step)
        runs.append(run)
    first, second = runs
    for i, (a, b) in enumerate(zip(first.params, second.params)):
        assert torch.equal(_bits(a), _bits(b)), f"params[{i}] differ between two runs"
        for key in first.states[i]:
            assert torch.equal(_bits(first.states[i][key]), _bits(second.states[i][key])), \
                f"{key}[{i}] differ between two runs"


def test_no_atomics_in_triton_kernels():
    """Every reduction is written to per-program scratch and summed in a fixed order:
    no atomic (float atomics make results depend on the order programs run in)."""
    package = os.path.dirname(common.__file__)
    sources = sorted(f for f in os.listdir(package) if f.endswith(".py"))
    assert "amos.py" in sources and "norm_scaled.py" in sources
    for name in sources:
        with open(os.path.join(package, name), encoding="utf-8") as f:
            text = f.read()
        assert "atomic_" not in text, f"{name} uses an atomic"


def test_an_optimizer_step_runs_the_element_checks_once_per_bucket(monkeypatch):
    """The optimizers run check_step over each bucket before any is written, and step
    it through ``fused_ops(..., prechecked=True)``: the Triton op does not run that
    pass again; the op called directly still does (and refuses a bad grad)."""
    import amos_fused.optimizer_base as optimizer_base
    from amos_fused import checks

    calls = []
    real = checks.check_step

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(optimizer_base, "check_step", counted)
    monkeypatch.setattr(common, "check_step", counted)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device=DEVICE)) for shape in [(5, 7), (12,), (3,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = af.AdamW(params, lr=0.01, backend="triton")
    opt.step()
    calls.clear()
    opt.step()
    assert calls == [3]  # one bucket, one pass
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params)
    calls.clear()
    states = {k: [opt.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq")}
    steps = [opt.state[p]["step"] for p in params]
    before = [p.detach().clone() for p in params]
    bad = [p.grad for p in params[:2]] + [torch.zeros(4, device=DEVICE)]
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        call_step(ops, "adam", params, bad, states, steps,
                  dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                       amsgrad=False,
                       decoupled=True, bias_correction=True))
    assert calls == [3]
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(float(s) == 2.0 for s in steps)


def _bf16_subnormals():
    """bfloat16 values with a zero exponent field (below 2^-126), both signs."""
    bits = torch.tensor([0x0001, 0x0003, 0x0040, 0x007F, -0x7FFB, -0x7F81], dtype=torch.int16)
    return bits.view(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=1e-2)), ("Adam", dict(lr=1e-2, maximize=True)),
                                         ("RAdam", dict(lr=1e-2)), ("Lion", dict(lr=1e-2)),
                                         ("AdamW", dict(lr=0.0, track_rms=True))],
                         ids=["AdamW", "Adam", "RAdam", "Lion", "AdamW-lr0-rms"])
def test_bfloat16_subnormals_are_read_as_they_are(name, kwargs):
    """bfloat16 grads, params and states below 2^-126 are read exactly (a widening
    of the bits, as a GPU converts them; the interpreter's own cast loses them):
    bitwise the reference, and at lr=0 with zero grads the params stay as they were."""
    tiny = _bf16_subnormals()
    results, telemetry = [], {}
    for backend in ("reference", "triton", "cpu"):
        p = torch.nn.Parameter(tiny.clone() if kwargs["lr"] == 0.0 else torch.ones_like(tiny))
        opt = getattr(af, name)([p], backend=backend, **kwargs)
        p.grad = torch.zeros_like(tiny) if kwargs["lr"] == 0.0 else tiny.clone()
        opt.step()
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt.state[p]:
                opt.state[p][key].copy_(tiny.abs() if key == "exp_avg_sq" else tiny)
        p.grad = tiny.flip(0).clone() if kwargs["lr"] else torch.zeros_like(tiny)
        opt.step()
        results.append([p.detach()] + [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq") if k in opt.state[p]])
        if kwargs["lr"] == 0.0:
            assert torch.equal(p.detach().view(torch.int16), tiny.view(torch.int16))
            telemetry[backend] = torch.tensor(opt.rms()[p], dtype=torch.float64)
    for ref, tri in zip(*results[:2]):
        assert torch.equal(tri.view(torch.int16), ref.view(torch.int16))
    if telemetry:  # float32 sums of squares, as the CPU kernels take them (these underflow: README)
        torch.testing.assert_close(telemetry["triton"], telemetry["cpu"], rtol=0, atol=0, equal_nan=True)


def test_bfloat16_subnormal_amos_slots_are_read_as_they_are():
    """Amos's bfloat16 row slots v and b holding subnormals (rows of 8192: the
    row-per-program kernel) are read exactly: bitwise the reference."""
    tiny = _bf16_subnormals()[:4].cpu()
    out = []
    for backend in ("reference", "triton"):
        p = torch.nn.Parameter(torch.randn(4, 8192, generator=torch.Generator().manual_seed(0)).bfloat16().to(DEVICE))
        opt = af.Amos([p], lr=0.01, eta=0.5, reduce_axes=1, backend=backend)
        p.grad = torch.zeros_like(p)
        opt.step()
        opt.state[p]["v"].copy_(tiny.view(4, 1))
        opt.state[p]["b"].copy_(tiny.view(4, 1))
        p.grad = (torch.randn(4, 8192, generator=torch.Generator().manual_seed(1)) * 1e-20).bfloat16().to(DEVICE)
        opt.step()
        out.append([p.detach(), opt.state[p]["v"], opt.state[p]["b"]])
    for ref, tri in zip(*out):
        assert torch.equal(tri.cpu().view(torch.int16), ref.cpu().view(torch.int16))
