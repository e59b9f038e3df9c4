"""The fused C++ CPU kernels (backend='cpu') against the eager reference, on
every instruction-set path (the `capabilities` fixture), in every storage dtype,
and against torch.optim directly.

Tolerances (10 steps, two groups, None grads on some steps):

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
"""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from conftest import (
    SHAPES,
    assert_moved,
    assert_run_close,
    clone_params,
    make_grads,
    make_params,
    run_pair,
    set_grads,
    states_of,
)

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: {},  # assert_close defaults
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPES = list(TOL)
STEPS = 10


def _algorithms():
    """name -> (class, kwargs) of every fused configuration."""
    cases = {}
    for amsgrad in (False, True):
        for bias_correction in (True, False):
            for wd in (0.0, 0.1):
                cases[f"adamw-ams{int(amsgrad)}-bc{int(bias_correction)}-wd{wd}"] = (
                    af.AdamW,
                    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=wd, amsgrad=amsgrad,
                         bias_correction=bias_correction),
                )
    for amsgrad in (False, True):
        cases[f"adam-l2-ams{int(amsgrad)}"] = (
            af.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad))
    cases["radam-l2"] = (af.RAdam, dict(lr=1e-2, weight_decay=0.1))
    cases["radam-decoupled"] = (af.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True))
    # ρ_t > 4 from t = 5 on (β2 = 0.999): both branches within 10 steps, and a
    # step (t = 5) where threshold 4 and torch's 5 disagree.
    cases["radam-threshold4"] = (af.RAdam, dict(lr=1e-2, weight_decay=0.1, rectify_threshold=4.0))
    cases["lion"] = (af.Lion, dict(lr=1e-2, betas=(0.9, 0.99)))
    cases["lion-wd"] = (af.Lion, dict(lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5))
    return cases


ALGORITHMS = _algorithms()


def _factory(name, backend):
    cls, kw = ALGORITHMS[name]
    return lambda groups: cls(groups, backend=backend, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_cpu_matches_reference(name, dtype, capabilities):
    run = run_pair(_factory(name, "cpu"), _factory(name, "reference"), dtype=dtype, steps=STEPS)
    assert_moved(run)
    assert_run_close(run, **TOL[dtype])
    for state in run.states_a():
        if state:
            step = state["step"]
            assert step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu"
    # the state tensors keep the param's dtype
    for p, state in zip(run.params_a, run.states_a()):
        assert all(v.dtype == p.dtype for k, v in state.items() if k != "step")


def test_radam_threshold_changes_the_branch():
    """Guards the threshold-4 case: at t = 5 (ρ_5 ~ 4.996) it rectifies, torch's 5 does not."""
    results = []
    for threshold in (4.0, 5.0):
        run = run_pair(
            lambda g: af.RAdam(g, lr=1e-2, rectify_threshold=threshold, backend="cpu"),
            lambda g: af.RAdam(g, lr=1e-2, rectify_threshold=threshold, backend="reference"),
            steps=5, none_grads={},
        )
        assert_run_close(run, **TOL[torch.float64])
        results.append(run.params_a[3].detach())
    assert not torch.allclose(results[0], results[1])


# ---------------------------------------------------------------------------
# cpu against torch.optim directly
# ---------------------------------------------------------------------------

_TORCH_PAIRS = {
    "adamw": (lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
              lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad": (lambda g: af.AdamW(g, lr=1e-2, amsgrad=True, backend="cpu"),
                      lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True)),
    "adam-l2": (lambda g: af.Adam(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
                lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1)),
    "adam-l2-amsgrad": (lambda g: af.Adam(g, lr=1e-2, weight_decay=0.1, amsgrad=True, backend="cpu"),
                        lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "radam": (lambda g: af.RAdam(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
              lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=0.1)),
    "radam-decoupled": (
        lambda g: af.RAdam(g, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, backend="cpu"),
        lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(_TORCH_PAIRS))
def test_cpu_matches_torch_optim(name, dtype, capabilities):
    run = run_pair(*_TORCH_PAIRS[name], dtype=dtype, steps=STEPS)
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


# ---------------------------------------------------------------------------
# big buckets: the multi-threaded split across tensors
# ---------------------------------------------------------------------------

# Sizes around and above the parallel grain (32768 elements), tensors that
# straddle a thread boundary, plus many small tensors.
BIG_SHAPES = (
    [(100_003,), (7,), (33, 1001), (0,), (), (32_768,), (65_537,), (3, 1, 7)]
    + [(n,) for n in range(1, 41)]
    + [(32_769,)]
)


def _big_run(name, backend_a, backend_b, dtype, steps=4, **kw):
    return run_pair(_factory(name, backend_a), _factory(name, backend_b), dtype=dtype,
                    steps=steps, shapes=BIG_SHAPES, split=20, none_grads={1: (0, 9)}, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "adam-l2-ams0", "radam-threshold4", "lion-wd"])
def test_big_bucket_matches_reference(name, dtype, capabilities):
    assert torch.get_num_threads() >= 1
    run = _big_run(name, "cpu", "reference", dtype)
    assert_moved(run)
    assert_run_close(run, **TOL[dtype])


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
@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "radam-l2", "lion"])
def test_deterministic(name, dtype, capabilities):
    """Two identical runs are bitwise equal."""
    first = _big_run(name, "cpu", "cpu", dtype, steps=3)
    second = _big_run(name, "cpu", "cpu", dtype, steps=3)
    for a, b in zip(first.params_a + first.params_b, second.params_a + second.params_b):
        assert torch.equal(a, b)
    for sa, sb in zip(first.states_a() + first.states_b(), second.states_a() + second.states_b()):
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------
# mixed dtypes in one group
# ---------------------------------------------------------------------------

def _mixed_params():
    base = make_params(torch.float64, seed=3)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    return [p.detach().to(dt).requires_grad_(True) for p, dt in zip(base, dtypes)]


@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "adam-l2-ams1", "radam-decoupled", "lion-wd"])
def test_mixed_dtypes_in_one_group(name, capabilities):
    params = _mixed_params()
    run = run_pair(_factory(name, "cpu"), _factory(name, "reference"), params=params, steps=STEPS,
                   split=len(params))  # one group: float32, float64 and bfloat16 buckets
    assert len(run.opt_a.param_groups) == 1
    assert_moved(run)
    for p, q, sa, sb in zip(run.params_a, run.params_b, run.states_a(), run.states_b()):
        assert p.dtype == q.dtype
        tol = TOL[p.dtype]
        torch.testing.assert_close(p, q, **tol)
        assert set(sa) == set(sb)
        for key in sa:
            if key != "step":
                assert sa[key].dtype == p.dtype
                torch.testing.assert_close(sa[key], sb[key], **tol)


def test_mixed_dtypes_in_one_group_matches_torch():
    params = [p for p in _mixed_params() if p.dtype != torch.bfloat16]
    run = run_pair(
        lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
        lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
        params=params, steps=STEPS, split=len(params), none_grads={3: (1,)},
    )
    assert_moved(run)
    assert_run_close(run)


# ---------------------------------------------------------------------------
# the cached bucket plan follows changes of the group
# ---------------------------------------------------------------------------

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
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(twin, grads)
        ours.step()
        theirs.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b)
    for sa, sb in zip(states_of(ours, params), states_of(theirs, twin)):
        assert set(sa) == set(sb)
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key])
    assert len(SHAPES) == len(params)
