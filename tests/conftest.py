"""Shared helpers for the amos_fused tests.

Parameter sets follow torch's own optimizer tests (test/optim, OptimizerInfo):
two param groups (the second with its own lr / weight_decay), a 0-dim param, a
0-element param, odd sizes and sizes that are not a multiple of the SIMD width
(16), fed deterministic gradients, with steps where some grads are None.
"""
from __future__ import annotations

import contextlib
import copy
import signal
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels step CPU tensors in Triton's interpreter (set before they are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import amos_fused  # noqa: F401  (registers torch.ops.amos_fused)

# ---------------------------------------------------------------------------
# Parameter sets
# ---------------------------------------------------------------------------

# Shapes of the default param set.  Group 0 gets the first GROUP_SPLIT of them.
SHAPES = [
    (),          # 0-dim
    (0,),        # 0 elements
    (37, 5),     # 185 elements: odd, not a multiple of 16
    (1000,),
    (3, 1, 7),   # 21 elements, a size-1 dim
    (19,),       # shorter than one AVX2 tile of bf16 (16) + tail
    (4, 16),     # 64: exactly a multiple of every tile size
]
GROUP_SPLIT = 4

# Steps (0-based) on which the grad of the param at these indices is None.
# Index 2 has no grad on the very first step (its state is created late) and
# index 5 has none on step 3 (its step counter then lags the others by one).
NONE_GRADS: Dict[int, Sequence[int]] = {0: (2,), 3: (5, 0)}

DEFAULT_SECOND_GROUP = {"lr": 3e-3, "weight_decay": 0.05}


def make_params(dtype=torch.float64, seed: int = 0, shapes: Sequence[tuple] = SHAPES) -> List[torch.Tensor]:
    """Leaf tensors (requires_grad) initialised from a seeded generator, drawn in
    float64 and rounded to ``dtype`` so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for shape in shapes:
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append(value.to(dtype).requires_grad_(True))
    return out


def clone_params(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def param_groups(params: Sequence[torch.Tensor], second_group: Optional[dict] = None,
                 split: int = GROUP_SPLIT) -> List[dict]:
    """Two param groups: params[:split] with the optimizer defaults, and
    params[split:] with the overrides in ``second_group`` (different lr /
    weight_decay by default).  ``second_group={}`` keeps the defaults."""
    second = DEFAULT_SECOND_GROUP if second_group is None else second_group
    groups = [{"params": list(params[:split])}]
    if len(params) > split:
        groups.append({"params": list(params[split:]), **second})
    return groups


def make_grads(params: Sequence[torch.Tensor], step: int, seed: int = 0, scale: float = 1.0) -> List[torch.Tensor]:
    """Deterministic grads for ``step``: drawn in float64 from a generator seeded
    by (seed, step) and rounded to each param's dtype."""
    gen = torch.Generator().manual_seed(7919 * (seed + 1) + step)
    return [
        (scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        for p in params
    ]


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
              none: Sequence[int] = ()) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if (g is None or i in none) else g.clone()


def step_together(grads: Sequence[Optional[torch.Tensor]], *runs) -> None:
    """Hands the same ``grads`` to each ``(params, optimizer)`` of ``runs`` and steps it."""
    for params, opt in runs:
        set_grads(params, grads)
        opt.step()


# ---------------------------------------------------------------------------
# Running two optimizers side by side
# ---------------------------------------------------------------------------

@dataclass
class PairRun:
    params_a: List[torch.Tensor]
    opt_a: torch.optim.Optimizer
    params_b: List[torch.Tensor]
    opt_b: torch.optim.Optimizer
    initial: List[torch.Tensor]

    def states_a(self) -> List[dict]:
        return states_of(self.opt_a, self.params_a)

    def states_b(self) -> List[dict]:
        return states_of(self.opt_b, self.params_b)


def run_pair(
    make_a: Callable[[list], torch.optim.Optimizer],
    make_b: Callable[[list], torch.optim.Optimizer],
    *,
    dtype=torch.float64,
    steps: int = 10,
    seed: int = 0,
    shapes: Sequence[tuple] = SHAPES,
    second_group: Optional[dict] = None,
    none_grads: Optional[Dict[int, Sequence[int]]] = None,
    grad_scale: float = 1.0,
    before_step: Optional[Callable[[int, torch.optim.Optimizer, torch.optim.Optimizer], None]] = None,
    params: Optional[List[torch.Tensor]] = None,
    split: int = GROUP_SPLIT,
    device: str = "cpu",
) -> PairRun:
    """Runs ``steps`` steps of two optimizers over identical copies of a param
    set, fed identical grads (with the None grads of ``none_grads``, default
    NONE_GRADS).  ``make_a`` / ``make_b`` take a list of param groups.
    ``before_step(step, opt_a, opt_b)`` runs before every step (schedulers).
    ``device``: where the params (drawn on the CPU, so every device sees the same
    values) and their grads live."""
    assert steps >= 1
    none_grads = NONE_GRADS if none_grads is None else none_grads
    if params is None:
        params = [p.detach().to(device).requires_grad_(True) for p in make_params(dtype, seed, shapes)]
    base = params
    params_a, params_b = clone_params(base), clone_params(base)
    opt_a = make_a(param_groups(params_a, second_group, split))
    opt_b = make_b(param_groups(params_b, second_group, split))
    for step in range(steps):
        grads = [g.to(p.device) for g, p in zip(make_grads([p.detach().cpu() for p in base], step, seed, grad_scale), base)]
        none = none_grads.get(step, ())
        if before_step is not None:
            before_step(step, opt_a, opt_b)
        set_grads(params_a, grads, none)
        set_grads(params_b, grads, none)
        opt_a.step()
        opt_b.step()
    return PairRun(params_a, opt_a, params_b, opt_b, clone_params(base))


def run_one(make: Callable[[list], torch.optim.Optimizer], **kwargs):
    """Runs one optimizer like run_pair (returns (params, optimizer))."""
    run = run_pair(make, make, **kwargs)
    return run.params_a, run.opt_a


def states_of(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> List[dict]:
    """The optimizer state of each param, in param order ({} when it has none)."""
    return [dict(opt.state[p]) if p in opt.state else {} for p in params]


def snapshot(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
    """Deep copies of params and of every state value (to check a failed step
    wrote nothing)."""
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy({i: states_of(opt, params)[i] for i in range(len(params))}),
    )


def assert_unchanged(before, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Bitwise comparison against a ``snapshot`` (NaN-aware, dtype-exact)."""
    params_before, states_before = before
    for i, (old, p) in enumerate(zip(params_before, params)):
        assert p.dtype == old.dtype and p.shape == old.shape
        assert torch.equal(p.detach(), old) or _equal_nan(p.detach(), old), f"param {i} was written"
    states_now = states_of(opt, params)
    for i, old_state in states_before.items():
        new_state = states_now[i]
        assert set(new_state) == set(old_state), f"state keys of param {i} changed"
        for key, old in old_state.items():
            new = new_state[key]
            if isinstance(old, torch.Tensor):
                assert new.dtype == old.dtype and new.shape == old.shape, f"state[{i}][{key!r}]"
                assert _equal_nan(new, old), f"state[{i}][{key!r}] was written"
            else:
                assert new == old, f"state[{i}][{key!r}] was written"


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(torch.all((a == b) | both_nan))


def assert_state_close(states_a: List[dict], states_b: List[dict], keys: Optional[Sequence[str]] = None,
                       **tol) -> None:
    """Compares optimizer states param by param: same keys (restricted to
    ``keys`` when given) and close tensors.  ``step`` is compared as a value."""
    assert len(states_a) == len(states_b)
    for i, (sa, sb) in enumerate(zip(states_a, states_b)):
        ka = set(sa) if keys is None else set(sa) & set(keys)
        kb = set(sb) if keys is None else set(sb) & set(keys)
        assert ka == kb, f"param {i}: state keys {sorted(ka)} != {sorted(kb)}"
        for key in sorted(ka):
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb), f"param {i}: step {float(va)} != {float(vb)}"
                continue
            torch.testing.assert_close(va, vb, msg=lambda m, i=i, key=key: f"param {i} state {key!r}: {m}", **tol)


def assert_params_close(params_a, params_b, **tol) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, i=i: f"param {i}: {m}", **tol)


def assert_run_close(run: PairRun, keys: Optional[Sequence[str]] = None, **tol) -> None:
    """Params and states of both optimizers of a run agree."""
    assert_params_close(run.params_a, run.params_b, **tol)
    assert_state_close(run.states_a(), run.states_b(), keys=keys, **tol)


def assert_moved(run: PairRun) -> None:
    """Guards against vacuous comparisons: the optimizer actually changed most
    elements (low-precision elements may round back to where they started, so
    not every single one is required to move)."""
    changed = sum(int((p.detach() != b.detach()).sum()) for p, b in zip(run.params_a, run.initial))
    total = sum(p.numel() for p in run.params_a)
    assert changed > total // 2, f"only {changed} of {total} param elements were updated"


def raises_naming(exc, fn, *fragments):
    """``fn()`` raises ``exc`` whose message matches every regex of ``fragments``
    (case-insensitive); returns the message."""
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message, re.IGNORECASE), f"{fragment!r} not in {message!r}"
    return message


@contextlib.contextmanager
def hang_guard(seconds: float = 5.0):
    """Turns a hang (e.g. an endless loop in step()) into a test failure instead
    of stalling the whole suite.  Not a timing assertion: the limit is far above
    what the guarded code needs."""
    def _expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the call hangs")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------
# CPU kernel instruction sets
# ---------------------------------------------------------------------------

def _available_capabilities() -> List[str]:
    caps = ["default"]
    for name in ("avx2", "avx512", "avx512_bf16"):
        try:
            torch.ops.amos_fused.set_cpu_capability(name)
            caps.append(name)
        except Exception:  # this CPU (or build) has no such path
            pass
        finally:
            torch.ops.amos_fused.set_cpu_capability("best")
    return caps


CPU_CAPABILITIES = _available_capabilities()


@pytest.fixture(params=CPU_CAPABILITIES)
def capabilities(request):
    """Forces the CPU kernels onto one instruction set for the test, then
    restores 'best'."""
    name = request.param
    torch.ops.amos_fused.set_cpu_capability(name)
    try:
        assert torch.ops.amos_fused.cpu_capability() == name
        yield name
    finally:
        torch.ops.amos_fused.set_cpu_capability("best")


# ---------------------------------------------------------------------------
# Threads: the fused kernels split big buckets over threads (and combine per-tensor
# reductions chunk by chunk), so they run with at least two; everything else (the
# eager reference, grads, comparisons) can run on one thread, which on a busy
# 2-core machine saves ~10-100 ms per small eager op and changes no result.
# ---------------------------------------------------------------------------
KERNEL_THREADS = max(2, torch.get_num_threads())


@pytest.fixture
def one_thread_outside_the_kernels():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def num_threads(n: int):
    """torch.set_num_threads(n) inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_threads(opt, threads=KERNEL_THREADS):
    """Makes ``opt.step`` run with ``threads`` intra-op threads."""
    step = opt.step

    def wrapped(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return step(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    opt.step = wrapped
    return opt


def assert_captured_steps_replay_like_eager(cls, kwargs: dict, backend: str, model: Callable[[], List[torch.Tensor]],
                                            replays: int = 10) -> None:
    """torch's capturable semantics on a CUDA device: ``replays`` eager steps of
    ``cls(model(), capturable=True, backend=backend, **kwargs)`` with a changing lr
    (a device tensor) equal one step captured in a CUDA graph (after a warm-up step
    on a side stream, undone) and replayed as often with the same grads and lrs."""
    grads = [[torch.randn(p.shape, device="cuda") for p in model()] for _ in range(replays)]
    lrs = [1e-3 * (1 + i) for i in range(replays)]

    eager = model()
    lr = torch.tensor(lrs[0], device="cuda")
    opt = cls(eager, lr=lr, capturable=True, backend=backend, **kwargs)
    for i in range(replays):
        lr.fill_(lrs[i])
        for p, g in zip(eager, grads[i]):
            p.grad = g.clone()
        opt.step()

    captured = model()
    lr = torch.tensor(lrs[0], device="cuda")
    opt = cls(captured, lr=lr, capturable=True, backend=backend, **kwargs)
    static = [torch.zeros_like(p) for p in captured]
    for p, s in zip(captured, static):
        p.grad = s
    initial = [p.detach().clone() for p in captured]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (tables, compiles, states) on zero grads, undone below
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, w in zip(captured, initial):
            p.copy_(w)
        for p in captured:
            for value in opt.state[p].values():
                value.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(replays):
        lr.fill_(lrs[i])
        for s, g in zip(static, grads[i]):
            s.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)
        assert float(opt.state[a]["step"]) == float(replays)


def assert_grad_scaler_steps_do_not_sync(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                                         steps: int = 3) -> None:
    """Steps ``opt`` under torch.amp.GradScaler on a CUDA device; every step after
    the first (which builds tables and states) runs under
    set_sync_debug_mode('error'), which raises on any synchronizing call."""
    scaler = torch.amp.GradScaler("cuda")
    for step in range(steps):
        loss = sum((p.float() ** 2).sum() for p in params)
        scaler.scale(loss).backward()
        if step == 0:
            scaler.step(opt)
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
