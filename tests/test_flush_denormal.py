"""Under torch.set_flush_denormal(True) — flush-to-zero and denormals-are-zero,
which torch sets on the calling thread only — the cpu kernels flush on every
thread that steps: a step is bitwise the same at any thread count, and at one
thread the elementwise classes' is the reference's.  (torch's own ops flush on the calling thread only,
so the reference backend's and torch.optim's results then depend on the thread
count: the README says so.)"""
from __future__ import annotations

import platform

import pytest
import torch

from registry import ALL_CLASS_CASES, backends

SHAPES = ((400, 257), (33,))
# The classes whose cpu step is bitwise the reference's (not: Amos, ScaledAdamW and
# Lamb, whose sums over many elements the two backends take in another order).
BITWISE_THE_REFERENCE = ("AdamW", "Adam", "RAdam", "Lion", "AdamW8bit", "Adam8bit", "RAdam8bit", "Lion8bit")


def _data(steps=3):
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.randn(*shape, generator=gen)
        p.view(-1)[::3] *= 1e-39  # subnormal params
        params.append(p)
    grads = []
    for _ in range(steps):
        step = []
        for shape in SHAPES:
            g = torch.randn(*shape, generator=gen)
            g.view(-1)[1::2] *= 1e-38  # (1 − β1)·g, g², sign(m) … subnormal or flushed
            step.append(g)
        grads.append(step)
    return params, grads


def _run(case, backend, threads):
    values, grads = _data()
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = case.make(params, backend)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(kept)
    return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values()) if isinstance(t, torch.Tensor)]


def _bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8),
                                                                       y.view(-1).view(torch.uint8))
                                    for x, y in zip(a, b))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"),
                    reason="the kernels take the caller's flush mode from x86's MXCSR only")
@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode (no SSE3)")
@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("name", sorted(ALL_CLASS_CASES))
def test_flushed_subnormals_step_alike_at_any_thread_count(name, backend):
    case = ALL_CLASS_CASES[name]
    one = _run(case, backend, 1)
    for threads in (2, 3):
        assert _bitwise_equal(_run(case, backend, threads), one), (name, threads)
    if name in BITWISE_THE_REFERENCE:
        assert _bitwise_equal(_run(case, "reference", 1), one), name
