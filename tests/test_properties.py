"""Property-based tests (hypothesis) of every amos_fused optimizer.

Each test draws a whole scenario — the algorithm and its hyper-parameters, a
param set (0-dim, 0-element shapes of any rank, odd sizes around the SIMD width,
sizes around the CPU parallel grain), its split into 1–3 param groups and their
order, which grads are None on which step, the storage dtype, torch's thread
count — and checks a promise of the README on it:

* every fused backend equals ``backend='reference'`` run on identical clones;
* the reference Adam / AdamW / RAdam equal torch.optim's in float64;
* the cpu backend is BITWISE independent of the thread count, of the split of
  the params into groups (same hyper-parameters in each) and of their order;
* a step that raises changes nothing (params and every state tensor, ``step``
  included, bitwise);
* complex params step like torch.optim (AdamW / Adam / RAdam / Lion) and are
  refused at construction by Amos / ScaledAdamW / Lamb;
* non-finite grads: every backend makes the same elements non-finite as the
  reference, and agrees with it elsewhere.

Tolerances are those of the existing tests (see their docstrings for the
arguments): the Adam family and Lion as tests/test_cpu_kernels.py
(float64 rtol=1e-12/atol=1e-14, float32 assert_close defaults, bfloat16
rtol=2e-2/atol=1e-2); Amos as tests/test_amos_cpu.py and ScaledAdamW / Lamb as
tests/test_norm_scaled.py, both with the absolute floor scaled by the
reference tensor's max (float64 1e-10/1e-12; float32 1e-5/1e-6 for Amos,
1.3e-6/1e-5 for ScaledAdamW / Lamb; bfloat16 2e-2/1e-2).

Examples are derandomized (reproducible in CI) and their number is bounded so
that the whole module runs in well under a minute on two cores when every
property holds (shrinking a failure to a minimal example takes longer); the
Triton interpreter (~1 ms per program) gets only a few small examples.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import amos_fused as af  # noqa: E402
from conftest import num_threads  # noqa: E402

FUSED_BACKENDS = [b for b in af.available_backends() if b != "reference"]
GPU = torch.cuda.is_available()
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if GPU else "cpu", "reference": "cpu"}
INTERPRETED = {"triton"} if not GPU else set()  # backends that are slow here: few, tiny examples

DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def prop_settings(max_examples: int, shrink: bool = True):
    """Reproducible, bounded settings.  ``shrink=False`` for the backends run in an
    interpreter here: shrinking a failure there takes minutes; the cpu twin of the
    test shrinks the same property."""
    phases = [p for p in Phase if shrink or p is not Phase.shrink]
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None, phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.large_base_example],
    )


# ---------------------------------------------------------------------------
# The algorithms: constructor, hyper-parameters (whole optimizer and per group)
# ---------------------------------------------------------------------------

LR = st.one_of(st.sampled_from([0.0, 1e-3, 1e-2, 0.1]), st.floats(1e-4, 0.2))
BETA = st.sampled_from([0.0, 0.3, 0.45, 0.9, 0.99])
BETA2 = st.sampled_from([0.0, 0.3, 0.45, 0.9, 0.99, 0.999])
WD = st.sampled_from([0.0, 0.01, 0.1, 0.5])
BETAS = st.tuples(BETA, BETA2)


def _adam_hyper():
    return st.fixed_dictionaries(dict(
        lr=LR, betas=BETAS, eps=st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]), weight_decay=WD,
        amsgrad=st.booleans(), bias_correction=st.booleans()))


def _radam_hyper():
    # thresholds below 4 are refused by nothing but make r_t the sqrt of a negative
    # number (see the report); 4 and up are meaningful.
    return st.fixed_dictionaries(dict(
        lr=LR, betas=st.tuples(BETA, st.sampled_from([0.0, 0.3, 0.9, 0.99, 0.999])),
        eps=st.sampled_from([0.0, 1e-8, 1e-6]), weight_decay=WD,
        decoupled_weight_decay=st.booleans(), rectify_threshold=st.sampled_from([4.0, 4.5, 5.0, 6.0])))


def _lion_hyper():
    return st.fixed_dictionaries(dict(lr=LR, betas=st.tuples(BETA, BETA), weight_decay=WD))


AMOS_REDUCE = {None: 0, "all": 0, (-1,): 1, (0,): 1, (1,): 2}  # reduce_axes -> min rank


def _amos_hyper():
    return st.fixed_dictionaries(dict(
        lr=st.sampled_from([0.0, 0.01, 0.1, 0.3]),
        eta=st.sampled_from([None, 0.1, 0.5, 2.0]),
        reduce_axes=st.sampled_from(list(AMOS_REDUCE)),
        beta=st.sampled_from([0.0, 0.3, 0.9, 0.999]),
        momentum=st.sampled_from([None, 0.0, 0.5, 0.9]),
        clip_value=st.sampled_from([None, 0.1, 0.5, 2.0]),
        extra_l2=st.sampled_from([0.0, 0.01]),
        d_coef=st.sampled_from([0.25, 0.0, 0.5]),
        c_coef=st.sampled_from([0.25, 0.0, 0.5]),
    ))


def _scaled_hyper():
    schedule = st.sampled_from([{}, {"p": 0.5}, {"p": 3.0}, {"half_life": 3}, {"half_life": 1000}])
    base = st.fixed_dictionaries(dict(
        lr=st.sampled_from([1e-3, 1e-2, 0.1]), betas=BETAS, eps=st.sampled_from([1e-8, 1e-6]),
        decay=st.sampled_from(["inverse_square", "inverse_time"]), q=st.sampled_from([0.5, 1.0, 2.0]),
        sigma=st.sampled_from([None, 0.1, 1.0])))
    return st.tuples(base, schedule).map(lambda t: {**t[0], **t[1]})


def _lamb_hyper():
    return st.fixed_dictionaries(dict(
        lr=LR, betas=BETAS, eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=WD,
        bias_correction=st.booleans()))


def _overrides(**keys):
    return st.fixed_dictionaries({}, optional=keys)


@dataclass(frozen=True)
class Algo:
    cls: type
    hyper: Callable[[], st.SearchStrategy]   # optimizer-wide hyper-parameters
    group: st.SearchStrategy                 # per-group overrides
    family: str                              # tolerance family
    torch_cls: Optional[type] = None         # the torch.optim twin, if any

    def min_rank(self, hyper: dict) -> int:
        return AMOS_REDUCE[hyper["reduce_axes"]] if self.cls is af.Amos else 0


ALGOS: Dict[str, Algo] = {
    "AdamW": Algo(af.AdamW, _adam_hyper, _overrides(lr=LR, weight_decay=WD), "elementwise", torch.optim.AdamW),
    "Adam": Algo(af.Adam, _adam_hyper, _overrides(lr=LR, weight_decay=WD), "elementwise", torch.optim.Adam),
    "RAdam": Algo(af.RAdam, _radam_hyper, _overrides(lr=LR, weight_decay=WD), "elementwise", torch.optim.RAdam),
    "Lion": Algo(af.Lion, _lion_hyper, _overrides(lr=LR, weight_decay=WD), "elementwise"),
    "Amos": Algo(af.Amos, _amos_hyper, _overrides(lr=st.sampled_from([0.01, 0.2]),
                                                  eta=st.sampled_from([0.25, 1.0])), "amos"),
    "ScaledAdamW": Algo(af.ScaledAdamW, _scaled_hyper, _overrides(lr=st.sampled_from([3e-3, 0.05])), "norm"),
    "Lamb": Algo(af.Lamb, _lamb_hyper, _overrides(lr=LR, weight_decay=WD), "norm"),
}
ALGO_NAMES = sorted(ALGOS)

# family -> dtype -> (rtol, atol, atol scaled by the reference tensor's max)
TOL = {
    "elementwise": {torch.float64: (1e-12, 1e-14, False), torch.float32: (None, None, False),
                    torch.bfloat16: (2e-2, 1e-2, False)},
    "amos": {torch.float64: (1e-10, 1e-12, True), torch.float32: (1e-5, 1e-6, True),
             torch.bfloat16: (2e-2, 1e-2, True)},
    "norm": {torch.float64: (1e-10, 1e-12, True), torch.float32: (1.3e-6, 1e-5, True),
             torch.bfloat16: (2e-2, 1e-2, True)},
}


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

SIMD_SIZES = (15, 16, 17, 31, 32, 33)
EMPTY_SHAPES = ((0,), (4, 0), (0, 0), (0, 5), (2, 0, 3), (0, 3, 1), (3, 2, 0))
# around the CPU parallel grain (32768 elements), in several ranks
GRAIN_SHAPES = ((32767,), (32768,), (32769,), (3, 10923), (128, 256), (7, 4681), (2, 128, 128), (1, 3, 10923))


def shapes(min_rank: int = 0) -> st.SearchStrategy:
    size = st.one_of(st.integers(1, 40), st.sampled_from(SIMD_SIZES))
    options = [st.sampled_from([s for s in EMPTY_SHAPES if len(s) >= max(min_rank, 1)])]
    if min_rank == 0:
        options.append(st.just(()))
    if min_rank <= 1:
        options.append(st.tuples(size))
    options.append(st.tuples(st.integers(1, 5), size))
    options.append(st.tuples(st.integers(1, 3), st.integers(1, 4), size))
    return st.one_of(*options)


@dataclass
class Case:
    """One drawn scenario (hypothesis prints it for a falsifying example)."""

    algo: str
    hyper: dict
    dtype: torch.dtype
    shapes: List[tuple]
    groups: List[List[int]]          # indices into shapes, per param group, in group order
    overrides: List[dict]            # per param group
    none: List[frozenset]            # per step: params whose grad is None
    seed: int
    grad_scale: float
    threads: int

    @property
    def steps(self) -> int:
        return len(self.none)

    @property
    def spec(self) -> Algo:
        return ALGOS[self.algo]


def _split(order: List[int], cuts: List[int]) -> List[List[int]]:
    bounds = [0, *cuts, len(order)]
    return [list(order[a:b]) for a, b in zip(bounds, bounds[1:])]


@st.composite
def cases(draw, algos=ALGO_NAMES, dtypes=DTYPES, max_params=6, steps=(3, 5), grain=False,
          overrides=True, threads=(1, 2, 3)):
    algo = draw(st.sampled_from(algos))
    spec = ALGOS[algo]
    hyper = draw(spec.hyper())
    min_rank = spec.min_rank(hyper)
    n = draw(st.integers(1, max_params))
    shape_list = draw(st.lists(shapes(min_rank), min_size=n, max_size=n))
    if grain:
        where = draw(st.integers(0, n - 1))
        shape_list[where] = draw(st.sampled_from([s for s in GRAIN_SHAPES if len(s) >= max(min_rank, 1)]))
    order = draw(st.permutations(range(n)))
    k = draw(st.integers(1, min(3, n)))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    groups = _split(order, cuts)
    group_overrides = [draw(spec.group) if overrides else {} for _ in groups]
    count = draw(st.integers(*steps))
    none = [draw(st.frozensets(st.integers(0, n - 1), max_size=min(2, n))) for _ in range(count)]
    return Case(algo=algo, hyper=hyper, dtype=draw(st.sampled_from(dtypes)), shapes=shape_list,
                groups=groups, overrides=group_overrides, none=none,
                seed=draw(st.integers(0, 2**16)), grad_scale=draw(st.sampled_from([1.0, 0.01, 10.0])),
                threads=draw(st.sampled_from(threads)))


# ---------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------

def initial_params(case: Case, device="cpu") -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(case.dtype).to(device).requires_grad_(True)
            for s in case.shapes]


def step_grads(case: Case, step: int, device="cpu") -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(7919 * (case.seed + 1) + step)
    return [(case.grad_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(case.dtype).to(device)
            for s in case.shapes]


Inject = Callable[[int, List[torch.Tensor]], None]


@dataclass
class Result:
    params: List[torch.Tensor]
    opt: torch.optim.Optimizer
    states: List[dict] = field(default_factory=list)
    ties: Optional[List[torch.Tensor]] = None  # Lion: elements whose sign(c) was a rounding tie


def lion_ties(case: Case, opt, params, ties: List[torch.Tensor]) -> None:
    """Marks the elements where Lion's c = β1·m + (1−β1)·g is zero up to float32
    rounding this step: sign(c) is then 0 or ±1 depending on the order of
    operations (bf16 values make exact cancellations likely), and the param may
    differ by lr between two correct implementations."""
    beta1 = float(case.hyper["betas"][0])
    for p, tie in zip(params, ties):
        if p.grad is None:
            continue
        g = p.grad.detach().double().cpu()
        m = opt.state[p]["exp_avg"].detach().double().cpu() if p in opt.state else torch.zeros_like(g)
        a, b = beta1 * m, (1 - beta1) * g
        tie |= ((a + b).abs() <= 2.0**-20 * (a.abs() + b.abs())) & ((a != 0) | (b != 0))


def build(case: Case, backend: str, params: List[torch.Tensor], groups=None, overrides=None, cls=None):
    groups = case.groups if groups is None else groups
    overrides = case.overrides if overrides is None else overrides
    group_list = [{"params": [params[i] for i in idx], **ov} for idx, ov in zip(groups, overrides)]
    cls = case.spec.cls if cls is None else cls
    kwargs = dict(case.hyper)
    if cls is not case.spec.cls:  # torch.optim twin: no backend, no bias_correction / threshold
        kwargs.pop("bias_correction", None)
        kwargs.pop("rectify_threshold", None)
        return cls(group_list, **kwargs)
    return cls(group_list, backend=backend, **kwargs)


def run(case: Case, backend: str, *, groups=None, overrides=None, threads=None, cls=None,
        inject: Optional[Inject] = None) -> Result:
    """Steps a fresh copy of the case's params ``case.steps`` times on ``backend``
    (``cls``: a torch.optim class instead of the case's own)."""
    device = DEVICE[backend]
    params = initial_params(case, device)
    opt = build(case, backend, params, groups, overrides, cls)
    threads = (1 if backend == "reference" or cls is not None else case.threads) if threads is None else threads
    ties = [torch.zeros(p.shape, dtype=torch.bool) for p in params] if case.algo == "Lion" else None
    for step in range(case.steps):
        grads = step_grads(case, step, device)
        if inject is not None:
            inject(step, grads)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in case.none[step] else g
        if ties is not None and backend == "reference":
            lion_ties(case, opt, params, ties)
        with num_threads(threads):
            opt.step()
    return Result(params, opt, [dict(opt.state[p]) if p in opt.state else {} for p in params], ties)


def describe(case: Case, i: int) -> str:
    group = next(k for k, idx in enumerate(case.groups) if i in idx)
    return f"param {i} (shape {case.shapes[i]}, group {group}, {case.dtype})"


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------

def assert_close(actual: torch.Tensor, expected: torch.Tensor, family: str, dtype, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol, scaled = TOL[family][dtype]
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if scaled:
        if e.numel() == 0:
            return
        finite = e[torch.isfinite(e)]
        scale = float(finite.double().abs().max()) if finite.numel() else 0.0
        a, e, atol = a.double(), e.double(), atol * max(scale, 1e-30)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_results_close(actual: Result, expected: Result, case: Case, label: str, family=None) -> None:
    family = case.spec.family if family is None else family
    for i, (pa, pb, sa, sb) in enumerate(zip(actual.params, expected.params, actual.states, expected.states)):
        where = f"{label}: {describe(case, i)}"
        if expected.ties is not None and bool(expected.ties[i].any()):
            keep = ~expected.ties[i].to(pb.device)
            note(f"{where}: {int((~keep).sum())} Lion sign tie(s) left out")
            pa, pb = pa.detach()[keep], pb.detach()[keep]
        assert_close(pa, pb, family, case.dtype, where)
        assert set(sa) == set(sb), f"{where}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sorted(sa):
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"{where}: step {float(sa[key])} != {float(sb[key])}"
            else:
                assert_close(sa[key], sb[key], family, case.dtype, f"{where} state {key!r}")


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads aside: NaN equals NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    neq = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    idx = neq.nonzero()
    first = tuple(idx[0].tolist()) if len(idx) else ()
    return (f"{int(neq.sum())} of {a.numel()} elements differ, max |diff| "
            f"{float((a.double() - b.double())[neq].abs().max()) if len(idx) else 0:.3g}, first at {first}: "
            f"{float(a[first]) if len(idx) else ''!r} vs {float(b[first]) if len(idx) else ''!r}")


def assert_results_bitwise(actual: Result, expected: Result, case: Case, label: str) -> None:
    """Bitwise equality of params and states, param by param (``run`` keeps
    params[i] for shape i whatever the groups and their order)."""
    bad = []
    for i in range(len(expected.params)):
        pa, pb = actual.params[i].detach(), expected.params[i].detach()
        if not bitwise_equal(pa, pb):
            bad.append(f"{describe(case, i)}: {_diff(pa, pb)}")
        sa, sb = actual.states[i], expected.states[i]
        if set(sa) != set(sb):
            bad.append(f"{describe(case, i)}: state keys {sorted(sa)} != {sorted(sb)}")
            continue
        for key in sorted(sa):
            if not bitwise_equal(sa[key], sb[key]):
                bad.append(f"{describe(case, i)} state {key!r}: {_diff(sa[key], sb[key])}")
    assert not bad, f"{label}: not bitwise identical:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------
# 1. every fused backend == the reference
# ---------------------------------------------------------------------------

def _per_backend(name: str, budgets: Dict[str, int], make_test: Callable[[str], Callable]):
    """Module-level tests ``test_<backend>_<name>`` for the fused backends, each
    with its own example budget; skipped where the backend cannot run."""
    tests = {}
    for backend, budget in budgets.items():
        test = make_test(backend, budget)
        test = pytest.mark.skipif(backend not in FUSED_BACKENDS,
                                  reason=f"backend {backend!r} is not available here")(test)
        test.__name__ = test.__qualname__ = f"test_{backend}_{name}"
        tests[test.__name__] = test
    globals().update(tests)


def check_matches_reference(case: Case, backend: str) -> None:
    note(f"backend={backend}")
    expected = run(case, "reference")
    actual = run(case, backend)
    assert_results_close(actual, expected, case, f"{case.algo} {backend} vs reference")


def _matches_reference_test(backend: str, budget: int):
    small = backend in INTERPRETED

    @prop_settings(budget, shrink=backend not in INTERPRETED)
    @given(case=cases(max_params=3 if small else 6, steps=(3, 3) if small else (3, 5)))
    def test(case):
        check_matches_reference(case, backend)
    return test


_per_backend("matches_reference", {"cpu": 90, "triton": 10, "cuda": 60}, _matches_reference_test)


@prop_settings(8)
@given(case=cases(grain=True, max_params=3, steps=(3, 3), threads=(2, 3)))
def test_cpu_matches_reference_around_parallel_grain(case):
    """Buckets of about one parallel grain (32768 elements): split over threads."""
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("no cpu backend")
    check_matches_reference(case, "cpu")


# ---------------------------------------------------------------------------
# 2. the reference == torch.optim (float64)
# ---------------------------------------------------------------------------

def torch_compatible(case: Case) -> Case:
    """The case with the settings torch.optim has: bias correction, RAdam's threshold 5."""
    hyper = dict(case.hyper)
    for key, value in (("bias_correction", True), ("rectify_threshold", 5.0)):
        if key in hyper:
            hyper[key] = value
    return dataclasses.replace(case, hyper=hyper)


@prop_settings(40)
@given(case=cases(algos=["Adam", "AdamW", "RAdam"], dtypes=(torch.float64,)))
def test_reference_matches_torch_optim(case):
    case = torch_compatible(case)
    expected = run(case, "reference", cls=case.spec.torch_cls)
    actual = run(case, "reference")
    assert_results_close(actual, expected, case, f"reference {case.algo} vs torch.optim.{case.algo}")


# ---------------------------------------------------------------------------
# 3. bitwise invariances of the cpu backend
# ---------------------------------------------------------------------------

def _require_cpu():
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("no cpu backend")


@prop_settings(12)
@given(case=cases(grain=True, max_params=4, steps=(3, 3), overrides=False))
def test_cpu_bitwise_independent_of_thread_count(case):
    """One bucket above the parallel grain, stepped with 1, 2 and 3 threads."""
    _require_cpu()
    one = run(case, "cpu", threads=1)
    for threads in (2, 3):
        assert_results_bitwise(run(case, "cpu", threads=threads), one, case,
                               f"{case.algo} cpu: {threads} threads vs 1 thread")


# Small param sets, and a few with a bucket above the parallel grain (where a
# thread's share starts inside a tensor, at an offset that the split moves).
INVARIANCE_CASES = st.one_of(cases(overrides=False),
                             cases(overrides=False, grain=True, max_params=4, steps=(3, 3)))


@prop_settings(30)
@given(case=INVARIANCE_CASES, data=st.data())
def test_cpu_bitwise_independent_of_group_split(case, data):
    """The params of one group, in the same order, split into 2–3 groups with the
    same hyper-parameters."""
    _require_cpu()
    order = [i for idx in case.groups for i in idx]
    n = len(order)
    if n < 2:
        return
    k = data.draw(st.integers(2, min(3, n)), label="groups")
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1), label="cuts"))
    split = _split(order, cuts)
    whole = run(case, "cpu", groups=[order], overrides=[{}])
    parts = run(case, "cpu", groups=split, overrides=[{}] * len(split))
    assert_results_bitwise(parts, whole, case, f"{case.algo} cpu: groups {split} vs one group {order}")


@prop_settings(30)
@given(case=INVARIANCE_CASES, data=st.data())
def test_cpu_bitwise_independent_of_param_order(case, data):
    """The params of one group, in another order."""
    _require_cpu()
    n = len(case.shapes)
    if n < 2:
        return
    order = data.draw(st.permutations(range(n)).filter(lambda o: list(o) != list(range(n))), label="order")
    straight = run(case, "cpu", groups=[list(range(n))], overrides=[{}])
    permuted = run(case, "cpu", groups=[list(order)], overrides=[{}])
    assert_results_bitwise(permuted, straight, case, f"{case.algo} cpu: order {list(order)} vs {list(range(n))}")


# ---------------------------------------------------------------------------
# 4. a step that raises changes nothing
# ---------------------------------------------------------------------------

BAD_KINDS = ("grad_dtype", "grad_shape", "sparse_grad", "int64_param", "complex64_param")
REFUSES_COMPLEX = ("Amos", "ScaledAdamW", "Lamb")  # AdamW / Adam / RAdam / Lion step complex params


@st.composite
def bad_cases(draw):
    case = draw(cases(steps=(1, 3), max_params=5))
    kinds = [k for k in BAD_KINDS if k != "complex64_param" or case.algo in REFUSES_COMPLEX]
    kind = draw(st.sampled_from(kinds))
    group = draw(st.integers(0, len(case.groups) - 1))
    position = draw(st.integers(0, len(case.groups[group]) - (0 if kind.endswith("_param") else 1)))
    backend = draw(st.sampled_from(["reference", "cpu"]))
    return case, kind, group, position, backend


def _bad_grad(kind: str, p: torch.Tensor, g: torch.Tensor) -> None:
    if kind == "grad_dtype":
        other = next(d for d in (torch.float32, torch.float64) if d != p.dtype)
        p.grad.data = g.to(other)  # the .grad setter refuses this; .data does not
    elif kind == "grad_shape":
        p.grad.data = torch.zeros(tuple(p.shape) + (1,) if p.dim() else (2,), dtype=p.dtype)
    elif kind == "sparse_grad":
        p.grad = g.to_sparse()
    else:  # pragma: no cover
        raise AssertionError(kind)


def _bits_unchanged(before, after, where: str) -> None:
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and bitwise_equal(after, before), \
            f"{where} was written: {_diff(after, before) if isinstance(after, torch.Tensor) else after!r}"
    elif isinstance(before, dict):
        assert isinstance(after, dict) and set(after) == set(before), \
            f"{where}: keys {sorted(map(str, after))} != {sorted(map(str, before))}"
        for key in before:
            _bits_unchanged(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(after) == len(before), f"{where}: length {len(after)} != {len(before)}"
        for i, (b, a) in enumerate(zip(before, after)):
            _bits_unchanged(b, a, f"{where}[{i}]")
    else:
        assert after == before, f"{where}: {after!r} != {before!r}"


@prop_settings(60)
@given(bad=bad_cases())
def test_failed_step_changes_nothing(bad):
    case, kind, group, position, backend = bad
    note(f"kind={kind} group={group} position={position} backend={backend}")
    params = initial_params(case)
    groups = [list(idx) for idx in case.groups]
    extra = None
    if kind.endswith("_param"):
        dtype = torch.int64 if kind == "int64_param" else torch.complex64
        extra = (torch.arange(6, dtype=torch.int64) - 2).reshape(2, 3).to(dtype)
        if dtype.is_complex:
            extra.requires_grad_(True)
        params.append(extra)
        groups[group].insert(position, len(params) - 1)
    try:
        opt = build(case, backend, params, groups)
    except (TypeError, ValueError) as error:
        # Refusing the bad param at construction is fine (planned for complex params
        # of Amos / ScaledAdamW / Lamb) as long as the message says what is wrong.
        assert extra is not None, f"a valid param set was refused: {error}"
        assert ("complex" if extra.dtype.is_complex else "int") in str(error).lower(), str(error)
        return

    for step in range(case.steps):  # warm steps: state exists, the extra param has no grad
        for i, (p, g) in enumerate(zip(params, step_grads(case, step))):
            p.grad = None if i in case.none[step] else g
        opt.step()

    target = groups[group][position] if extra is None else len(params) - 1
    for i, (p, g) in enumerate(zip(params, step_grads(case, case.steps))):
        p.grad = g
    if extra is None:
        _bad_grad(kind, params[target], step_grads(case, case.steps)[target])
    else:
        extra.grad = torch.ones_like(extra)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    with pytest.raises(Exception) as info:
        opt.step()
    note(f"raised {type(info.value).__name__}: {info.value}")
    for i, (old, p) in enumerate(zip(before_params, params)):
        where = f"param {i} ({p.dtype}, shape {tuple(p.shape)})" + (" [the bad one]" if i == target else "")
        assert bitwise_equal(p.detach(), old), \
            f"{case.algo} {backend}, {kind}: step raised {type(info.value).__name__} but {where} was written"
    _bits_unchanged(before_state, opt.state_dict(), f"{case.algo} {backend}, {kind}: state_dict()")


# ---------------------------------------------------------------------------
# 5. complex params
# ---------------------------------------------------------------------------

def _complex_test(backend: str, budget: int):
    @prop_settings(budget, shrink=backend not in INTERPRETED)
    @given(case=cases(algos=["AdamW", "Adam", "RAdam", "Lion"], dtypes=(torch.float32,),
                      max_params=3 if backend in INTERPRETED else 5, steps=(3, 3), overrides=True))
    def test(case):
        """Complex params step like torch.optim: as their view_as_real."""
        case = torch_compatible(case)
        device = DEVICE[backend]
        gen = torch.Generator().manual_seed(case.seed)
        base = [torch.randn(s, generator=gen, dtype=torch.complex64) for s in case.shapes]
        grads = [[torch.randn(s, generator=gen, dtype=torch.complex64) * case.grad_scale for s in case.shapes]
                 for _ in range(case.steps)]

        def stepped(make, as_real):
            params = [(torch.view_as_real(b).clone() if as_real else b.clone()).to(device).requires_grad_(True)
                      for b in base]
            opt = make([{"params": [params[i] for i in idx], **ov}
                        for idx, ov in zip(case.groups, case.overrides)])
            for step, gs in enumerate(grads):
                for i, (p, g) in enumerate(zip(params, gs)):
                    g = (torch.view_as_real(g) if as_real else g).clone().to(device)
                    p.grad = None if i in case.none[step] else g
                with num_threads(case.threads):
                    opt.step()
            return [p.detach().cpu() for p in params], [opt.state.get(p, {}) for p in params]

        kwargs = dict(case.hyper)
        ours, our_state = stepped(lambda g: case.spec.cls(g, backend=backend, **kwargs), False)
        real, _ = stepped(lambda g: case.spec.cls(g, backend=backend, **kwargs), True)
        for i, (a, r) in enumerate(zip(ours, real)):
            assert a.dtype == torch.complex64, f"{describe(case, i)}: became {a.dtype}"
            torch.testing.assert_close(torch.view_as_real(a), r, msg=lambda m, i=i: (
                f"{case.algo} {backend}: complex {describe(case, i)} vs stepping its view_as_real: {m}"))
        for i, st_ in enumerate(our_state):
            for key, value in st_.items():
                if key != "step":
                    assert value.dtype == torch.complex64, f"{describe(case, i)} state {key!r}: {value.dtype}"
        if case.spec.torch_cls is not None:
            kwargs.pop("bias_correction", None)
            kwargs.pop("rectify_threshold", None)
            # torch.optim.Adam adds its L2 decay λθ to the complex grad, rounding λθ first, where ours
            # is one fused multiply-add on the real view (README: m and v may differ in the last bit,
            # which a step with eps = 0 and tiny v amplifies): Adam is held to torch's real-view step
            as_real = case.algo == "Adam"
            theirs, _ = stepped(lambda g: case.spec.torch_cls(g, **kwargs), as_real)
            for i, (a, t) in enumerate(zip(ours, theirs)):
                torch.testing.assert_close(torch.view_as_real(a) if as_real else a, t, msg=lambda m, i=i: (
                    f"{case.algo} {backend} vs torch.optim.{case.algo}: complex {describe(case, i)}: {m}"))
    return test


_per_backend("complex_params_step_like_torch", {"cpu": 25, "triton": 4, "cuda": 20}, _complex_test)
test_reference_complex_params_step_like_torch = _complex_test("reference", 25)
test_reference_complex_params_step_like_torch.__name__ = "test_reference_complex_params_step_like_torch"


@pytest.mark.parametrize("name", REFUSES_COMPLEX)
def test_complex_params_refused_at_construction(name):
    params = [torch.zeros(3, dtype=torch.float32, requires_grad=True),
              torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)]
    kwargs = {"lr": 0.01} if name == "Amos" else {}
    with pytest.raises((TypeError, ValueError), match="(?i)complex"):
        ALGOS[name].cls(params, **kwargs)


# ---------------------------------------------------------------------------
# 6. non-finite grads
# ---------------------------------------------------------------------------

@st.composite
def non_finite_cases(draw, small=False):
    case = draw(cases(max_params=2 if small else 5, steps=(3, 3) if small else (3, 4)))
    sized = [i for i, s in enumerate(case.shapes) if math.prod(s) > 0]
    if not sized:
        return case, []
    spots = draw(st.lists(st.tuples(st.integers(0, case.steps - 1), st.sampled_from(sized),
                                    st.floats(0, 1, exclude_max=True),
                                    st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=4))
    return case, spots


def _non_finite_test(backend: str, budget: int):
    small = backend in INTERPRETED

    @prop_settings(budget, shrink=backend not in INTERPRETED)
    @given(drawn=non_finite_cases(small=small))
    def test(drawn):
        case, spots = drawn

        def inject(step, grads):
            for s, i, where, value in spots:
                if s == step:
                    grads[i].view(-1)[int(where * grads[i].numel())] = value

        expected = run(case, "reference", inject=inject)
        actual = run(case, backend, inject=inject)
        for i, (pa, pb, sa, sb) in enumerate(zip(actual.params, expected.params, actual.states, expected.states)):
            label = f"{case.algo} {backend} vs reference, non-finite grads {spots}: {describe(case, i)}"
            assert set(sa) == set(sb), f"{label}: state keys {sorted(sa)} != {sorted(sb)}"
            for what, a, b in [("param", pa, pb)] + [(f"state {k!r}", sa[k], sb.get(k)) for k in sorted(sa)
                                                      if k != "step"]:
                assert b is not None, f"{label}: {what} missing in the reference"
                a, b = a.detach().cpu(), b.detach().cpu()
                for mask in (torch.isnan, torch.isposinf, torch.isneginf):
                    ma, mb = mask(a), mask(b)
                    assert torch.equal(ma, mb), (
                        f"{label} {what}: {mask.__name__} differs at {int((ma != mb).sum())} elements "
                        f"(backend {int(ma.sum())}, reference {int(mb.sum())}), first at "
                        f"{tuple((ma != mb).nonzero()[0].tolist())}")
                finite = torch.isfinite(b)
                if what == "param" and expected.ties is not None:
                    finite &= ~expected.ties[i]  # see lion_ties
                assert_close(a[finite], b[finite], case.spec.family, case.dtype, f"{label} {what} (finite part)")
    return test


_per_backend("non_finite_grads_like_reference", {"cpu": 40, "triton": 4, "cuda": 30}, _non_finite_test)
