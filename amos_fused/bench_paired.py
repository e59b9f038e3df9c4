"""The cost of telemetry (``track_rms=True``), measured in pairs.

The benchmark's rounds time each row on its own, seconds apart; on a shared or
throttling machine the drift between two rows can exceed a few-percent cost.  Here
two optimizers of the row live side by side on models built alike and step in
alternation, the order swapped every pair, one of them tracking: both steps of a
pair see the same machine (``paired_cost``)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, List, Sequence, Tuple

import torch

TELEMETRY_SUFFIX = "+rms"


def telemetry_pairs(impls: Sequence) -> List[tuple]:
    """(plain row, tracked row) for every ``<row>+rms`` whose plain row is also chosen."""
    by_name = {impl.name: impl for impl in impls}
    return [(by_name[impl.name[:-len(TELEMETRY_SUFFIX)]], impl) for impl in impls
            if impl.name.endswith(TELEMETRY_SUFFIX) and impl.name[:-len(TELEMETRY_SUFFIX)] in by_name]


def _timed_step(optimizer, device: torch.device) -> float:
    """Milliseconds of one step, the device idle before and after it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _track(optimizer, on: bool) -> None:
    for group in optimizer.param_groups:
        group["track_rms"] = on


def _alternated(optimizers: Sequence, warmup: int, pairs: int, device: torch.device) -> List[Tuple[float, float]]:
    """(ms of optimizers[0], ms of optimizers[1]) of ``pairs`` pairs of steps after
    ``warmup`` steps of each, the order within a pair swapped every pair."""
    for _ in range(warmup):
        for optimizer in optimizers:
            optimizer.step()
    times = []
    for i in range(pairs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        ms = {k: _timed_step(optimizers[k], device) for k in order}
        times.append((ms[0], ms[1]))
    return times


def paired_cost(plain, tracked, make_model: Callable, device: torch.device, dtype: torch.dtype,
                warmup: int, pairs: int) -> dict:
    """The cost of ``tracked`` (bench Impl: ``plain`` with track_rms=True) over
    ``plain``: two optimizers built by ``plain`` on two models step in alternation,
    ``pairs`` times each after ``warmup`` steps each, one of them tracking.  Two
    models built alike can differ by several % (where their memory landed), so the
    tracking one is the first for half the pairs and the second for the other half:
    the ratio (tracked ms / plain ms) is the geometric mean of the two halves'
    median ratios, which cancels that difference; the halves' medians are returned
    too (their gap is the difference between the models, squared), and the median
    ms of the tracked and of the plain steps."""
    if tracked.name != plain.name + TELEMETRY_SUFFIX:
        raise ValueError(f"{tracked.name!r} is not {plain.name!r} with telemetry")
    optimizers = [plain.build(make_model(device, dtype)) for _ in range(2)]
    halves, tracked_ms, plain_ms = [], [], []
    for tracking in (0, 1):
        for k, optimizer in enumerate(optimizers):
            _track(optimizer, k == tracking)
        ratios = []
        for times in _alternated(optimizers, warmup, (pairs + 1) // 2 if tracking == 0 else pairs // 2, device):
            ratios.append(times[tracking] / times[1 - tracking])
            tracked_ms.append(times[tracking])
            plain_ms.append(times[1 - tracking])
        halves.append(ratios)
    medians = [statistics.median(h) if h else 1.0 for h in halves]
    return dict(impl=tracked.name, baseline=plain.name, pairs=pairs, ratio=math.sqrt(medians[0] * medians[1]),
                ratio_halves=medians, ms=statistics.median(tracked_ms) if tracked_ms else None,
                baseline_ms=statistics.median(plain_ms) if plain_ms else None)


def paired_speedup(impl, baseline, make_model: Callable, device: torch.device, dtype: torch.dtype,
                   warmup: int, pairs: int) -> dict:
    """How many times faster a step of ``impl`` is than one of ``baseline`` (bench
    Impls; torch's fused AdamW), both on the same machine at the same moment: each
    on its own model built alike, they step in alternation ``pairs`` times after
    ``warmup`` steps each, the order swapped every pair; the speed-up is the median
    of the pairs' ratios (baseline ms / impl ms), returned with its quartiles and
    the two rows' median ms.  On a machine whose memory bandwidth drifts between
    rows timed seconds apart, this is the ratio the two rows' own medians blur."""
    times = _alternated([impl.build(make_model(device, dtype)), baseline.build(make_model(device, dtype))],
                        warmup, pairs, device)
    ratios = [theirs / ours for ours, theirs in times]
    ms, baseline_ms = [ours for ours, _ in times], [theirs for _, theirs in times]
    # (inclusive: quartiles within the measured ratios, also for a few pairs)
    quartiles = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else [ratios[0], ratios[0], ratios[0]])
    return dict(impl=impl.name, baseline=baseline.name, pairs=pairs, speedup=statistics.median(ratios),
                quartiles=[quartiles[0], quartiles[2]], ms=statistics.median(ms),
                baseline_ms=statistics.median(baseline_ms))


def format_speedups(speedups: Sequence[dict]) -> str:
    lines = ["speed-up over torch's fused AdamW, in pairs: the row and torch's fused AdamW step in alternation; "
             "median of the pairs' ratios (torch ms / row ms), its quartiles"]
    for s in speedups:
        lines.append(f"  {s['impl']:<22} {s['speedup']:.2f}x  ({s['quartiles'][0]:.2f}..{s['quartiles'][1]:.2f}) "
                     f"over {s['pairs']} pairs, medians {s['ms']:.3f} and {s['baseline_ms']:.3f} ms")
    return "\n".join(lines)


def format_costs(costs: Sequence[dict]) -> str:
    lines = ["telemetry cost (track_rms): two optimizers of the row step in alternation, one tracking (the first "
             "for half the pairs, the second for the rest); ratio of their step times, the geometric mean of the "
             "halves' medians (the halves' medians)"]
    for c in costs:
        first, second = c["ratio_halves"]
        lines.append(f"  {c['impl']:<22} / {c['baseline']:<18} {c['ratio']:.3f}  {100 * (c['ratio'] - 1):+.1f}%  "
                     f"({first:.3f}, {second:.3f}) over {c['pairs']} pairs, medians {c['ms']:.3f} and "
                     f"{c['baseline_ms']:.3f} ms")
    return "\n".join(lines)
