"""Scales inferred from a tensor's entries — Amos's ``eta=None``, ScaledAdamW's
``sigma=None`` (its ``init_norm``), ``amos_param_groups``' RMS of vectors — are
bitwise the same at any torch thread count (README, "Bitwise determinism"): the
sum of squares behind them (``amos_fused.optim.sum_of_squares``) is summed in a
fixed order, not by torch's thread-split reductions."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import amos_fused as af
from conftest import num_threads

THREADS = (1, 2, 3)


def _heavy(shape, gen, dtype, scale):
    """Heavy-tailed entries: sums of their squares round differently when torch's
    reductions split them between threads (at 1, 2 and 3 threads for every param
    of ``Big``, before the fix, with the seed below)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x * torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64)) * scale).to(dtype)


class Big(nn.Module):
    """Large params (above torch's parallel grain, 32768) whose scale is inferred:
    vectors (Amos, amos_param_groups) and matrices (ScaledAdamW), float64 and float32."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.vec64 = nn.Parameter(_heavy(300_000, gen, torch.float64, 0.3))
        self.vec32 = nn.Parameter(_heavy(300_007, gen, torch.float32, 0.5))
        self.mat64 = nn.Parameter(_heavy((600, 500), gen, torch.float64, 0.01))
        self.mat32 = nn.Parameter(_heavy((500, 601), gen, torch.float32, 0.02))
        self.lin = nn.Linear(8, 4)


def _optimizers():
    return {
        "Amos": lambda m: af.Amos(m.parameters(), lr=0.01),
        "ScaledAdamW": lambda m: af.ScaledAdamW(m.parameters(), lr=0.01, half_life=100),
        "amos_param_groups": lambda m: af.Amos(af.amos_param_groups(m, lr=0.01), lr=0.01),
    }


def _key(opt):
    return "init_norm" if isinstance(opt, af.ScaledAdamW) else "eta"


def _run(make, n_threads):
    """The inferred values and the params after 2 steps, at ``n_threads`` threads."""
    with num_threads(n_threads):
        torch.manual_seed(0)
        model = Big()
        opt = make(model)
        inferred = [v for g in opt.param_groups for v in g[_key(opt)]]
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            opt.step()
        return inferred, [p.detach().clone() for p in model.parameters()], model, opt


@pytest.mark.parametrize("name", list(_optimizers()))
def test_inferred_scale_and_steps_do_not_depend_on_threads(name):
    make = _optimizers()[name]
    first, first_params, model, opt = _run(make, THREADS[0])
    for n in THREADS[1:]:
        inferred, params, _, _ = _run(make, n)
        assert [repr(v) for v in inferred] == [repr(v) for v in first], (name, n)
        for p, q in zip(params, first_params):
            assert torch.equal(p, q), (name, n, p.shape, (p != q).sum().item())
    # the formula is the one torch's reductions give, up to the order of summation
    names = {id(p): n for n, p in model.named_parameters()}
    torch.manual_seed(0)
    fresh = dict(Big().named_parameters())
    for group in opt.param_groups:
        for p, value in zip(group["params"], group[_key(opt)]):
            q = fresh[names[id(p)]]
            rms = float(q.detach().double().pow(2).mean().sqrt())
            if name == "ScaledAdamW":
                expected = math.sqrt(q.numel()) * (rms if q.dim() >= 2 else 0.5)
            elif name == "amos_param_groups" and q.dim() >= 2:
                expected = math.sqrt(1.0 / math.prod(q.shape[1:]))  # by the table, not inferred
            elif name == "amos_param_groups" and names[id(p)] == "lin.bias":
                expected = 0.5
            else:
                expected = rms
            assert value == pytest.approx(expected, rel=1e-12, abs=0), (name, names[id(p)])


# ---------------------------------------------------------------------------
# Sharded params (FSDP2, 2 gloo ranks): a shard's sum of squares all-reduced
# ---------------------------------------------------------------------------

def _sharded_inferred(rank, world, path):
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for dtype in (torch.float64, torch.float32):
            def model():
                torch.manual_seed(0)
                gen = torch.Generator().manual_seed(2)
                m = nn.Module()
                m.vec = nn.Parameter(_heavy(300_001, gen, dtype, 0.3))
                m.mat = nn.Parameter(_heavy((601, 500), gen, dtype, 0.01))
                m.lin = nn.Linear(8, 4).to(dtype)
                return m
            single = model()
            for name, make in _optimizers().items():
                single_opt = make(single)
                expected = [v for g in single_opt.param_groups for v in g[_key(single_opt)]]
                seen = []
                for n in THREADS[:2]:
                    with num_threads(n):
                        sharded = fully_shard(model())
                        opt = make(sharded)
                        seen.append([v for g in opt.param_groups for v in g[_key(opt)]])
                assert seen[0] == seen[1], (name, dtype)
                assert seen[0] == pytest.approx(expected, rel=1e-12, abs=0), (name, dtype)
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_sharded_params_infer_the_unsharded_scales():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sharded_inferred, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)


# ---------------------------------------------------------------------------
# The helper itself: any shape (0-size, 1 element, non-contiguous), dtype, threads
# ---------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.complex128, torch.complex64)
SIZES = st.one_of(st.integers(0, 3), st.integers(0, 40), st.sampled_from([8192, 8193, 16384, 32769, 70001]))


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.one_of(
        st.just(()), st.just((0,)), st.just((1,)), st.just((0, 5)),
        st.lists(SIZES, min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 400_000),
        st.sampled_from([(300_001,), (600, 500), (3, 70_001)]),
    ))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 7.5]))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif layout == "strided" and x.dim() >= 1:
        x = x[..., ::2]
    return x


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(x=tensors(), counts=st.lists(st.sampled_from([1, 2, 3, 4]), min_size=2, max_size=3, unique=True))
def test_sum_of_squares_is_thread_independent(x, counts):
    from amos_fused.optim import sum_of_squares

    values = []
    for n in counts:
        with num_threads(n):
            s = sum_of_squares(x)
        assert s.dtype == torch.float64 and s.dim() == 0
        values.append(s)
    for s in values[1:]:
        assert torch.equal(s, values[0]), (counts, [repr(float(v)) for v in values])
    real = torch.view_as_real(x) if x.is_complex() else x
    expected = (real.double() ** 2).sum()
    torch.testing.assert_close(values[0], expected, rtol=1e-12, atol=0)


def _steps_at_each_thread_count(make, start, grads):
    """The param after stepping ``make([param])`` through ``grads`` from ``start``, at
    each of THREADS."""
    results = []
    for count in THREADS:
        with num_threads(count):
            p = torch.nn.Parameter(start.clone())
            opt = make([p])
            for g in grads:
                p.grad = g.clone()
                opt.step()
            results.append(p.detach().clone())
    return results


@pytest.mark.parametrize("name", ["ScaledAdamW", "Lamb"])
def test_reference_norms_are_the_same_at_any_thread_count(name):
    """The reference backend's per-step norms (‖u‖, ‖θ‖) are summed in a fixed
    order too: its steps are bitwise the same at 1, 2 and 3 threads."""
    cls = {"ScaledAdamW": af.ScaledAdamW, "Lamb": af.Lamb}[name]
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(700, 700, generator=gen, dtype=torch.float64) * torch.rand(700, 700, generator=gen) ** 4
    grads = [torch.randn(700, 700, generator=gen, dtype=torch.float64) for _ in range(2)]
    results = _steps_at_each_thread_count(lambda ps: cls(ps, lr=1e-2, backend="reference"), start, grads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("reduce_axes", ["all", (0,), (1,)])
def test_reference_amos_slot_means_are_the_same_at_any_thread_count(reduce_axes):
    """The reference's Amos mean of g² over a slot's elements is summed in a fixed
    order: bitwise the same params at 1, 2 and 3 threads, large slots included."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(3, 150001, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 150001, generator=gen, dtype=torch.float64) for _ in range(2)]
    results = _steps_at_each_thread_count(
        lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes=reduce_axes, backend="reference"), start, grads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("numel", [8193, 3 * 8192, 3 * 8192 + 1, 7 * 8192 + 5, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_the_sum_of_squares_taken_a_slice_at_a_time_is_the_whole_ones(monkeypatch, numel, dtype):
    """local_sum_of_squares squares a slice of rows at a time (a large tensor's
    float64 squares are never all held at once): bitwise the sum taken in one piece
    (_row_sums of all the squares), whatever the slice's size, at any thread count."""
    from amos_fused import deterministic_sums as sums

    gen = torch.Generator().manual_seed(numel)
    t = _heavy((numel,), gen, torch.float32, 3.0).to(dtype)
    x = torch.view_as_real(t) if t.is_complex() else t
    x = x.reshape(1, -1).double()
    whole = sums._row_sums(x * x)[0]
    for rows in (1, 2, 5, 1024):
        monkeypatch.setattr(sums, "_ROWS_AT_ONCE", rows)
        for threads in THREADS:
            with num_threads(threads):
                assert torch.equal(sums.local_sum_of_squares(t), whole), (rows, threads)


def test_inferring_a_scale_holds_no_float64_copy_of_a_large_param():
    """Amos's eta=None of a bfloat16 param of 32M elements (64 MB): the construction's
    peak memory grows by far less than the float64 squares would take (256 MB each)."""
    import subprocess
    import sys

    script = (
        "import resource, torch, amos_fused as af\n"
        "p = torch.nn.Parameter(torch.randn(4096, 8192).bfloat16())\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "af.Amos([p], lr=0.01)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    grown_kib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                   text=True).stdout.strip())
    assert grown_kib * 1024 < 192 * 2**20, grown_kib  # (one-pass: about 800 MB)
