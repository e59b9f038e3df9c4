"""Stochastic rounding of bfloat16 params in the Triton kernels
(``bf16_stochastic_round=True``; the step op's ``round_keys``), on CUDA tensors when
a GPU is visible, otherwise on CPU tensors through Triton's interpreter.

The bits are a hash of (key, step, element index) fixed by csrc/stochastic_round.h,
so the Triton backend must store the SAME bfloat16 params as the fused CPU kernels:

* every optimizer class (tests/registry.py CLASS_CASES), every Amos walk (with and
  without momentum, the phased ones too), a dense non-contiguous param, params
  whose step counts differ: bitwise equal to backend='cpu' where both compute the
  same float32 result — every elementwise rule and Amos' elementwise slots.  The
  norm-scaled rules and Amos slots reduced over several elements sum in another
  order than the CPU kernels: a float32 result may then differ in its last bits
  and round to the other neighbour, so there the params are equal or neighbouring
  bfloat16 values, and rarely different (as tests/test_stochastic_round.py allows
  between the CPU kernels and the reference);
* the hash itself (common.py) at element indices past 2^32, through a tiny kernel;
* NaN stays NaN; telemetry with rounding sums the rounded stored values; two runs
  are bitwise equal, and differ from round-to-nearest.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import amos_fused as af  # noqa: E402
from amos_fused import stochastic_round as host_rounding  # noqa: E402
from amos_fused.telemetry import new_table  # noqa: E402
from amos_fused.triton_kernels import amos, common, ops  # noqa: E402

from registry import CASES, CLASS_CASES, assert_equal_or_neighbours, seeded_grads, seeded_params  # noqa: E402
from test_triton import AMOS_LAYOUTS, DEVICE, STEPS, _bits  # noqa: E402
from test_triton_telemetry import AMOS_WALKS  # noqa: E402

# 0-dim, 0-element, odd sizes, a size-1 dim, exactly one block, three blocks (masked tail).
SHAPES = [(), (0,), (37,), (5, 7), (3, 1, 9), (1024,), (2100,)]


def _params(shapes, device):
    return seeded_params(shapes, torch.bfloat16, device)


_grads = seeded_grads


def _run(case, backend, shapes, steps=STEPS, make_params=None, skip=None, **extra):
    """Steps a fresh bucket of bf16 params with ``backend`` (Triton on DEVICE, the
    others on the CPU); ``skip``: {step: indices of params without a grad}.
    Returns the params on the CPU."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    params = (make_params or _params)(shapes, device)
    opt = case.make(params, backend, **{"bf16_stochastic_round": True, **extra})
    for step in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(params, step))):
            p.grad = None if skip and i in skip.get(step, ()) else g
        opt.step()
    return [p.detach().cpu() for p in params]


def _check_against_cpu(case, shapes, exact, **kwargs):
    got = _run(case, "triton", shapes, **kwargs)
    expected = _run(case, "cpu", shapes, **kwargs)
    assert_equal_or_neighbours(got, expected, exact, "triton vs cpu")
    return got


# ---------------------------------------------------------------------------
# The same bits as the CPU kernels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_every_optimizer_matches_the_cpu_kernels(name):
    """Elementwise rules (and Amos' default layout when its slots are elementwise):
    bitwise; norm-scaled rules and reduced Amos slots: equal or neighbours."""
    case = CASES[CLASS_CASES[name]]
    exact = case.family == "elementwise" or (case.family == "amos" and case.kwargs.get("reduce_axes") is None)
    _check_against_cpu(case, SHAPES, exact)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("layout", list(AMOS_WALKS))
def test_every_amos_walk_matches_the_cpu_kernels(layout, momentum):
    """Every walk of amos_kernel: ELEMENTWISE blocks, ROWS (one program per row, a
    row in two chunks), GENERAL (phased blocks).  Only elementwise slots are bitwise:
    the others sum g² in another order than the CPU kernels."""
    axes = AMOS_WALKS[layout]
    case = CASES["amos-all-momentum"]
    _check_against_cpu(case, AMOS_LAYOUTS[axes], exact=axes is None, reduce_axes=axes, momentum=momentum)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["plain", "momentum"])
def test_amos_phased_walks_match_the_cpu_kernels(monkeypatch, momentum):
    """Rows longer than AMOS_MAX_ROW (split over programs) and GENERAL slots summed in
    several runs: θ written by the phased blocks."""
    monkeypatch.setattr(amos, "AMOS_MAX_ROW", 600)
    monkeypatch.setattr(amos, "AMOS_SUM_WORK", 256)
    case = CASES["amos-all-momentum"]
    _check_against_cpu(case, [(2500,), (37,), (), (0,)], exact=False, reduce_axes="all", momentum=momentum)
    _check_against_cpu(case, [(1100, 3), (40, 1100)], exact=False, reduce_axes=(0,), momentum=momentum)


@pytest.mark.parametrize("name", ["adamw-ams1-bc1-wd0.1", "adam-l2-ams1", "radam-decoupled", "lion-wd",
                                  "scaled-time-p", "lamb-weight_decay"])
def test_other_kernel_switches_match_the_cpu_kernels(name):
    """amsgrad, coupled (L2) / decoupled decay, RAdam's decoupled decay, Lion with
    decay, scale-aware Adam with inverse time, LAMB with decay."""
    case = CASES[name]
    _check_against_cpu(case, SHAPES, exact=case.family == "elementwise")


def test_dense_non_contiguous_param():
    """An element's index is its offset in memory from the first element (not its
    row-major index): a permuted param gets the CPU kernels' bits."""
    def permuted(shapes, device):
        return [torch.nn.Parameter(p.detach().permute(2, 0, 1)) for p in _params(shapes, device)]
    got = _check_against_cpu(CASES[CLASS_CASES["AdamW"]], [(5, 7, 40)], exact=True, make_params=permuted)
    assert not got[0].is_contiguous()


def test_params_with_different_step_counts():
    """A param without a grad on a step lags the others: each tensor's bits use its
    own step count."""
    _check_against_cpu(CASES[CLASS_CASES["AdamW"]], SHAPES, exact=True, steps=4, skip={0: (2,), 2: (5, 6)})


def test_it_rounds_stochastically():
    """Not round-to-nearest: some stored values differ from the nearest-even rounding
    of the same steps, and the seed changes the bits."""
    case = CASES[CLASS_CASES["AdamW"]]
    rounded = _run(case, "triton", [(3000,)])
    nearest = _run(case, "triton", [(3000,)], bf16_stochastic_round=False)
    reseeded = _run(case, "triton", [(3000,)], stochastic_round_seed=7)
    assert not torch.equal(rounded[0], nearest[0])
    assert not torch.equal(rounded[0], reseeded[0])


def test_two_runs_are_bitwise_equal():
    for name in ("AdamW", "Amos", "Lamb"):
        case = CASES[CLASS_CASES[name]]
        first, second = _run(case, "triton", SHAPES), _run(case, "triton", SHAPES)
        for a, b in zip(first, second):
            assert torch.equal(_bits(a), _bits(b)), name


# ---------------------------------------------------------------------------
# The hash (common.py) against the reference, past 2^32 elements
# ---------------------------------------------------------------------------

@triton.jit
def _round_kernel(rounding, offsets, x, out, BLOCK: tl.constexpr):
    """Program i rounds x[i·BLOCK …] as the elements at offsets[i·BLOCK …] of one tensor
    (its first offset the block's lowest)."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    offs = tl.load(offsets + lanes)
    first = tl.load(offsets + pid * BLOCK)
    tl.store(out + lanes, common.round_block(tl.load(x + lanes), rounding, first, offs, BLOCK))


def test_hash_matches_the_reference_past_2_32():
    """Blocks whose pair indices lie below 2^32 (the table's base), cross it, and lie
    past it (a base per element), odd and even first elements: the bits of
    amos_fused/stochastic_round.py (= csrc/stochastic_round.h), without allocating
    a tensor of 2^33 elements.  NaN stays NaN."""
    block = 128
    starts = [0, 12345, 2**32 - 50, 2**32, 2**33 - 51, 2**33 - 50, 2**33, 3 * 2**33 + 7, 2**40 - 64]
    key, step = host_rounding.round_key(12345, 77), 9
    offsets = torch.cat([torch.arange(s, s + block, dtype=torch.int64) for s in starts])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(offsets), generator=gen) * 3
    x[::97] = float("nan")
    table = common.round_table([key], [torch.tensor(float(step - 1))], DEVICE)  # counters before the step
    out = torch.empty_like(x, device=DEVICE)
    _round_kernel[(len(starts),)](table, offsets.to(DEVICE), x.to(DEVICE), out, BLOCK=block)
    out = out.cpu()
    bits = host_rounding.element_bits(key, step, offsets)
    pattern = x.view(torch.int32).to(torch.int64) & host_rounding.MASK32
    expected = (pattern + bits) & 0xFFFF0000
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)
    nan = x.isnan()
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out.view(torch.int32)[~nan], expected[~nan])


def test_round_table():
    """(base for pair indices < 2^32, key_lo, key_hi, step after the increment) per tensor."""
    keys = [host_rounding.round_key(5, 0), host_rounding.round_key(2**31 - 1, 3)]
    table = common.round_table(keys, [torch.tensor(0.0), torch.tensor(41.0)], torch.device("cpu"))
    assert table.dtype == torch.int64 and table.shape == (2, 4)
    for row, key, step in zip(table.tolist(), keys, (1, 42)):
        assert row == [host_rounding.round_base(key, step, 0), key & 0xFFFFFFFF, key >> 32, step]
    assert common.round_table(None, [], torch.device("cpu")) is None


# ---------------------------------------------------------------------------
# NaN, telemetry, the op's checks
# ---------------------------------------------------------------------------

def test_nan_stays_nan():
    p = torch.nn.Parameter(torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")] + [0.5] * 40,
                                        dtype=torch.bfloat16, device=DEVICE))
    opt = af.AdamW([p], lr=0.01, weight_decay=0.0, bf16_stochastic_round=True, backend="triton")
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.isnan(p[0]) and torch.isfinite(p[1]) and p[2] == float("inf") and p[3] == -float("inf")


@pytest.mark.parametrize("name", ["AdamW", "Lion", "Amos", "Lamb"])
def test_telemetry_sums_the_rounded_stored_values(name):
    """With rounding, row t of the telemetry is (Σθ², Σ(Δθ)²) of the STORED (rounded)
    params, and equals the CPU kernels' (same stored values).  Δθ of an unrounded θ
    differs from the stored one by up to a bf16 ulp: far beyond the tolerance."""
    case = CASES[CLASS_CASES[name]]
    params = _params(SHAPES, DEVICE)
    opt = case.make(params, "triton", bf16_stochastic_round=True, track_rms=True)
    cpu_params = _params(SHAPES, torch.device("cpu"))
    cpu_opt = case.make(cpu_params, "cpu", bf16_stochastic_round=True, track_rms=True)
    lr = float(opt.param_groups[0]["lr"])
    moved = False
    for step in range(STEPS):
        before = [p.detach().double().cpu() for p in params]
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        for p, g in zip(cpu_params, _grads(cpu_params, step)):
            p.grad = g
        opt.step()
        cpu_opt.step()
        rms, cpu_rms = opt.rms(), cpu_opt.rms()
        for i, (p, b, q) in enumerate(zip(params, before, cpu_params)):
            after = p.detach().double().cpu()
            n = max(after.numel(), 1)
            weight, update = rms[p]
            assert weight == pytest.approx(float(after.square().sum() / n) ** 0.5, rel=1e-5, abs=1e-12), (step, i)
            assert update == pytest.approx(float((after - b).square().sum() / n) ** 0.5 / lr, rel=1e-4, abs=1e-12), \
                (step, i)
            assert weight == pytest.approx(cpu_rms[q][0], rel=1e-5, abs=1e-12)
            if case.family != "norm":  # (the norm-scaled rules may store a neighbour)
                assert update == pytest.approx(cpu_rms[q][1], rel=1e-4, abs=1e-12)
            moved = moved or update > 0
    assert moved


def test_op_checks_round_keys_before_any_write():
    """The C++ prologue's checks (begin_step): one key per param, bfloat16 params only."""
    def bucket(dtype):
        params = [torch.randn(5, device=DEVICE).to(dtype), torch.randn(6, device=DEVICE).to(dtype)]
        states = [torch.zeros_like(p) for _ in range(2) for p in params]
        return params, [torch.ones_like(p) for p in params], states, [torch.tensor(0.0) for _ in params]

    hyper = [0.1, 0.9, 1 - 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 1.0]  # Adam's, in contract order
    for dtype, keys, message in ((torch.float32, [1, 2], "applies to bfloat16 params"),
                                 (torch.bfloat16, [1], "2 params but 1 round_keys")):
        params, grads, states, steps = bucket(dtype)
        kept = [t.clone() for t in params + states + steps]
        with pytest.raises(ValueError, match=message):
            ops.step("adam", params, grads, states, steps, hyper, [], round_keys=keys)
        for t, k in zip(params + states + steps, kept):
            assert torch.equal(t, k)


def test_op_with_round_keys_and_telemetry():
    """Through the op: a telemetry table and round keys on one bucket, several steps;
    the stored params are the reference rounding of the CPU kernels' (the CPU op with
    the same keys)."""
    keys = [host_rounding.round_key(3, i) for i in range(len(SHAPES))]
    hyper = [0.05, 0.9, 1 - 0.9, 0.999, 1e-8, 0.01, 1.0, 0.0, 1.0]
    runs = {}
    for where, device, step_op in (("triton", DEVICE, ops.step), ("cpu", torch.device("cpu"), torch.ops.amos_fused.step)):
        params = [p.detach() for p in _params(SHAPES, device)]
        states = [torch.zeros_like(p) for _ in range(2) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        tables = []
        for step in range(STEPS):
            table = new_table(len(params), device)
            step_op("adam", params, _grads(params, step), states, steps, hyper, [], None, None, table, keys)
            tables.append(table.cpu())
        runs[where] = (params, tables)
    for a, b in zip(runs["triton"][0], runs["cpu"][0]):
        assert torch.equal(_bits(a.cpu()), _bits(b))
    for a, b in zip(runs["triton"][1], runs["cpu"][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
