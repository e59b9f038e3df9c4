"""The one table the tests draw their optimizers from.

* ``CASES``: name -> ``Case``: the optimizer class, its constructor kwargs and,
  where one exists, the torch.optim class that takes the same kwargs.  Amos slot
  layouts and configurations are in ``AMOS_REDUCE_AXES`` / ``AMOS_CONFIGS`` and
  built with ``amos_case``.
* ``BACKENDS``: every backend the package has, with the device its tensors live
  on and the ``pytest.param`` marks that skip it where ``af.available_backends()``
  lacks it (``backends(...)`` parametrizes a test over some of them).
* ``TOL`` / ``tolerance``: the tolerances per backend, algorithm family and dtype
  (the arguments for each value are in the docstrings of test_cpu.py,
  test_triton.py and test_cuda.py), and ``assert_runs_close``, which applies them
  to two optimizers run side by side by conftest.run_pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import pytest
import torch

import amos_fused as af
from conftest import PairRun, states_of, with_threads

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}


def dtype_id(dtype) -> str:
    return DTYPE_IDS[dtype]


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------

AVAILABLE = af.available_backends()
FUSED = ("cpu", "cuda", "triton")
BACKEND_DEVICE = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def why_unavailable(backend: str) -> Optional[str]:
    if backend in AVAILABLE:
        return None
    if backend in ("cuda", "triton") and not torch.cuda.is_available():
        return f"backend {backend!r} needs a CUDA device (torch.cuda.is_available() is False)"
    return f"backend {backend!r} is not in af.available_backends() = {AVAILABLE}"


def backends(*names: str) -> list:
    """``pytest.param`` per backend (all of them by default), skipped cleanly where
    ``af.available_backends()`` lacks it; GPU backends carry the ``gpu`` mark."""
    out = []
    for name in names or ("reference",) + FUSED:
        marks = [pytest.mark.skipif(why_unavailable(name) is not None, reason=why_unavailable(name) or name)]
        if BACKEND_DEVICE[name] == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# ---------------------------------------------------------------------------
# Algorithm cases
# ---------------------------------------------------------------------------

# The tolerance family of an algorithm (``Optimizer.algorithm``): every other one
# is elementwise.
FAMILY = {"amos": "amos", "scaled_adam": "norm", "lamb": "norm"}


@dataclass(frozen=True)
class Case:
    cls: type
    kwargs: dict = field(default_factory=dict)
    torch_cls: Optional[type] = None  # the torch.optim class taking the same kwargs

    @property
    def family(self) -> str:
        return FAMILY.get(self.cls.algorithm, "elementwise")

    def make(self, params, backend, threads: bool = False, **extra):
        """The optimizer for ``backend``; ``threads``: the cpu step runs with
        conftest.KERNEL_THREADS threads (for tests that keep one thread outside it)."""
        opt = self.cls(params, backend=backend, **{**self.kwargs, **extra})
        return with_threads(opt) if threads and backend == "cpu" else opt

    def factory(self, backend, threads: bool = False, **extra):
        return lambda groups: self.make(groups, backend, threads, **extra)

    def torch_factory(self, **extra):
        """torch.optim's twin (``extra``: e.g. fused=True / foreach=True)."""
        assert self.torch_cls is not None, f"{self.cls.__name__} has no torch.optim twin"
        return lambda groups: self.torch_cls(groups, **self.kwargs, **extra)

    def state_keys(self) -> set:
        """The state keys a step of this case creates (its optimizer says which)."""
        # a 4-dim param: every reduce_axes of the registry names dims of it
        opt = self.cls([torch.nn.Parameter(torch.zeros(2, 2, 2, 2))], backend="reference", **self.kwargs)
        return {"step"} | set(opt._step_state_keys(opt.param_groups[0]))


def _adam_family() -> Dict[str, Case]:
    cases = {}
    # the grid of the AdamW kernel's switches
    for amsgrad in (False, True):
        for bias_correction in (True, False):
            for wd in (0.0, 0.1):
                cases[f"adamw-ams{int(amsgrad)}-bc{int(bias_correction)}-wd{wd}"] = Case(
                    af.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=wd, amsgrad=amsgrad,
                                   bias_correction=bias_correction))
    for amsgrad in (False, True):
        cases[f"adam-l2-ams{int(amsgrad)}"] = Case(
            af.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad))
    return cases


CASES: Dict[str, Case] = {
    **_adam_family(),
    # with a torch.optim twin (defaults but for lr / weight decay / amsgrad)
    "adamw": Case(af.AdamW, dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW),
    "adamw-amsgrad": Case(af.AdamW, dict(lr=1e-2, amsgrad=True), torch.optim.AdamW),
    "adamw-wd-amsgrad": Case(af.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), torch.optim.AdamW),
    "adamw-wd-no_bias_correction": Case(af.AdamW, dict(lr=1e-2, weight_decay=0.1, bias_correction=False)),
    "adamw-eps1e-3": Case(af.AdamW, dict(lr=1e-2, weight_decay=0.1, eps=1e-3), torch.optim.AdamW),
    "adam-l2": Case(af.Adam, dict(lr=1e-2, weight_decay=0.1), torch.optim.Adam),
    "adam-l2-amsgrad": Case(af.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), torch.optim.Adam),
    "adam-no_decay": Case(af.Adam, dict(lr=1e-2), torch.optim.Adam),
    "radam": Case(af.RAdam, dict(lr=1e-2, weight_decay=0.1), torch.optim.RAdam),
    "radam-decoupled": Case(af.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
                            torch.optim.RAdam),
    # ρ_t > 4 from t = 5 on (β2 = 0.999): both branches within 10 steps, and a
    # step (t = 5) where threshold 4 and torch's 5 disagree.
    "radam-threshold4": Case(af.RAdam, dict(lr=1e-2, weight_decay=0.1, rectify_threshold=4.0)),
    "radam-no_decay": Case(af.RAdam, dict(lr=1e-2), torch.optim.RAdam),
    "radam-eps1e-3": Case(af.RAdam, dict(lr=1e-2, weight_decay=0.1, eps=1e-3), torch.optim.RAdam),
    "lion": Case(af.Lion, dict(lr=1e-2, betas=(0.9, 0.99))),
    "lion-wd": Case(af.Lion, dict(lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)),
    "lion-wd0.1": Case(af.Lion, dict(lr=1e-2, weight_decay=0.1)),
    "lion-lr1e-3": Case(af.Lion, dict(lr=1e-3, weight_decay=0.1)),
    # Amos beside the layout x config grid of amos_case
    "amos-all-momentum": Case(af.Amos, dict(lr=0.05, reduce_axes="all", momentum=0.9)),
    "amos-all-momentum-clip": Case(af.Amos, dict(lr=0.1, reduce_axes="all", momentum=0.9, clip_value=0.5)),
    "amos-clip": Case(af.Amos, dict(lr=0.1, clip_value=0.5)),
    "amos-eta-momentum": Case(af.Amos, dict(lr=1e-2, eta=0.5, momentum=0.9)),
    # ScaledAdamW: both decays, p given / from a half-life / none, q, sigma
    "scaled-square-p": Case(af.ScaledAdamW, dict(lr=0.05, p=2.0, decay="inverse_square")),
    "scaled-time-p": Case(af.ScaledAdamW, dict(lr=0.05, p=2.0, decay="inverse_time")),
    "scaled-square-half_life": Case(af.ScaledAdamW, dict(lr=0.05, half_life=4, decay="inverse_square")),
    "scaled-time-half_life-q": Case(af.ScaledAdamW, dict(lr=0.05, half_life=4, decay="inverse_time", q=0.5)),
    "scaled-square-no_p-q": Case(af.ScaledAdamW, dict(lr=0.05, decay="inverse_square", q=2.0)),
    "scaled-time-no_p-sigma": Case(af.ScaledAdamW, dict(lr=0.05, decay="inverse_time", sigma=0.02)),
    "scaled-square-p-sigma-q": Case(af.ScaledAdamW, dict(lr=0.05, p=1.0, decay="inverse_square", sigma=0.1,
                                                         q=3.0, betas=(0.8, 0.95))),
    "scaled-half_life5-eps1e-3": Case(af.ScaledAdamW, dict(lr=0.05, half_life=5, eps=1e-3)),
    "scaled-lr1e-2-half_life100": Case(af.ScaledAdamW, dict(lr=1e-2, half_life=100)),
    # LAMB
    "lamb-plain": Case(af.Lamb, dict(lr=0.05)),
    "lamb-weight_decay": Case(af.Lamb, dict(lr=0.05, weight_decay=0.1)),
    "lamb-no_bias_correction": Case(af.Lamb, dict(lr=0.05, bias_correction=False, betas=(0.8, 0.9),
                                                  weight_decay=0.01)),
    "lamb-big_eps": Case(af.Lamb, dict(lr=0.05, eps=1e-3, weight_decay=0.01)),
    "lamb-lr1e-2-wd0.1": Case(af.Lamb, dict(lr=1e-2, weight_decay=0.1)),
    "lamb-lr1e-2-no_bias_correction": Case(af.Lamb, dict(lr=1e-2, bias_correction=False, betas=(0.8, 0.9),
                                                         weight_decay=0.01)),
    "lamb-lr1e-2-wd0.01": Case(af.Lamb, dict(lr=1e-2, weight_decay=0.01)),
    "lamb-eps1e-3": Case(af.Lamb, dict(lr=1e-2, weight_decay=0.01, eps=1e-3)),
}

# The Adam family on default-like settings with torch.optim twins (test_reference.py):
# every weight decay x amsgrad / decoupled switch.
for _wd in (0.0, 0.1):
    for _on in (False, True):
        CASES[f"torch-adamw-ams{int(_on)}-wd{_wd}"] = Case(
            af.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=_wd, amsgrad=_on), torch.optim.AdamW)
        CASES[f"torch-adam-l2-ams{int(_on)}-wd{_wd}"] = Case(
            af.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=_wd, amsgrad=_on), torch.optim.Adam)
        # β2 = 0.999: ρ_t ≤ 5 for t ≤ 5, so the first steps take the momentum-only
        # branch and the later ones the rectified one.
        CASES[f"torch-radam-decoupled{int(_on)}-wd{_wd}"] = Case(
            af.RAdam, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=_wd, decoupled_weight_decay=_on),
            torch.optim.RAdam)
TORCH_TWIN_GRID = [name for name in CASES if name.startswith("torch-")]

# One case per optimizer class, the first of its rows: the tests that cover every
# optimizer on every backend parametrize over these, so a new class's first row
# brings it into all of them.
CLASS_CASES: Dict[str, str] = {}
for _name, _case in CASES.items():
    CLASS_CASES.setdefault(_case.cls.__name__, _name)

# The classes with FP8 states (not in CASES: the full-precision kernel tests cross
# those), for the tests of promises every class keeps.
FP8_CLASS_CASES: Dict[str, Case] = {
    # settings where every part of the update matters
    "AdamW8bit": Case(af.AdamW8bit, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "Adam8bit": Case(af.Adam8bit, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    "RAdam8bit": Case(af.RAdam8bit, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),  # L2; rectified from step 6
    "Lion8bit": Case(af.Lion8bit, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "Amos8bit": Case(af.Amos8bit, dict(lr=0.05, reduce_axes=-1, momentum=0.9)),
}
# Every class: its CASES row or its FP8 case.
ALL_CLASS_CASES: Dict[str, Case] = {**{name: CASES[row] for name, row in CLASS_CASES.items()}, **FP8_CLASS_CASES}

# Amos: slot layouts (reduce_axes) and configurations, crossed by the kernel tests.
AMOS_LR = 0.3  # b reaches ~0.3 within a run: c and d differ from 1 by a few %, so
               # using the updated b where the old one is due shows at float32 precision
AMOS_REDUCE_AXES = {
    "elementwise": None, "all": "all", "rows": (1,), "last": (-1,), "dim0": (0,),
    "middle": (1,), "outer_and_inner": (0, 2), "trailing_two": (1, 2),
}
AMOS_CONFIGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "clip": dict(clip_value=0.5),
    "extra_l2": dict(extra_l2=0.01),
    "everything": dict(momentum=0.8, clip_value=0.7, extra_l2=0.02, beta=0.99, d_coef=0.5, c_coef=0.3),
}
# group 0: η inferred per tensor (eta=None); group 1: its own lr and a float η
AMOS_SECOND_GROUP = {"lr": 0.1, "eta": 0.7}


def amos_case(reduce_axes, config: str = "plain", lr: float = AMOS_LR) -> Case:
    return Case(af.Amos, dict(lr=lr, reduce_axes=reduce_axes, **AMOS_CONFIGS[config]))


def decay_lr(step, opt_a, opt_b):
    """An lr schedule: both optimizers get the same new lr before every step but the first."""
    if step == 0:
        return
    for opt in (opt_a, opt_b):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.85


# ---------------------------------------------------------------------------
# Tolerances: backend -> family -> dtype -> rtol/atol; "scaled": the absolute
# floor is atol × max|reference tensor| (v ≈ (1−β)·g² is ~1e-3 while params are O(1)).
# ---------------------------------------------------------------------------

LOW_PRECISION = {BF16: dict(rtol=2e-2, atol=1e-2), F16: dict(rtol=2e-3, atol=2e-3)}
_CPU_AMOS = {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-6), **LOW_PRECISION}
TOL = {
    "cpu": {
        "elementwise": {F64: dict(rtol=1e-12, atol=1e-14), F32: {}, **LOW_PRECISION},  # {}: assert_close defaults
        "amos": _CPU_AMOS,
        "norm": {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=1.3e-6, atol=1e-5), **LOW_PRECISION},
    },
    "cuda": {family: {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-6), **LOW_PRECISION}
             for family in ("elementwise", "amos", "norm")},
    "triton": {family: {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-14), **LOW_PRECISION}
               for family in ("elementwise", "amos", "norm")},
}
SCALED = {("cpu", "amos"), ("cpu", "norm"), ("cuda", "elementwise"), ("cuda", "amos"), ("cuda", "norm")}
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 against an independent implementation
SCALER_TOL = dict(rtol=1e-6, atol=1e-7)  # GradScaler'd run against unscaled grads (a power-of-two scale)


def tolerance(backend: str, family: str, dtype) -> dict:
    return TOL[backend][family][dtype]


def assert_close_scaled(actual, expected, rtol, atol, what):
    """|a − e| <= atol·max|e| + rtol·|e| elementwise; same dtype, shape and device."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def assert_tensor_close(actual, expected, tol: dict, scaled: bool, what: str):
    if scaled:
        assert_close_scaled(actual, expected, what=what, **tol)
    else:
        torch.testing.assert_close(actual.detach(), expected.detach(), msg=lambda m: f"{what}: {m}", **tol)


def assert_runs_close(run: PairRun, tol: dict, scaled: bool = False, keys: Optional[set] = None,
                      step_on_cpu: bool = True) -> None:
    """Params and states of a run agree: the same state keys (``keys`` when given),
    ``step`` equal (and a float32 CPU scalar with ``step_on_cpu``), every other
    state tensor close like the params, in the param's dtype and on its device."""
    for i, (pa, pb) in enumerate(zip(run.params_a, run.params_b)):
        assert_tensor_close(pa, pb, tol, scaled, f"param {i}")
    for i, (p, sa, sb) in enumerate(zip(run.params_a, run.states_a(), run.states_b())):
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        if keys is not None:
            assert set(sa) == keys, f"param {i}: state keys {sorted(sa)} != {sorted(keys)}"
        for key in sorted(sa):
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb), f"param {i}: step {float(va)} != {float(vb)}"
                if step_on_cpu:
                    assert va.device.type == "cpu" and va.dtype == F32 and va.dim() == 0, f"param {i}: step"
                continue
            assert va.dtype == p.dtype and va.device == p.device, f"param {i} state {key!r}"
            assert_tensor_close(va, vb, tol, scaled, f"param {i} state {key!r}")


def assert_matches(run: PairRun, backend: str, case: Case, dtype, keys: bool = True) -> None:
    """``run.opt_a`` (on ``backend``) against ``run.opt_b`` at the tolerance of the
    backend, the case's family and ``dtype``; ``keys``: the state holds exactly
    the case's keys."""
    assert_runs_close(run, tolerance(backend, case.family, dtype), (backend, case.family) in SCALED,
                      case.state_keys() if keys else None)


def assert_bitwise_equal(runs: Sequence[PairRun]) -> None:
    """The params and states of ``runs[0]`` equal those of every other run bit for bit."""
    first = runs[0]
    for other in runs[1:]:
        for a, b in zip(first.params_a + first.params_b, other.params_a + other.params_b):
            assert torch.equal(a, b)
        for sa, sb in zip(first.states_a() + first.states_b(), other.states_a() + other.states_b()):
            assert set(sa) == set(sb)
            for key in sa:
                assert torch.equal(sa[key], sb[key]), key


def assert_states_equal(opt_a, params_a, opt_b, params_b) -> None:
    """Bitwise: params and every state tensor (same keys, same dtype)."""
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa.detach(), pb.detach())
    for sa, sb in zip(states_of(opt_a, params_a), states_of(opt_b, params_b)):
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------
# Seeded params and grads, and bf16 results compared up to a neighbour
# ---------------------------------------------------------------------------

def seeded_params(shapes, dtype=torch.float32, device="cpu", seed: int = 0) -> list:
    """Parameters of ``shapes`` drawn from one generator (the same values on any device)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]


def seeded_grads(params, step: int) -> list:
    """The grads of ``step``, like their params, the same values on any device."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device) for p in params]


def assert_equal_or_neighbours(got, expected, exact: bool, what: str = "", allow_one: bool = False) -> None:
    """bf16 params: bitwise equal (``exact``), else each value equal to the expected one
    or one of its bfloat16 neighbours, and at most 1% of them different (or one value,
    with ``allow_one``).  Where the float32 results differ in their last bits (sums in
    another order), a rounding to bf16 can land on the other neighbour."""
    differ = total = 0
    for i, (a, b) in enumerate(zip(got, expected)):
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16, what
        if exact:
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), \
                f"{what}: param {i} {tuple(a.shape)}: {int((a != b).sum())} of {a.numel()} values differ"
            continue
        a, b = a.float(), b.float()
        ulp = torch.where(b == 0, torch.tensor(2.0**-133), b.abs() * 2**-7)
        assert torch.all((a - b).abs() <= ulp * 1.01), f"{what}: param {i} differs by more than one bf16 ulp"
        differ += int((a != b).sum())
        total += a.numel()
    allowed = max(1, 0.01 * total) if allow_one else 0.01 * max(total, 1)
    assert differ <= allowed, f"{what}: {differ} of {total} values differ"
