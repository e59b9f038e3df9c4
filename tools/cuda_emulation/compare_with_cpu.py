"""Runs the CUDA ops under host emulation (build_emulated_ops.py) and compares them
with the CPU ops on the same inputs: every algorithm, every storage dtype, every Amos kernel
path (elementwise, warp rows, block rows, long rows, general layouts), misaligned
params, GradScaler inputs, the step's telemetry output (group "telemetry"),
bfloat16 params stored with stochastic rounding (group "stochastic_round"), the
step op with block-scaled FP8 states (group "fp8"), the capturable step op
(group "capturable": coefficients computed by torch ops, found_inf read by the
kernels), and the
cached device tables (grads at new addresses, a param moved, a sub-bucket, a changed
layout, another stream, per-tensor step counts).  Checks logic only: no timing, memory model or real-device behaviour.

    python tools/cuda_emulation/compare_with_cpu.py [group ...]   # groups: see GROUPS

Needs amos_fused built (the CPU ops) and a C++20 compiler; takes a few minutes
(each emulated block runs as 256 host threads).
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # this folder, the repository
import amos_fused  # noqa: E402,F401  (the CPU ops)
import build_emulated_ops  # noqa: E402
from amos_fused import capturable  # noqa: E402
from amos_fused.contracts import call_capturable_step, call_step, hyper_values  # noqa: E402

EMU, CPU = None, torch.ops.amos_fused
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FAILURES = []

# Tolerances: same inputs, same math (step_math.h); only summation order, FMA
# contraction and per-step rounding of narrow storage differ.
TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (2e-6, 1e-6),
       torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def tensors(shapes, dtype, seed, misaligned=()):
    """Seeded tensors; those at the indices in `misaligned` are views one element into a buffer."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if i in misaligned:
            buffer = torch.empty(t.numel() + 1, dtype=dtype)
            buffer[1:] = t.reshape(-1)
            t = buffer[1:].view(shape)
        out.append(t)
    return out


def clone(ts):
    return [t.clone() for t in ts]


def zeros(ts):
    return [torch.zeros_like(t) for t in ts]


def counters(values):
    return [torch.tensor(float(v)) for v in values]


def compare(what, emulated, cpu, dtype):
    """Lists of lists of tensors, elementwise: |a − c| <= rtol·|c| + atol·max|c|."""
    rtol, atol = TOL[dtype]
    for list_e, list_c in zip(emulated, cpu):
        for i, (a, c) in enumerate(zip(list_e, list_c)):
            if c.numel() == 0:
                continue
            scale = max(float(c.double().abs().max()), 1e-30)
            try:
                torch.testing.assert_close(a.double(), c.double(), rtol=rtol, atol=atol * scale)
            except AssertionError as error:
                FAILURES.append(f"{what}: tensor {i} {tuple(c.shape)}: {str(error)[:400]}")
                return


SHAPES = [(), (0,), (37, 5), (1000,), (3, 1, 7), (19,), (4, 16), (10001,), (1,)]


def adam_hyper(weight_decay, decoupled, amsgrad, bias_correction):
    return dict(lr=1e-2, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay,
                decoupled=decoupled,
                amsgrad=amsgrad, bias_correction=bias_correction)


def amos_hyper(lr, momentum, clip, extra_l2):
    return dict(lr=lr, beta=0.99, momentum=momentum or 0.0, clip_value=clip or 0.0, extra_l2=extra_l2,
                d_coef=0.25, c_coef=0.25, epsilon=2.0**-125, use_momentum=momentum is not None,
                clip=clip is not None)


def group_adam():
    for dtype, amsgrad, wd, decoupled, bc in itertools.product(
            DTYPES, [False, True], [0.0, 0.1], [True, False], [True, False]):
        start = tensors(SHAPES, dtype, 1, misaligned=(3,))
        results = []
        for ops in (EMU, CPU):
            p, m, v, vmax, steps = clone(start), zeros(start), zeros(start), zeros(start), counters([0] * len(start))
            for step in range(3):
                call_step(ops, "adam", p, tensors(SHAPES, dtype, 100 + step),
                          {"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}, steps,
                          adam_hyper(wd, decoupled, amsgrad, bc))
            results.append([p, m, v, vmax, steps])
        compare(f"adam {dtype} amsgrad={amsgrad} wd={wd} decoupled={decoupled} bc={bc}", *results, dtype)


def group_radam_lion():
    for dtype, wd, decoupled in itertools.product(DTYPES, [0.0, 0.1], [True, False]):
        start = tensors(SHAPES, dtype, 2)
        results = []
        for ops in (EMU, CPU):
            p, m, v, steps = clone(start), zeros(start), zeros(start), counters([0] * len(start))
            for step in range(7):  # threshold 4: both branches
                call_step(ops, "radam", p, tensors(SHAPES, dtype, 200 + step), {"exp_avg": m, "exp_avg_sq": v},
                          steps, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                                      decoupled=decoupled, rectify_threshold=4.0))
            results.append([p, m, v, steps])
        compare(f"radam {dtype} wd={wd} decoupled={decoupled}", *results, dtype)
    for dtype in DTYPES:
        start = tensors(SHAPES, dtype, 3)
        results = []
        for ops in (EMU, CPU):
            p, m, steps = clone(start), zeros(start), counters([0] * len(start))
            for step in range(3):
                call_step(ops, "lion", p, tensors(SHAPES, dtype, 300 + step), {"exp_avg": m}, steps,
                          dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3), (),
                          torch.tensor(4.0), torch.tensor(0.0))
            results.append([p, m, steps])
        compare(f"lion {dtype}", *results, dtype)


def group_norm_scaled():
    shapes = SHAPES + [(70000,)]
    for dtype, lamb in itertools.product(DTYPES, [False, True]):
        start = tensors(shapes, dtype, 4, misaligned=(2,))
        norms = [1.0 + i for i in range(len(start))]
        results = []
        for ops in (EMU, CPU):
            p, m, v, steps = clone(start), zeros(start), zeros(start), counters([0] * len(start))
            for step in range(3):
                grads = tensors(shapes, dtype, 400 + step)
                moments = {"exp_avg": m, "exp_avg_sq": v}
                if lamb:
                    call_step(ops, "lamb", p, grads, moments, steps, dict(
                        lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, bias_correction=True))
                else:
                    call_step(ops, "scaled_adam", p, grads, moments, steps, dict(
                        lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, p=2.0, inverse_time=False, q=0.5), norms)
            results.append([p, m, v, steps])
        compare(f"{'lamb' if lamb else 'scaled_adam'} {dtype}", *results, dtype)


def slot_of(p, axes):
    if axes is None:
        return torch.zeros_like(p)
    if axes == "all":
        return torch.zeros((), dtype=p.dtype)
    return torch.zeros([1 if d in axes else n for d, n in enumerate(p.shape)], dtype=p.dtype)


# reduce_axes -> shapes covering every kernel path in every dtype
AMOS_LAYOUTS = {
    None: [(), (0,), (1,), (37,), (10001,), (3, 1, 7), (4, 16)],
    "all": [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (64, 130), (3, 9000), (20000,)],
    (1,): [(37, 5), (4, 16), (3, 1, 7), (0, 5), (1, 33), (33, 1), (50, 1000), (20, 3000), (3, 9000),
           (7, 5003), (300, 8), (9, 2048), (4, 300, 5)],
    (0,): [(37, 5), (4, 16), (1, 9), (9, 1), (0, 5), (300, 7), (1000, 3), (600, 2)],
    (0, 2): [(3, 4, 5), (5, 3, 17), (0, 3, 4), (40, 2, 9), (2, 300, 3), (40, 3, 17)],
}


def group_amos():
    for (axes, shapes), dtype, momentum, clip in itertools.product(
            AMOS_LAYOUTS.items(), DTYPES, [None, 0.9], [None, 0.5]):
        if dtype == torch.float16 and (momentum is None) != (clip is None):
            continue
        start = tensors(shapes, dtype, 5, misaligned=(1,) if axes != (0, 2) else ())
        etas = [0.3 + 0.1 * i for i in range(len(start))]
        results = []
        for ops in (EMU, CPU):
            p = clone(start)
            v, b = [slot_of(x, axes) for x in p], [slot_of(x, axes) for x in p]
            mu, steps = zeros(p) if momentum else [], counters([0] * len(p))
            for step in range(3):
                call_step(ops, "amos", p, tensors(shapes, dtype, 500 + step), {"v": v, "b": b, "mu": mu}, steps,
                          amos_hyper(0.3 * 0.9**step, momentum, clip, 0.01), etas,
                          torch.tensor(2.0) if step == 1 else None)
            results.append([p, v, b, mu, steps])
        compare(f"amos {axes} {dtype} momentum={momentum} clip={clip}", *results, dtype)


def group_cache():
    dtype = torch.float32
    shapes = [(37, 5), (), (1000,), (64, 33), (0,), (5000,)]
    start = tensors(shapes, dtype, 7)
    results = []
    for ops in (EMU, CPU):
        p, m, v, vmax = clone(start), zeros(start), zeros(start), zeros(start)
        steps = counters([0, 5, 5, 2, 0, 9])  # lagging counters: several coefficient sets
        kept = []
        for step in range(9):
            grads = tensors(shapes, dtype, 700 + step)
            kept.append(grads)  # grads at new addresses every step
            if step == 3:  # a middle param moves (same first and last address)
                p[3] = p[3].clone()
            if ops is EMU:
                ops.emu_set_stream(1 if step == 7 else 0)  # another stream: a fresh table
            if step == 5:  # a sub-bucket (another key), then the whole bucket again
                call_step(ops, "adam", p[:3], grads[:3], {"exp_avg": m[:3], "exp_avg_sq": v[:3]}, steps[:3],
                          adam_hyper(0.1, True, False, True))
                continue
            amsgrad = step in (2, 6)  # the same bucket with another layout (5 arrays)
            call_step(ops, "adam", p, grads, {"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}, steps,
                      dict(adam_hyper(0.1, True, amsgrad, True), lr=1e-2 * (1 + step)))
        results.append([p, m, v, vmax, steps])
    compare("cache adam", *results, dtype)
    shapes = [(37, 5), (300, 7), (3, 9000), (50, 1000)]
    for axes in ((1,), (0,)):  # per-tensor η and steps: coefficients that do not fold
        start = tensors(shapes, dtype, 8)
        results = []
        for ops in (EMU, CPU):
            p = clone(start)
            v, b = [slot_of(x, axes) for x in p], [slot_of(x, axes) for x in p]
            steps = counters([3, 3, 0, 1])
            for step in range(4):
                call_step(ops, "amos", p, tensors(shapes, dtype, 800 + step), {"v": v, "b": b}, steps,
                          amos_hyper(0.2, None, None, 0.0), [0.5, 0.5, 0.7, 0.2])
            results.append([p, v, b, steps])
        compare(f"cache amos {axes}", *results, dtype)


# Telemetry (the step's [n, 2] float64 output of Σθ², Σ(Δθ)² per param):
# * against float64 sums of the emulated run's own params before and after the
#   step: the same stored values, only the summation differs (per-thread opmath
#   sums of at most a few hundred terms, then double): rtol TELEMETRY_SELF_RTOL;
# * against the CPU op's telemetry, which steps its own params (a few ULP apart,
#   see TOL) and sums in other blocks (4096 elements, SIMD lanes): Σθ² is a sum of
#   O(1) terms, so a few ULP; Σ(Δθ)² sums differences θ_after − θ_before ~ lr·θ, in
#   which one ULP of θ is ~1/lr times larger relatively, and in bfloat16 an
#   element whose rounding flips changes its Δθ by a whole storage ULP:
#   rtol TELEMETRY_CPU_RTOL[dtype] = (Σθ², Σ(Δθ)²).  Seen on these inputs: ≤ 5.3e-7,
#   3.9e-6 in float32 and ≤ 4.3e-6, 6.6e-6 in bfloat16;
# * two emulated runs: bitwise equal; the params and states of the telemetry run
#   bitwise equal to a run without telemetry, and close to the CPU run (TOL);
# * a step skipped by found_inf: Σ(Δθ)² = 0, Σθ² untouched; an empty bucket: zeros.
TELEMETRY_SELF_RTOL = 1e-5
TELEMETRY_CPU_RTOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 1e-3)}


def telemetry_cases():
    """(name, algorithm, shapes, state names, hyper(step), per_tensor, slot axes) of every kernel variant."""
    adam_shapes = SHAPES
    for amsgrad, decoupled in itertools.product([False, True], [True, False]):
        yield (f"adam amsgrad={amsgrad} decoupled={decoupled}", "adam", adam_shapes,
               ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else []),
               lambda step, a=amsgrad, d=decoupled: adam_hyper(0.1, d, a, True), (), None)
    for decoupled in (True, False):
        yield (f"radam decoupled={decoupled}", "radam", SHAPES, ["exp_avg", "exp_avg_sq"],
               lambda step, d=decoupled: dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                              decoupled=d, rectify_threshold=4.0), (), None)
    yield ("lion", "lion", SHAPES, ["exp_avg"],
           lambda step: dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3), (), None)
    norm_shapes = SHAPES + [(70000,)]
    yield ("scaled_adam", "scaled_adam", norm_shapes, ["exp_avg", "exp_avg_sq"],
           lambda step: dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, p=2.0, inverse_time=False, q=0.5),
           [1.0 + i for i in range(len(norm_shapes))], None)
    yield ("lamb", "lamb", norm_shapes, ["exp_avg", "exp_avg_sq"],
           lambda step: dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, bias_correction=True),
           (), None)
    for (axes, shapes), momentum in itertools.product(AMOS_LAYOUTS.items(), [None, 0.9]):
        yield (f"amos {axes} momentum={momentum}", "amos", shapes, ["v", "b"] + (["mu"] if momentum else []),
               lambda step, m=momentum: amos_hyper(0.3 * 0.9**step, m, 0.5, 0.01),
               [0.3 + 0.1 * i for i in range(len(shapes))], axes)


def telemetry_run(ops, algorithm, shapes, names, hyper, per_tensor, axes, dtype, track, steps=3,
                  skip_last=False, round_keys=None, nan_at=None):
    """A few steps from seeded tensors; returns (params, states, steps, [telemetry per step],
    [float64 sums of each step's own before/after params]).  round_keys: stochastic
    rounding; nan_at: (tensor, element) of a param made NaN before the first step."""
    p = tensors(shapes, dtype, 9, misaligned=(1,) if axes != (0, 2) else ())
    if nan_at is not None:
        p[nan_at[0]].view(-1)[nan_at[1]] = float("nan")
    state = {name: ([slot_of(x, axes) for x in p] if name in ("v", "b") else zeros(p)) for name in names}
    counts = counters([0] * len(p))
    tables, own = [], []
    for step in range(steps):
        before = clone(p)
        table = torch.full((len(p), 2), float("nan"), dtype=torch.float64) if track else None
        skip = skip_last and step == steps - 1
        call_step(ops, algorithm, p, tensors(shapes, dtype, 900 + step), state, counts, hyper(step), per_tensor,
                  None, torch.tensor(1.0) if skip else None, table, round_keys)
        tables.append(table)
        own.append(torch.tensor([[x.double().square().sum().item(), (x.double() - b.double()).square().sum().item()]
                                 for x, b in zip(p, before)], dtype=torch.float64).reshape(len(p), 2))
    return p, [state[name] for name in names], counts, tables, own


def close_rows(what, actual, expected, rtols):
    """Column-wise |a − e| <= rtol·|e| (+ a floor of 1e-300 for zero sums)."""
    for column, rtol in enumerate(rtols):
        try:
            torch.testing.assert_close(actual[:, column], expected[:, column], rtol=rtol, atol=1e-300)
        except AssertionError as error:
            FAILURES.append(f"{what}: column {column}: {str(error)[:400]}")


def group_telemetry():
    worst = {}
    for (name, algorithm, shapes, names, hyper, per_tensor, axes), dtype in itertools.product(
            telemetry_cases(), [torch.float32, torch.bfloat16]):
        what = f"telemetry {name} {dtype}"
        args = (algorithm, shapes, names, hyper, per_tensor, axes, dtype)
        first = telemetry_run(EMU, *args, track=True)
        second = telemetry_run(EMU, *args, track=True)
        untracked = telemetry_run(EMU, *args, track=False)
        cpu = telemetry_run(CPU, *args, track=True)
        for step, (a, b, own, c) in enumerate(zip(first[3], second[3], first[4], cpu[3])):
            if not torch.equal(a, b):
                FAILURES.append(f"{what}: step {step}: two emulated runs differ: {a.tolist()} vs {b.tolist()}")
            close_rows(f"{what}: step {step}: against its own params", a, own, [TELEMETRY_SELF_RTOL] * 2)
            close_rows(f"{what}: step {step}: against the CPU op", a, c, TELEMETRY_CPU_RTOL[dtype])
            relative = ((a - c).abs() / c.abs().clamp_min(1e-300)).max(dim=0).values
            worst[dtype] = torch.maximum(worst.get(dtype, torch.zeros(2, dtype=torch.float64)), relative)
        for x, y in zip([first[0]] + first[1], [untracked[0]] + untracked[1]):
            if not all(torch.equal(u, v) for u, v in zip(x, y)):
                FAILURES.append(f"{what}: params or states differ bitwise from the run without telemetry")
                break
        compare(f"{what}: params and states", [first[0]] + first[1] + [first[2]], [cpu[0]] + cpu[1] + [cpu[2]],
                dtype)
    for dtype, relative in worst.items():
        print(f"  telemetry {dtype}: largest relative difference from the CPU op: "
              f"Σθ² {relative[0]:.2e}, Σ(Δθ)² {relative[1]:.2e}")
    # found_inf: the skipped last step writes Σ(Δθ)² = 0 and leaves Σθ² unwritten (nan).
    for name, algorithm, shapes, names, hyper, per_tensor, axes in telemetry_cases():
        if name not in ("adam amsgrad=False decoupled=True", "lamb", "amos (1,) momentum=0.9"):
            continue
        tables = telemetry_run(EMU, algorithm, shapes, names, hyper, per_tensor, axes, torch.float32, track=True,
                               steps=2, skip_last=True)[3]
        last = tables[-1]
        if not (torch.all(last[:, 1] == 0) and torch.all(last[:, 0].isnan())):
            FAILURES.append(f"telemetry {name}: a step skipped by found_inf wrote {last.tolist()}")
    # A bucket of empty tensors: no block runs, the rows are zeros.
    for name, algorithm, _, names, hyper, per_tensor, axes in telemetry_cases():
        if name not in ("adam amsgrad=True decoupled=False", "lion", "scaled_adam", "amos None momentum=None"):
            continue
        empty = [(0,), (0, 3)]
        tables = telemetry_run(EMU, algorithm, empty, names, hyper, [1.0, 1.0] if per_tensor else (), axes,
                               torch.float32, track=True, steps=1)[3]
        if not torch.equal(tables[0], torch.zeros(2, 2, dtype=torch.float64)):
            FAILURES.append(f"telemetry {name}: a bucket of empty tensors wrote {tables[0].tolist()}")


# Stochastic rounding (bfloat16 params, csrc/stochastic_round.h; the CUDA kernels'
# ROUND variants, csrc/cuda/param_rounding.cuh), for every kernel variant of
# telemetry_cases() (misaligned params included), against the CPU op with the
# same round_keys:
# * elementwise rules (adam, radam, lion, Amos with a slot per element): the float32
#   results are the same (step_math.h, one rounding per operation), so the bits
#   drawn give bitwise-equal params;
# * rules that reduce over several elements (scale-aware Adam and LAMB norms, Amos
#   slots over rows or other axes): the sums are ordered differently, a float32
#   result may differ in its last bits and round to the other neighbour.  Stepped
#   in lockstep (each step from the CPU op's params and states, copied into the
#   emulated run's tensors): every param equal or a neighbouring bfloat16 value —
#   or, where the update cancels most of θ (a result far smaller than θ before the
#   step), within SR_CANCEL_ULPS float32 ulps of |θ before| (the float32 results'
#   own difference, now many of the small result's bfloat16 steps) — and at
#   most SR_DIFFER_FRACTION of them differing over the bucket.  (Run freely, a
#   differing element keeps its absolute difference while Amos's decay shrinks θ,
#   so it can end several of the smaller binade's steps apart: close within TOL);
# * states (stored round-to-nearest) close to the CPU's (TOL); two emulated runs
#   bitwise equal; the run differs from the same run without round_keys (the
#   rounding happened); with telemetry, the params bitwise those of the run without
#   it and the sums those of its own (rounded) stored params;
# * a NaN param stays NaN, and the NaNs are where the CPU op has them.
SR_DIFFER_FRACTION = 1e-3
SR_CANCEL_ULPS = 8
SR_SEED = 0x5EED1234  # key_hi of every key; key_lo = the param's index


def sr_keys(count):
    return [(SR_SEED << 32) | i for i in range(count)]


def bf16_ordered(t):
    """bfloat16 bit patterns as integers in the order of the values (±0 both 0)."""
    bits = t.contiguous().view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def sr_elementwise(algorithm, axes):
    return algorithm in ("adam", "radam", "lion") or (algorithm == "amos" and axes is None)


def sr_lockstep(algorithm, shapes, names, hyper, per_tensor, axes, keys, steps=3):
    """Steps the emulated and the CPU op from the same params and states each step;
    returns (elements differing, elements, largest distance in bfloat16 steps of
    those not within SR_CANCEL_ULPS float32 ulps of |θ before the step|)."""
    runs = []
    for _ in (EMU, CPU):
        p = tensors(shapes, torch.bfloat16, 9, misaligned=(1,) if axes != (0, 2) else ())
        state = {name: ([slot_of(x, axes) for x in p] if name in ("v", "b") else zeros(p)) for name in names}
        runs.append((p, state, counters([0] * len(p))))
    differ = total = gap_max = 0
    for step in range(steps):
        (p_e, state_e, counts_e), (p_c, state_c, counts_c) = runs
        for x, y in zip(p_e + [t for name in names for t in state_e[name]] + counts_e,
                        p_c + [t for name in names for t in state_c[name]] + counts_c):
            x.copy_(y)
        grads = tensors(shapes, torch.bfloat16, 900 + step)
        before = clone(p_c)
        for ops, (p, state, counts) in zip((EMU, CPU), runs):
            call_step(ops, algorithm, p, grads, state, counts, hyper(step), per_tensor, None, None, None, keys)
        for a, c, b in zip(p_e, p_c, before):
            if c.numel() == 0:
                continue
            gap = (bf16_ordered(a) - bf16_ordered(c)).abs()
            cancelled = (a.float() - c.float()).abs() <= SR_CANCEL_ULPS * 2.0**-23 * b.float().abs()
            gap_max = max(gap_max, int(torch.where(cancelled, 0, gap).max()))
            differ += int((gap != 0).sum())
            total += c.numel()
    return differ, total, gap_max


def group_stochastic_round():
    dtype = torch.bfloat16
    worst = {}
    for name, algorithm, shapes, names, hyper, per_tensor, axes in telemetry_cases():
        what = f"stochastic_round {name}"
        keys = sr_keys(len(shapes))
        args = (algorithm, shapes, names, hyper, per_tensor, axes, dtype)
        first = telemetry_run(EMU, *args, track=False, round_keys=keys)
        second = telemetry_run(EMU, *args, track=False, round_keys=keys)
        cpu = telemetry_run(CPU, *args, track=False, round_keys=keys)
        nearest = telemetry_run(EMU, *args, track=False)
        for x, y in zip([first[0]] + first[1], [second[0]] + second[1]):
            if not all(torch.equal(u, v) for u, v in zip(x, y)):
                FAILURES.append(f"{what}: two emulated runs differ bitwise")
                break
        if all(torch.equal(u, v) for u, v in zip(first[0], nearest[0])):
            FAILURES.append(f"{what}: the params equal those of round-to-nearest (no rounding?)")
        if sr_elementwise(algorithm, axes):
            for i, (a, c) in enumerate(zip(first[0], cpu[0])):
                if not torch.equal(a, c):
                    differ = int((a != c).sum())
                    FAILURES.append(f"{what}: param {i} {tuple(c.shape)}: {differ} of {c.numel()} elements differ "
                                    "from the CPU op (bitwise expected)")
                    break
            differ, total = 0, sum(c.numel() for c in cpu[0])
        else:
            differ, total, gap = sr_lockstep(algorithm, shapes, names, hyper, per_tensor, axes, keys)
            if gap > 1:
                FAILURES.append(f"{what}: a param {gap} bfloat16 steps from the CPU op's (at most 1 expected)")
            if differ > SR_DIFFER_FRACTION * total:
                FAILURES.append(f"{what}: {differ} of {total} params differ from the CPU op")
            compare(f"{what}: params", [first[0]], [cpu[0]], dtype)
        worst[name] = (differ, total)
        compare(f"{what}: states", first[1] + [first[2]], cpu[1] + [cpu[2]], dtype)
        # Telemetry of the rounded values.
        tracked = telemetry_run(EMU, *args, track=True, round_keys=keys)
        for x, y in zip([tracked[0]] + tracked[1], [first[0]] + first[1]):
            if not all(torch.equal(u, v) for u, v in zip(x, y)):
                FAILURES.append(f"{what}: with telemetry the params or states differ bitwise from the run without")
                break
        for step, (table, own) in enumerate(zip(tracked[3], tracked[4])):
            close_rows(f"{what}: step {step}: telemetry against its own params", table, own,
                       [TELEMETRY_SELF_RTOL] * 2)
        # A NaN param: kept by the rounding, where the CPU op has its NaNs.
        nan_at = (3, 5) if shapes[3] and math.prod(shapes[3]) > 5 else None
        if nan_at is None:
            nan_at = next((i, 0) for i, shape in enumerate(shapes) if math.prod(shape) > 0)
        emu_nan = telemetry_run(EMU, *args, track=False, round_keys=keys, steps=2, nan_at=nan_at)[0]
        cpu_nan = telemetry_run(CPU, *args, track=False, round_keys=keys, steps=2, nan_at=nan_at)[0]
        if not emu_nan[nan_at[0]].view(-1)[nan_at[1]].isnan():
            FAILURES.append(f"{what}: a NaN param was not kept")
        for i, (a, c) in enumerate(zip(emu_nan, cpu_nan)):
            if not torch.equal(a.isnan(), c.isnan()):
                FAILURES.append(f"{what}: param {i}: NaNs where the CPU op has none, or the reverse")
                break
    print("  stochastic_round: params differing from the CPU op in lockstep (one bfloat16 step): "
          + ", ".join(f"{name} {d}/{t}" for name, (d, t) in worst.items() if d))


# FP8 states (the step_fp8 op: csrc/cuda/fp8.cu against csrc/cpu/fp8_ops.cpp;
# the format csrc/fp8_states.h): Adam with decoupled decay, Adam with L2 decay,
# RAdam with L2 decay (into its rectified steps) and Lion under a GradScaler scale, in float32, bfloat16 and float16, from zero states,
# on a tensor of one partial block, one of several blocks with a partial last one,
# a transposed (dense, not contiguous) param, a misaligned param and misaligned codes
# (the element-by-element path), 0- and 1-element tensors, and a bucket of 120 small
# and empty tensors (the table's tensor per 64 blocks and the search from it).  Both sides
# compute the same float32 values (step_math.h's update, fp8_states.h's decode and
# encode; the host build contracts no a·b + c), so params, codes and absmax must be
# bitwise equal (NaN where NaN), free-running over FP8_STEPS steps, and nothing
# outside the tensors written (guard values around each).  Also: a NaN param (it
# stays NaN) and an inf grad (its block: absmax NaN, codes 0), telemetry
# (two runs bitwise equal, close to its own params and to the CPU op's sums, which
# add in another order; params and states bitwise those of the run without),
# stochastic rounding (bitwise the CPU op's; not round-to-nearest), found_inf (Σ(Δθ)²
# = 0, nothing moved) and an empty bucket (zero telemetry).
FP8_STEPS = 3
FP8_CONFIGS = {
    "adamw": ("adam", adam_hyper(0.1, True, False, True), None),
    "adam-l2": ("adam", adam_hyper(0.1, False, False, True), None),
    "lion-scaled": ("lion", dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3), 4.0),
    "radam-l2": ("radam", dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=0.0,
                               rectify_threshold=5.0), None),
}
# RAdam runs 7 steps: its update is rectified from step 6 (β2 = 0.99: ρ_t > 5).
FP8_CONFIG_STEPS = {"radam-l2": 7}
FP8_SHAPES = [(37, 5), (0,), (), (10001,), (33, 64), (4096,), (300,), (1,)]


# Every tensor of the group is a view into a buffer with FP8_GUARD elements of a
# fill value on each side (FP8_FILL: large, so a block that reads past its tensor
# gets another absmax; a write past it changes the fill): fp8_guards_intact.
FP8_GUARD = 64
FP8_FILL = {"param": 1000.0, "codes": 0x7E, "absmax": -1.0}


def fp8_guarded(values, fill, misalign=0):
    """values (contiguous) copied into a view into a buffer of `fill` around it."""
    flat = values.reshape(-1)
    start = FP8_GUARD + misalign
    buffer = torch.full((flat.numel() + start + FP8_GUARD,), fill, dtype=values.dtype)
    buffer[start:start + flat.numel()] = flat
    return buffer[start:start + flat.numel()].view(values.shape)


def fp8_guards_intact(ts, fill):
    for t in ts:
        inner = torch.zeros(t._base.numel(), dtype=torch.bool)
        inner[t.storage_offset():t.storage_offset() + t.numel()] = True
        if not bool((t._base[~inner] == fill).all()):
            return False
    return True


def fp8_layouts(shapes):
    """make(dtype, seed): seeded guarded tensors of `shapes`; the one at 4 transposed
    (dense, not contiguous), the one at 5 misaligned by an element."""
    def make(dtype, seed):
        out = [fp8_guarded(t, FP8_FILL["param"], int(i == 5)) for i, t in enumerate(tensors(shapes, dtype, seed))]
        if len(out) > 4:
            out[4] = out[4].t()
        return out
    return make


def fp8_many_shapes():
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(0, 700, (120,), generator=gen).tolist()
    sizes[::9] = [0] * len(sizes[::9])  # empty tensors own no block
    sizes[4::20] = [256] * len(sizes[4::20])
    return [(n,) for n in sizes] + [(70, 300)]


def fp8_state(params, count):
    """Zero guarded codes (the param's layout; tensor 3's misaligned by a byte) and absmax, key-major."""
    codes, absmax = [], []
    for _ in range(count):
        for i, p in enumerate(params):
            transposed = not p.is_contiguous()  # fp8_layouts' tensor 4
            zeros = torch.zeros(p.t().shape if transposed else p.shape, dtype=torch.uint8)
            c = fp8_guarded(zeros, FP8_FILL["codes"], int(i == 3))
            codes.append(c.t() if transposed else c)
            absmax.append(fp8_guarded(torch.zeros((p.numel() + 255) // 256), FP8_FILL["absmax"]))
    return codes, absmax


def fp8_run(ops, config, make, dtype, steps=None, track=False, round_keys=None, skip_last=False,
            nonfinite=False):
    """Steps from seeded params and zero states; returns (params, codes, absmax, step
    counters, [telemetry per step], [float64 sums of each step's own params])."""
    algorithm, hyper, scale = FP8_CONFIGS[config]
    steps = FP8_CONFIG_STEPS.get(config, FP8_STEPS) if steps is None else steps
    params = make(dtype, 9)
    if nonfinite:
        params[3].view(-1)[5] = float("nan")
    codes, absmax = fp8_state(params, 1 if algorithm == "lion" else 2)
    counts = counters([0] * len(params))
    tables, own = [], []
    for step in range(steps):
        grads = make(dtype, 100 + step)
        if nonfinite and step == 0:
            grads[4][7, 3] = float("inf")
        before = clone(params)
        table = torch.full((len(params), 2), float("nan"), dtype=torch.float64) if track else None
        skip = torch.tensor(1.0) if skip_last and step == steps - 1 else None
        ops.step_fp8(algorithm, params, grads, codes, absmax, counts, hyper_values(algorithm, hyper),
                     None if scale is None else torch.tensor(scale), skip, table,
                     None if round_keys is None else list(round_keys), None, None, None)
        # (no low_params; no full-precision states or per-tensor values: Amos8bit has no CUDA kernel)
        tables.append(table)
        own.append(torch.tensor([[x.double().square().sum().item(), (x.double() - b.double()).square().sum().item()]
                                 for x, b in zip(params, before)], dtype=torch.float64).reshape(len(params), 2))
    return params, codes, absmax, counts, tables, own


def fp8_bits(t):
    """t's bit patterns (NaN as one pattern), flat."""
    t = t.reshape(-1)
    if not t.is_floating_point():
        return t
    t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t).contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def fp8_equal(what, a, b):
    """Lists of tensors bitwise equal (NaN where NaN); records the first difference."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(fp8_bits(x), fp8_bits(y)):
            differ = int((fp8_bits(x) != fp8_bits(y)).sum()) if x.shape == y.shape else -1
            FAILURES.append(f"{what}: tensor {i} {tuple(y.shape)}: {differ} of {y.numel()} elements differ")
            return False
    return True


def group_fp8():
    cases = [(config, dtype, "mixed", fp8_layouts(FP8_SHAPES))
             for config, dtype in itertools.product(FP8_CONFIGS, [torch.float32, torch.bfloat16, torch.float16])]
    cases += [("adamw", torch.float32, "many", fp8_layouts(fp8_many_shapes())),
              ("lion-scaled", torch.bfloat16, "many", fp8_layouts(fp8_many_shapes()))]
    for config, dtype, name, make in cases:
        what = f"fp8 {config} {dtype} {name}"
        emu, cpu = fp8_run(EMU, config, make, dtype), fp8_run(CPU, config, make, dtype)
        for label, index in (("params", 0), ("codes", 1), ("absmax", 2), ("steps", 3)):
            fp8_equal(f"{what}: {label}", emu[index], cpu[index])
        if not any(bool(c.any()) for c in emu[1]):
            FAILURES.append(f"{what}: every code is 0 (no state stored?)")
        for label, index in (("param", 0), ("codes", 1), ("absmax", 2)):
            if not fp8_guards_intact(emu[index], FP8_FILL[label]):
                FAILURES.append(f"{what}: written past a {label} tensor")
    # NaN param, inf grad: their blocks store absmax NaN and codes 0 on both.
    for config in FP8_CONFIGS:
        what = f"fp8 {config} non-finite"
        make = fp8_layouts(FP8_SHAPES)
        emu, cpu = (fp8_run(ops, config, make, torch.float32, nonfinite=True) for ops in (EMU, CPU))
        fp8_equal(f"{what}: params, codes, absmax", emu[0] + emu[1] + emu[2], cpu[0] + cpu[1] + cpu[2])
        if not emu[0][3].view(-1)[5].isnan():
            FAILURES.append(f"{what}: the NaN param turned finite")
        states = len(emu[1]) // len(FP8_SHAPES)  # the inf grad's block: block 0 of tensor 4 (memory order)
        for k in range(states):
            codes, absmax = emu[1][k * len(FP8_SHAPES) + 4], emu[2][k * len(FP8_SHAPES) + 4]
            if not (absmax[0].isnan() and not codes.t().reshape(-1)[:256].any()):
                FAILURES.append(f"{what}: state {k}: the inf grad's block is not absmax NaN with codes 0")
    # Telemetry.
    worst = torch.zeros(2, dtype=torch.float64)
    for config, dtype in itertools.product(FP8_CONFIGS, [torch.float32, torch.bfloat16]):
        what = f"fp8 telemetry {config} {dtype}"
        make = fp8_layouts(FP8_SHAPES)
        first, second = (fp8_run(EMU, config, make, dtype, track=True) for _ in range(2))
        untracked = fp8_run(EMU, config, make, dtype)
        cpu = fp8_run(CPU, config, make, dtype, track=True)
        for step, (a, b, own, c) in enumerate(zip(first[4], second[4], first[5], cpu[4])):
            if not torch.equal(a, b):
                FAILURES.append(f"{what}: step {step}: two emulated runs differ")
            close_rows(f"{what}: step {step}: against its own params", a, own, [TELEMETRY_SELF_RTOL] * 2)
            close_rows(f"{what}: step {step}: against the CPU op", a, c, TELEMETRY_CPU_RTOL[dtype])
            worst = torch.maximum(worst, ((a - c).abs() / c.abs().clamp_min(1e-300)).max(dim=0).values)
        fp8_equal(f"{what}: against the run without telemetry", first[0] + first[1] + first[2],
                  untracked[0] + untracked[1] + untracked[2])
    print(f"  fp8 telemetry: largest relative difference from the CPU op: Σθ² {worst[0]:.2e}, Σ(Δθ)² {worst[1]:.2e}")
    # Stochastic rounding (bfloat16): bitwise the CPU op's params and states.
    for config in FP8_CONFIGS:
        what = f"fp8 stochastic_round {config}"
        make = fp8_layouts(FP8_SHAPES)
        keys = sr_keys(len(FP8_SHAPES))
        emu, again, cpu = (fp8_run(ops, config, make, torch.bfloat16, round_keys=keys) for ops in (EMU, EMU, CPU))
        nearest = fp8_run(EMU, config, make, torch.bfloat16)
        fp8_equal(f"{what}: against the CPU op", emu[0] + emu[1] + emu[2], cpu[0] + cpu[1] + cpu[2])
        fp8_equal(f"{what}: two emulated runs", emu[0] + emu[1], again[0] + again[1])
        if all(torch.equal(a, b) for a, b in zip(emu[0], nearest[0])):
            FAILURES.append(f"{what}: the params equal those of round-to-nearest (no rounding?)")
        tracked = fp8_run(EMU, config, make, torch.bfloat16, track=True, round_keys=keys)
        fp8_equal(f"{what}: with telemetry", tracked[0] + tracked[1], emu[0] + emu[1])
        for step, (table, own) in enumerate(zip(tracked[4], tracked[5])):
            close_rows(f"{what}: step {step}: telemetry against its own params", table, own, [TELEMETRY_SELF_RTOL] * 2)
    # found_inf skips the last step: nothing moves, Σ(Δθ)² = 0, Σθ² left unwritten.
    for config in FP8_CONFIGS:
        make = fp8_layouts(FP8_SHAPES)
        skipped = fp8_run(EMU, config, make, torch.float32, steps=2, track=True, skip_last=True)
        one = fp8_run(EMU, config, make, torch.float32, steps=1)
        fp8_equal(f"fp8 found_inf {config}: a skipped step moved something",
                  skipped[0] + skipped[1] + skipped[2] + skipped[3], one[0] + one[1] + one[2] + one[3])
        last = skipped[4][-1]
        if not (torch.all(last[:, 1] == 0) and torch.all(last[:, 0].isnan())):
            FAILURES.append(f"fp8 found_inf {config}: the skipped step wrote {last.tolist()}")
    # A bucket of empty tensors: no block, zero telemetry.
    tables = fp8_run(EMU, "adamw", fp8_layouts([(0,), (0, 3)]), torch.float32, steps=1, track=True)[4]
    if not torch.equal(tables[0], torch.zeros(2, 2, dtype=torch.float64)):
        FAILURES.append(f"fp8: a bucket of empty tensors wrote telemetry {tables[0].tolist()}")


def capturable_cases():
    """(name, algorithm, shapes, state keys (slot keys: Amos's v, b), hyper at step k, per_tensor, Amos axes)."""
    adam = [(f"adam amsgrad={a} decoupled={d} bc={bc}", "adam", SHAPES, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
             lambda k, a=a, d=d, bc=bc: adam_hyper(0.1, d, a, bc), (), None)
            for a, d, bc in [(False, True, True), (True, False, True), (False, False, False)]]
    amos = [(f"amos {axes} momentum={m} clip={c}", "amos", shapes, ["v", "b", "mu"],
             lambda k, m=m, c=c: amos_hyper(0.3 * 0.9**k, m, c, 0.01), [0.3 + 0.1 * i for i in range(len(shapes))],
             axes)
            for axes, shapes, m, c in [(None, [(37,), (3, 1, 7), (10001,)], 0.9, 0.5),
                                       ("all", [(4, 16), (3, 9000)], None, None),
                                       ((1,), [(37, 5), (50, 1000), (7, 5003), (3, 9000)], 0.9, None),
                                       ((0,), [(37, 5), (300, 7)], None, 0.5),
                                       ((0, 2), [(3, 4, 5), (2, 300, 3)], 0.9, 0.5)]]
    return adam + amos + [
        ("radam", "radam", SHAPES, ["exp_avg", "exp_avg_sq"],
         lambda k: dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=False,
                        rectify_threshold=4.0), (), None),
        ("lion", "lion", SHAPES, ["exp_avg"], lambda k: dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3),
         (), None),
        ("scaled_adam", "scaled_adam", SHAPES + [(70000,)], ["exp_avg", "exp_avg_sq"],
         lambda k: dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, p=2.0, inverse_time=False, q=0.5),
         [1.0 + i for i in range(len(SHAPES) + 1)], None),
        ("lamb", "lamb", SHAPES, ["exp_avg", "exp_avg_sq"],
         lambda k: dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, bias_correction=True), (),
         None),
    ]


def group_capturable():
    """The capturable step op (coefficients from a device table, found_inf read by
    the kernels) against the CPU op with host coefficients, over 7 steps: step 1
    under grad_scale 4, step 3 skipped by found_inf (nothing written, counters
    unmoved), lr a float64 or float32 tensor on steps 4 and 5."""
    capturable.compiled_ops = EMU
    for (name, algorithm, shapes, keys, hyper_at, per_tensor, axes), dtype in itertools.product(
            capturable_cases(), [torch.float32, torch.bfloat16, torch.float64]):
        start = tensors(shapes, dtype, 11, misaligned=(1,) if axes != (0, 2) else ())
        results = []
        for ops in (EMU, CPU):
            p = clone(start)
            state = {key: ([slot_of(x, axes) for x in p] if key in ("v", "b") else zeros(p)) for key in keys}
            steps = [torch.zeros((), dtype=torch.float32) for _ in p]
            for k in range(7):
                hyper = hyper_at(k)
                if k == 5:  # an lr that a float32 tensor holds exactly
                    hyper = dict(hyper, lr=float(torch.tensor(hyper["lr"], dtype=torch.float32)))
                grad_scale = torch.tensor(4.0) if k == 1 else None
                found_inf = torch.tensor(float(k == 3))
                if ops is CPU:
                    call_step(CPU, algorithm, p, tensors(shapes, dtype, 600 + k), state, steps, hyper, per_tensor,
                              grad_scale, found_inf)
                    continue
                if k in (4, 5):
                    hyper = dict(hyper, lr=torch.tensor(hyper["lr"], dtype=torch.float64 if k == 4 else torch.float32))
                before = [t.clone() for t in p + [t for key in keys for t in state[key]] + steps]
                call_capturable_step(capturable, algorithm, p, tensors(shapes, dtype, 600 + k), state, steps, hyper,
                                     per_tensor, grad_scale, found_inf)
                after = p + [t for key in keys for t in state[key]] + steps
                if k == 3 and not all(torch.equal(a, b) for a, b in zip(after, before)):
                    FAILURES.append(f"capturable {name} {dtype}: the step skipped by found_inf wrote")
            results.append([p] + [state[key] for key in keys] + [steps])
        if [float(s) for s in results[0][-1]] != [6.0] * len(shapes):
            FAILURES.append(f"capturable {name} {dtype}: counters {[float(s) for s in results[0][-1]]}, not 6")
        compare(f"capturable {name} {dtype}", *results, dtype)
    capture_steps()
    capturable.compiled_ops = torch.ops.amos_fused


def capture_steps():
    """Under (emulated) graph capture a capturable step uploads nothing: it runs on
    the tables of an eager step with the same tensors, and is refused, writing
    nothing, when they differ; the host step op is refused under capture; after the
    capture an eager step with other grads gets a new table."""
    shapes, hyper = [(37, 5), (1000,), ()], adam_hyper(0.1, True, False, True)
    start = tensors(shapes, torch.float32, 12)
    grads = [tensors(shapes, torch.float32, 700 + k) for k in range(3)]
    static = clone(grads[0])
    p, m, v = clone(start), zeros(start), zeros(start)
    steps = [torch.zeros((), dtype=torch.float32) for _ in p]
    q, qm, qv, qsteps = clone(start), zeros(start), zeros(start), counters([0] * len(start))
    state = {"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": []}
    call_capturable_step(capturable, "adam", p, static, state, steps, hyper)  # the warm-up
    EMU.emu_set_capturing(True)
    try:
        for s, g in zip(static, grads[1]):
            s.copy_(g)
        call_capturable_step(capturable, "adam", p, static, state, steps, hyper)  # captured: same tensors
        before = clone(p)
        try:
            call_capturable_step(capturable, "adam", p, clone(grads[2]), state, steps, hyper)
            FAILURES.append("capture: a captured step with grads at new addresses was not refused")
        except RuntimeError as error:
            if "must follow an eager step" not in str(error):
                FAILURES.append(f"capture: unexpected error {error}")
        if not all(torch.equal(a, b) for a, b in zip(p, before)):
            FAILURES.append("capture: the refused captured step wrote")
        try:
            call_step(EMU, "adam", clone(start), grads[0], {"exp_avg": zeros(start), "exp_avg_sq": zeros(start)},
                      counters([0] * len(start)), hyper)
            FAILURES.append("capture: the host step op ran under capture")
        except RuntimeError as error:
            if "cannot run inside CUDA graph capture" not in str(error):
                FAILURES.append(f"capture: unexpected error of the host step {error}")
    finally:
        EMU.emu_set_capturing(False)
    call_capturable_step(capturable, "adam", p, clone(grads[2]), state, steps, hyper)  # eager, other grads
    for k in range(3):
        call_step(CPU, "adam", q, grads[k], {"exp_avg": qm, "exp_avg_sq": qv}, qsteps, hyper)
    compare("capture: warm-up, captured and eager steps", [p, m, v, steps], [q, qm, qv, qsteps], torch.float32)


GROUPS = {"adam": group_adam, "radam_lion": group_radam_lion, "norm_scaled": group_norm_scaled,
          "amos": group_amos, "cache": group_cache, "telemetry": group_telemetry,
          "stochastic_round": group_stochastic_round, "fp8": group_fp8, "capturable": group_capturable}


def main(argv):
    global EMU
    chosen = argv or list(GROUPS)
    unknown = set(chosen) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; choose from {list(GROUPS)}")
    build_emulated_ops.build()
    EMU = torch.ops.amos_fused_emu
    for name in chosen:
        start = time.time()
        GROUPS[name]()
        print(f"{name}: {time.time() - start:.0f}s, {len(FAILURES)} failure(s) so far", flush=True)
    for failure in FAILURES:
        print("FAILED", failure)
    print("emulated CUDA ops match the CPU ops" if not FAILURES else f"{len(FAILURES)} FAILED")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
