"""The fused C++ CPU kernels (``backend='cpu'``, csrc/cpu/) against the eager
reference (``backend='reference'``) for every algorithm of tests/registry.py, on
every instruction-set path (the `capabilities` fixture), in every storage dtype,
and against torch.optim directly; big buckets split over threads, determinism,
mixed dtypes in one group, and a param group added later.

Tolerances (registry.TOL['cpu'], 10-12 steps, two groups, None grads on some steps):

Adam family and Lion (plain torch.testing.assert_close):

* float64: rtol=1e-12, atol=1e-14.  Both sides compute in double; the only
  differences are operation order (the kernel's lerp form of m, η/bc1 folded
  into one scalar, FMA contraction on the AVX2 path), a few ULP per step.
  Measured: <= 1.4e-15 absolute on params of magnitude <= 3.
* float32: assert_close defaults (rtol=1.3e-6, atol=1e-5), i.e. a few ULP.
* bfloat16: rtol=2e-2, atol=1e-2.  Both sides compute in float32 and round
  every stored value (param, m, v) to bf16 each step.  A float32 difference of
  one ULP (order of operations / FMA) can flip one bf16 rounding: one bf16 ULP
  is 2^-7 ~ 7.8e-3 relative.  Such a flip in m or v then only moves the next
  updates by ~lr x (that relative error), far below a bf16 ULP of the param, so
  a stored value is off by at most ~2 ULP: rtol 2e-2 ~ 2.5 ULP.  Measured
  max |diff| 3.9e-3 (one ULP at magnitude 0.5..1).
* float16: rtol=atol=2e-3, the same argument with fp16's ULP 2^-10 ~ 9.8e-4
  (about 2 ULP).  Measured max |diff| 2.4e-4.

Amos, ScaledAdamW and LAMB: every state tensor and every param is compared with
``rtol`` plus an absolute floor of ``atol × max|reference tensor|`` (the floor is
relative to the tensor's own scale, because v ≈ (1−β)·g² lives around 1e-3 while
params are O(1): one absolute atol for both would either be meaningless for v or
too strict for params).  ``step`` must be equal.

* float64: rtol=1e-10, atol=1e-12.  Both sides compute in double; they differ only
  in operation order (the Amos kernel folds the slot math into Δ = w·θ − a·g, sums
  g² in blocks; the norm-scaled kernels sum norms in float blocks then double; the
  AVX2 path contracts multiply-adds into FMAs): a few ULP per step.  Measured over
  12 steps: <= 9e-16 absolute on params of magnitude <= 4 (Amos), <= 4.3e-16
  relative to the tensor's max (ScaledAdamW / LAMB).
* float32, Amos: rtol=1e-5, atol=1e-6.  The kernel computes its per-step scalars in
  double and rounds them once to float, the reference multiplies float32 tensors by
  Python scalars in another order; each step adds a few float32 ULP (6e-8 relative)
  of disagreement, r = (1−β^t)/v amplifies relative errors of v by at most 1 and
  sqrt(r) by 1/2, and 10–12 steps accumulate them: measured <= 4e-7 absolute on
  params of magnitude <= 4 (1e-7 relative), so 1e-5 leaves ~100x headroom while
  still catching any formula slip (those show up at >= 1e-3).
* float32, ScaledAdamW / LAMB: rtol=1.3e-6, atol=1e-5 (torch.testing's float32
  defaults), applied with the scaled floor.  A few float32 ULP per step, the norm
  ratio ‖ε0‖/‖u‖ or ‖θ‖/‖u‖ adding one more rounding.  Measured <= 5.6e-7 relative
  to the max.
* bfloat16: rtol=2e-2, atol=1e-2.  Both sides compute in float32 and round each
  stored value to bf16 every step.  A one-ULP float32 difference can flip one bf16
  rounding (a bf16 ULP is 2^-8..2^-7 relative, <= 7.8e-3); a flipped v, b or m
  moves later updates only by ~lr·η·2^-7, below a param ULP, so stored values
  stay within ~2 ULP: rtol 2e-2 ~ 2.5 ULP.  Measured: 1 ULP at most.
* float16: rtol=2e-3, atol=2e-3: the same argument with fp16's ULP 2^-10 ≈ 9.8e-4.
  Measured: 1 ULP (4.9e-4 on params of magnitude 0.5..1).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import amos_fused as af
from conftest import (
    CPU_CAPABILITIES,
    SHAPES,
    assert_moved,
    assert_run_close,
    clone_params,
    make_grads,
    make_params,
    run_pair,
    states_of,
    step_together,
)
from registry import (
    AMOS_REDUCE_AXES,
    AMOS_SECOND_GROUP,
    CASES,
    CLASS_CASES,
    amos_case,
    assert_bitwise_equal,
    assert_matches,
    decay_lr,
    dtype_id,
    tolerance,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STEPS = 10
ONE_THREAD = pytest.mark.usefixtures("one_thread_outside_the_kernels")


def _pair(name, **kwargs):
    case = CASES[name]
    return run_pair(case.factory("cpu"), case.factory("reference"), **kwargs)


# ---------------------------------------------------------------------------
# Instruction sets
# ---------------------------------------------------------------------------

def _capability_at_load(forced):
    env = dict(os.environ)
    env.pop("AMOS_FUSED_CPU_CAPABILITY", None)
    if forced is not None:
        env["AMOS_FUSED_CPU_CAPABILITY"] = forced
    out = subprocess.run([sys.executable, "-c", "import torch, amos_fused; "
                          "print(torch.ops.amos_fused.cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_the_best_instruction_set_is_chosen_at_load_and_each_other_can_be_forced():
    """The widest set this CPU has runs unless AMOS_FUSED_CPU_CAPABILITY names a
    narrower one (sets are tried in the order default, avx2, avx512, avx512_bf16)."""
    assert _capability_at_load(None) == CPU_CAPABILITIES[-1]
    for forced in CPU_CAPABILITIES:
        assert _capability_at_load(forced) == forced


@pytest.mark.parametrize("forced", ["avx1024", "AVX2", "best", ""])
def test_an_unknown_instruction_set_in_the_environment_warns_and_the_best_runs(forced):
    """AMOS_FUSED_CPU_CAPABILITY takes set_cpu_capability's names: 'best' (or an
    empty value) is the widest set, and any other name it does not know warns once,
    naming it, and the widest set runs."""
    env = dict(os.environ, AMOS_FUSED_CPU_CAPABILITY=forced)
    out = subprocess.run([sys.executable, "-c", "import torch, amos_fused; "
                          "print(torch.ops.amos_fused.cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == CPU_CAPABILITIES[-1]
    warned = f"AMOS_FUSED_CPU_CAPABILITY='{forced}' is not one of 'default', 'avx2'"
    assert (warned in out.stderr) == (forced not in ("best", "")), out.stderr


def test_an_unknown_or_missing_instruction_set_is_refused_by_name():
    before = torch.ops.amos_fused.cpu_capability()
    with pytest.raises(ValueError, match=r"unknown cpu capability 'avx1024'.*'avx512_bf16'"):
        torch.ops.amos_fused.set_cpu_capability("avx1024")
    for name in ("avx2", "avx512", "avx512_bf16"):
        if name not in CPU_CAPABILITIES:
            with pytest.raises(ValueError, match=f"'{name}' requested but this CPU lacks"):
                torch.ops.amos_fused.set_cpu_capability(name)
    assert torch.ops.amos_fused.cpu_capability() == before


# ---------------------------------------------------------------------------
# Adam family and Lion
# ---------------------------------------------------------------------------

ELEMENTWISE = [f"adamw-ams{a}-bc{b}-wd{wd}" for a in (0, 1) for b in (1, 0) for wd in (0.0, 0.1)] + [
    "adam-l2-ams0", "adam-l2-ams1", "radam", "radam-decoupled", "radam-threshold4", "lion", "lion-wd"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_cpu_matches_reference(name, dtype, capabilities):
    run = _pair(name, dtype=dtype, steps=STEPS)
    assert_moved(run)
    assert_matches(run, "cpu", CASES[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_every_optimizer_matches_reference(name, dtype):
    """Every optimizer class of the registry (its first row), cpu against the reference."""
    case = CASES[CLASS_CASES[name]]
    run = _pair(CLASS_CASES[name], dtype=dtype, steps=STEPS)
    assert_moved(run)
    assert_matches(run, "cpu", case, dtype)


def test_radam_threshold_changes_the_branch():
    """Guards the threshold-4 case: at t = 5 (ρ_5 ~ 4.996) it rectifies, torch's 5 does not."""
    results = []
    for threshold in (4.0, 5.0):
        run = run_pair(
            lambda g: af.RAdam(g, lr=1e-2, rectify_threshold=threshold, backend="cpu"),
            lambda g: af.RAdam(g, lr=1e-2, rectify_threshold=threshold, backend="reference"),
            steps=5, none_grads={},
        )
        assert_run_close(run, **tolerance("cpu", "elementwise", torch.float64))
        results.append(run.params_a[3].detach())
    assert not torch.allclose(results[0], results[1])


TORCH_TWINS = ["adamw", "adamw-amsgrad", "adam-l2", "adam-l2-amsgrad", "radam", "radam-decoupled"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_cpu_matches_torch_optim(name, dtype, capabilities):
    case = CASES[name]
    run = run_pair(case.factory("cpu"), case.torch_factory(), dtype=dtype, steps=STEPS)
    assert_moved(run)
    assert_run_close(run)  # assert_close defaults


def test_default_backend_on_cpu_is_the_fused_one():
    """backend=None steps CPU params with the fused kernels: bitwise the same as backend='cpu'."""
    run = run_pair(
        lambda g: af.AdamW(g, lr=1e-2, amsgrad=True),
        lambda g: af.AdamW(g, lr=1e-2, amsgrad=True, backend="cpu"),
        dtype=torch.float32,
    )
    for a, b in zip(run.params_a, run.params_b):
        assert torch.equal(a, b)
    assert "cpu" in af.available_backends() and "reference" in af.available_backends()


# Sizes around and above the parallel grain (32768 elements), tensors that
# straddle a thread boundary, plus many small tensors.
BIG_SHAPES = (
    [(100_003,), (7,), (33, 1001), (0,), (), (32_768,), (65_537,), (3, 1, 7)]
    + [(n,) for n in range(1, 41)]
    + [(32_769,)]
)


def _big_run(name, backend_a, backend_b, dtype, steps=4, **kw):
    case = CASES[name]
    return run_pair(case.factory(backend_a), case.factory(backend_b), dtype=dtype,
                    steps=steps, shapes=BIG_SHAPES, split=20, none_grads={1: (0, 9)}, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "adam-l2-ams0", "radam-threshold4", "lion-wd"])
def test_big_bucket_matches_reference(name, dtype, capabilities):
    assert torch.get_num_threads() >= 1
    run = _big_run(name, "cpu", "reference", dtype)
    assert_moved(run)
    assert_matches(run, "cpu", CASES[name], dtype)


def test_big_bucket_thread_count_does_not_matter():
    """One thread and all threads split the bucket differently; results agree."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _big_run("adamw-ams1-bc1-wd0.1", "cpu", "cpu", torch.float32)
    finally:
        torch.set_num_threads(threads)
    multi = _big_run("adamw-ams1-bc1-wd0.1", "cpu", "cpu", torch.float32)
    for a, b in zip(single.params_a, multi.params_a):
        torch.testing.assert_close(a, b)
    for sa, sb in zip(single.states_a(), multi.states_a()):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "radam", "lion"])
def test_deterministic(name, dtype, capabilities):
    """Two identical runs are bitwise equal."""
    assert_bitwise_equal([_big_run(name, "cpu", "cpu", dtype, steps=3) for _ in range(2)])


def _mixed_params():
    base = make_params(torch.float64, seed=3)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    return [p.detach().to(dt).requires_grad_(True) for p, dt in zip(base, dtypes)]


@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "adam-l2-ams1", "radam-decoupled", "lion-wd"])
def test_mixed_dtypes_in_one_group(name, capabilities):
    params = _mixed_params()
    run = _pair(name, params=params, steps=STEPS, split=len(params))  # one group: float32, float64 and bfloat16 buckets
    assert len(run.opt_a.param_groups) == 1
    assert_moved(run)
    for p, q, sa, sb in zip(run.params_a, run.params_b, run.states_a(), run.states_b()):
        assert p.dtype == q.dtype
        tol = tolerance("cpu", "elementwise", p.dtype)
        torch.testing.assert_close(p, q, **tol)
        assert set(sa) == set(sb)
        for key in sa:
            if key != "step":
                assert sa[key].dtype == p.dtype
                torch.testing.assert_close(sa[key], sb[key], **tol)


def test_mixed_dtypes_in_one_group_matches_torch():
    params = [p for p in _mixed_params() if p.dtype != torch.bfloat16]
    case = CASES["adamw"]
    run = run_pair(case.factory("cpu"), case.torch_factory(), params=params, steps=STEPS, split=len(params),
                   none_grads={3: (1,)})
    assert_moved(run)
    assert_run_close(run)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_param_added_later_is_stepped(backend):
    params = make_params(torch.float32)
    twin = clone_params(params)
    ours = af.AdamW([{"params": params[:3]}], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW([{"params": twin[:3]}], lr=1e-2)
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": params[3:], "lr": 2e-2})
            theirs.add_param_group({"params": twin[3:], "lr": 2e-2})
        step_together(make_grads(params, step), (params, ours), (twin, theirs))
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b)
    for sa, sb in zip(states_of(ours, params), states_of(theirs, twin)):
        assert set(sa) == set(sb)
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key])
    assert len(SHAPES) == len(params)


# ---------------------------------------------------------------------------
# Amos: every slot layout and kernel path
# ---------------------------------------------------------------------------

AMOS_STEPS = 12
# layout -> shapes it is valid for: odd sizes, size-1 dims, 0-dim, 0 elements.
AMOS_SHAPES = {
    "elementwise": [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (2, 3, 5)],
    "all": [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (2, 3, 5)],
    # trailing axis: contiguous rows, the one-pass row path; (3,1,7) reduces a size-1 dim
    "rows": [(37, 5), (4, 16), (3, 1, 7), (0, 5), (5, 0), (1, 33), (33, 1)],
    "last": [(37, 5), (4, 16), (2, 3, 9), (6, 1), (1, 1)],
    # non-trailing: the two-pass general path ((9,1) and (1,9) degenerate to rows / elementwise)
    "dim0": [(37, 5), (4, 16), (1, 9), (9, 1), (0, 5), (6, 0)],
    "outer_and_inner": [(3, 4, 5), (2, 1, 7), (5, 3, 17), (4, 6, 1), (0, 3, 4)],
    "trailing_two": [(3, 4, 5), (6, 7, 11), (2, 1, 7), (1, 3, 3), (5, 0, 2)],
}
AMOS_CONFIGS = ["plain", "momentum", "clip", "extra_l2", "everything"]


def _amos_run(case, shapes, dtype, steps=AMOS_STEPS, **kw):
    n = len(shapes)
    kw = {"second_group": AMOS_SECOND_GROUP, "split": n // 2,
          # a grad missing on the first step (late state) and one missing later (lagging step)
          "none_grads": {0: (n - 1,), 5: (0,)}, **kw}
    return run_pair(case.factory("cpu", threads=True), case.factory("reference"), dtype=dtype, steps=steps,
                    shapes=shapes, before_step=decay_lr, **kw)


@ONE_THREAD
@pytest.mark.parametrize("config", AMOS_CONFIGS)
@pytest.mark.parametrize("layout", list(AMOS_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_amos_matches_reference(layout, config, dtype, capabilities):
    case = amos_case(AMOS_REDUCE_AXES[layout], config)
    run = _amos_run(case, AMOS_SHAPES[layout], dtype)
    assert_moved(run)
    assert_matches(run, "cpu", case, dtype)
    # the missing grads really left their marks: late state / lagging step counter
    steps = [float(s["step"]) for s in run.states_a()]
    assert steps[0] == AMOS_STEPS - 1 and steps[-1] == AMOS_STEPS - 1
    assert all(s == AMOS_STEPS for s in steps[1:-1])


@ONE_THREAD
@pytest.mark.parametrize("layout", list(AMOS_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_amos_matches_reference_low_precision(layout, dtype, capabilities):
    case = amos_case(AMOS_REDUCE_AXES[layout], "everything")
    run = _amos_run(case, AMOS_SHAPES[layout], dtype)
    assert_moved(run)
    assert_matches(run, "cpu", case, dtype)


# Rows longer than the SIMD tile and the parallel grain (32768 elements), many short
# rows, and a bucket whose rows straddle the per-thread chunk boundaries at odd offsets.
AMOS_BIG = {
    "wide_rows": ((1,), [(3, 50_000)]),
    "many_rows": ((1,), [(40_000, 3)]),
    "mixed_rows_bucket": ((1,), [(5, 11), (3, 50_000), (40_000, 3), (33, 1)]),
    "general_many_slots": ((0,), [(40_000, 3), (3, 20_001)]),
    "scalar_slot_big": ("all", [(7,), (100_003,)]),
}


@ONE_THREAD
@pytest.mark.parametrize("layout", list(AMOS_BIG))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_amos_big_tensors_match_reference(layout, dtype, capabilities):
    reduce_axes, shapes = AMOS_BIG[layout]
    case = amos_case(reduce_axes, "everything")
    run = _amos_run(case, shapes, dtype, steps=10, split=len(shapes), second_group=None, none_grads={})
    assert_moved(run)
    assert_matches(run, "cpu", case, dtype)


@ONE_THREAD
def test_amos_bitwise_deterministic(capabilities):
    """Two identical runs of the cpu backend (rows spread over threads) agree bitwise."""
    reduce_axes, shapes = AMOS_BIG["mixed_rows_bucket"]
    make = amos_case(reduce_axes, "everything").factory("cpu", threads=True)
    run = run_pair(make, make, dtype=torch.float32, steps=4, shapes=shapes, split=len(shapes),
                   none_grads={}, before_step=decay_lr)
    for pa, pb in zip(run.params_a, run.params_b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(run.states_a(), run.states_b()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------
# ScaledAdamW and LAMB: the two-phase kernels
# ---------------------------------------------------------------------------

NORM_SCALED = ["scaled-square-p", "scaled-time-p", "scaled-square-half_life", "scaled-time-half_life-q",
               "scaled-square-no_p-q", "scaled-time-no_p-sigma", "scaled-square-p-sigma-q",
               "lamb-plain", "lamb-weight_decay", "lamb-no_bias_correction", "lamb-big_eps"]


def _norm_pair(name, dtype, shapes=SHAPES, steps=STEPS, **kwargs):
    case = CASES[name]
    return run_pair(case.factory("cpu", threads=True), case.factory("reference", threads=True),
                    dtype=dtype, steps=steps, shapes=shapes, second_group={"lr": 0.02}, **kwargs)


@ONE_THREAD
@pytest.mark.parametrize("name", NORM_SCALED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_norm_scaled_matches_reference(name, dtype, capabilities):
    run = _norm_pair(name, dtype)
    assert_moved(run)
    assert_matches(run, "cpu", CASES[name], dtype)


@ONE_THREAD
@pytest.mark.parametrize("name", ["scaled-square-p", "lamb-weight_decay"])
def test_norm_scaled_matches_reference_float16(name, capabilities):
    run = _norm_pair(name, torch.float16)
    assert_matches(run, "cpu", CASES[name], torch.float16)


# Tensors bigger than the parallel grain (32768 elements): a tensor's ‖u‖² (and ‖θ‖²)
# is summed by several threads and combined chunk by chunk.
NORM_BIG_SHAPES = [(40_000,), (300, 257), (5,), (), (0,), (33_000,), (7, 9), (65_537,)]


@ONE_THREAD
@pytest.mark.parametrize("name", ["scaled-time-half_life-q", "scaled-square-p-sigma-q", "lamb-weight_decay"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_norm_scaled_big_tensors_match_reference(name, dtype, capabilities):
    run = _norm_pair(name, dtype, shapes=NORM_BIG_SHAPES, split=5, none_grads={3: (1,)})
    assert_moved(run)
    assert_matches(run, "cpu", CASES[name], dtype)


@ONE_THREAD
@pytest.mark.parametrize("name", ["scaled-square-p", "lamb-weight_decay"])
def test_norm_scaled_deterministic(name, capabilities):
    """The kernels reduce norms in a fixed order: two runs agree bitwise."""
    make = CASES[name].factory("cpu", threads=True)
    run = run_pair(make, make, dtype=torch.float32, steps=4, shapes=NORM_BIG_SHAPES, split=len(NORM_BIG_SHAPES))
    for pa, pb in zip(run.params_a, run.params_b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(run.states_a(), run.states_b()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
