"""Time one optimizer step of amos_fused against torch.optim.AdamW and against the
bandwidth floor of each algorithm.

    python -m amos_fused.bench [--workload NAME] [--rounds R] [--steps N] [--warmup N]
                               [--json PATH | --no-json] [--plot [PATH]]

Every implementation steps its own copy of the same GPT-2-shaped fp32 parameters
(see amos_fused.bench_workloads) in the same run: torch's for-loop, foreach and fused
AdamW; each of our algorithms (AdamW, RAdam, Lion, Amos with factored slots from
amos_param_groups with and without momentum, ScaledAdamW, Lamb) for each backend
available on the device; and the floors, each row's own reference:

- on CPU, one `floor-<algorithm>` row per pattern of memory traffic (`PASSES`):
  ``torch.ops.amos_fused.stream_floor`` moves exactly the bytes of the algorithm's
  passes (e.g. AdamW: p, g, m, v in; p, m, v out — 28 B/param in fp32) with trivial
  math (p += g; m += g; v += g), through the same bucket loop, threads and SIMD
  tiles as the real kernels.  A row's time is then read against the time its
  traffic alone takes (≤ 100% up to noise).  A plain copy is no floor on CPU: with
  write-allocate caches, `dst.copy_(src)` reads every destination line before
  writing it, so it moves more bytes than it is credited.
- on GPU, `copy`: `dst.copy_(src)` of one flat buffer of 14 B/param (the 28 B/param
  that fp32 AdamW moves), the usual reference there, for every row.

Reported per implementation: median ms per step over all rounds, effective GB/s
(bytes the algorithm must move / time), its floor and the fraction of the floor's
GB/s, the speed-up over torch's fused AdamW (torch fused ms / this ms) and over our
AdamW; then the optimizer-state bytes of every optimizer and their fraction of
AdamW's.  A table goes to stdout, progress to stderr (a tqdm bar when tqdm is
installed), and the results to bench/results/<device>-<date>.json (relative to the
current directory) in one schema for every device, plus a "memory" list of
{impl, state_bytes, fraction_of_adamw}.  The floor rows carry the workload's params
and tensors: the workload whose bytes they mirror.  ``--plot`` also draws the
results (GB/s per implementation against its floor, and ms per step) into a PNG
beside the JSON; it needs matplotlib (the ``plot`` extra).
"""
import argparse
import datetime
import functools
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from amos_fused.bench_workloads import DEFAULT_WORKLOAD, WORKLOADS

DTYPE = torch.float32
ADAMW_FP32_BYTES_PER_PARAM = 28  # reads p, g, m, v; writes p, m, v
ADAMW_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
# Bytes per fp32 parameter each of our algorithms must move in one step.
TELEMETRY_SUFFIX = "+rms"
OUR_ALGORITHMS = {
    "adamw": ADAMW_FP32_BYTES_PER_PARAM,
    "radam": 28,          # as AdamW
    "lion": 20,           # reads p, g, m; writes p, m
    "amos": 12,           # factored slots, no momentum: reads p, g; writes p
    "amos-momentum": 20,  # + reads and writes mu
    "scaled-adamw": 36,   # phase 1: g, m, v in, m, v out; phase 2: p, m, v in, p out
    "lamb": 40,           # as scaled-adamw, and phase 1 also reads p
    # with telemetry (track_rms=True): the same traffic, Σθ² and Σ(Δθ)² summed in registers
    "adamw" + TELEMETRY_SUFFIX: ADAMW_FP32_BYTES_PER_PARAM,
    "amos" + TELEMETRY_SUFFIX: 12,
    # bfloat16 params, grads and states, stored with stochastic rounding: AdamW's streams at 2 B
    "adamw-bf16-sr": 14,
}
BF16_ALGORITHMS = ("adamw-bf16-sr",)
# Where those bytes come from: each algorithm's passes over memory, each pass
# (streams read and written in place, streams only read), one param-sized tensor per
# stream and param: p the param, g its grad, the others optimizer state.  Slots
# smaller than the param (Amos's factored v, b: one value per row) are left out.
Pass = Tuple[Tuple[str, ...], Tuple[str, ...]]
PASSES: Dict[str, List[Pass]] = {
    "adamw": [(("p", "m", "v"), ("g",))],
    "radam": [(("p", "m", "v"), ("g",))],
    "lion": [(("p", "m"), ("g",))],
    "amos": [(("p",), ("g",))],
    "amos-momentum": [(("p", "mu"), ("g",))],
    "scaled-adamw": [(("m", "v"), ("g",)), (("p",), ("m", "v"))],
    "lamb": [(("m", "v"), ("g", "p")), (("p",), ("m", "v"))],
}
PASSES.update({a + TELEMETRY_SUFFIX: PASSES[a] for a in ("adamw", "amos")})
PASSES["adamw-bf16-sr"] = PASSES["adamw"]


def element_size(algorithm: str) -> int:
    """Bytes per element of every stream of `algorithm`'s rows."""
    return 2 if algorithm in BF16_ALGORITHMS else 4
AMOS_LR = 0.01
TORCH_FUSED = "torch-fused-adamw"
COPY = "copy"
FLOOR_PREFIX = "floor-"
# Our backends worth timing on each device type (the interpreted Triton on CPU is not).
OUR_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
PLOT_EXTRA_HINT = ("install the 'plot' extra: pip install --no-build-isolation -e '.[plot]' "
                   "(or: pip install matplotlib tqdm)")


def bytes_per_param(passes: Sequence[Pass], element_size: int = 4) -> int:
    """Bytes per parameter that `passes` move: each written stream is read and written."""
    return element_size * sum(2 * len(written) + len(read) for written, read in passes)


def traffic(passes: Sequence[Pass]) -> Tuple[Tuple[int, int], ...]:
    """What a floor of `passes` moves: per pass, (streams written, streams only read)."""
    return tuple((len(written), len(read)) for written, read in passes)


def floor_name(algorithm: str) -> str:
    """The floor row of `algorithm`: named after the first algorithm of OUR_ALGORITHMS
    with the same traffic and element size (RAdam's floor is AdamW's, Amos with
    momentum's is Lion's)."""
    first = next(a for a in OUR_ALGORITHMS if traffic(PASSES[a]) == traffic(PASSES[algorithm])
                 and element_size(a) == element_size(algorithm))
    return FLOOR_PREFIX + first


def describe_passes(passes: Sequence[Pass]) -> str:
    """'p, m, v += g' (one pass), passes joined by '; then '."""
    return "; then ".join(f"{', '.join(written)} += {' + '.join(read)}" for written, read in passes)


@dataclass(frozen=True)
class Impl:
    """One row of the benchmark: `build(model)` returns an object whose .step() is timed;
    `floor` names the row whose GB/s this row is read against."""

    name: str
    bytes_per_param: int  # bytes one step must move per parameter (fp32)
    build: Callable[[torch.nn.Module], object]
    floor: str = COPY


# ---------------------------------------------------------------- implementations


def make_torch_adamw(model, **flags):
    return torch.optim.AdamW(model.parameters(), **ADAMW_HYPER, **flags)


def make_ours(model, backend="cpu", algorithm="adamw"):
    """Our optimizer `algorithm` on `backend`; Amos takes its groups from amos_param_groups.
    `<algorithm>+rms`: the same with track_rms=True."""
    import amos_fused

    if algorithm == "adamw-bf16-sr":
        return amos_fused.AdamW(model.to(torch.bfloat16).parameters(), **ADAMW_HYPER, backend=backend,
                                bf16_stochastic_round=True)
    if algorithm.endswith(TELEMETRY_SUFFIX):
        opt = make_ours(model, backend, algorithm[:-len(TELEMETRY_SUFFIX)])
        for group in opt.param_groups:
            group["track_rms"] = True
        return opt
    if algorithm == "adamw":
        return amos_fused.AdamW(model.parameters(), **ADAMW_HYPER, backend=backend)
    if algorithm == "amos":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR)
        return amos_fused.Amos(groups, lr=AMOS_LR, backend=backend)
    if algorithm == "amos-momentum":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR, momentum=0.9)
        return amos_fused.Amos(groups, lr=AMOS_LR, backend=backend)
    if algorithm == "radam":
        return amos_fused.RAdam(model.parameters(), lr=1e-3, backend=backend)
    if algorithm == "lion":
        return amos_fused.Lion(model.parameters(), lr=1e-4, weight_decay=0.1, backend=backend)
    if algorithm == "scaled-adamw":
        return amos_fused.ScaledAdamW(model.parameters(), lr=1e-3, half_life=1000, backend=backend)
    if algorithm == "lamb":
        return amos_fused.Lamb(model.parameters(), lr=1e-3, weight_decay=0.01, backend=backend)
    raise ValueError(f"unknown algorithm {algorithm!r}")


class CopyFloor:
    """Copies one flat buffer of `bytes_per_param / 2` bytes per parameter per step."""

    def __init__(self, model, bytes_per_param):
        params = list(model.parameters())
        numel = sum(p.numel() for p in params)
        floats = -(-numel * bytes_per_param // 8)  # ceil(numel * B/2 bytes / 4 bytes per float)
        device = params[0].device
        # Filled, so every page is really mapped (zero pages would read from cache).
        self.src = torch.empty(floats, dtype=torch.float32, device=device).fill_(1.0)
        self.dst = torch.empty_like(self.src).fill_(0.0)

    def step(self):
        self.dst.copy_(self.src)


class StreamFloor:
    """The memory traffic of `passes` over the model's parameters, with trivial math:
    one ``torch.ops.amos_fused.stream_floor`` call per pass over all tensors (one
    bucket), each written stream w += the sum of the pass's read streams.  p is the
    params' own memory and g their grads; every other stream gets a param-sized
    tensor per param, filled (so every page is mapped)."""

    def __init__(self, model, passes: Sequence[Pass], dtype: Optional[torch.dtype] = None):
        params = list(model.to(dtype).parameters() if dtype is not None else model.parameters())
        self.streams: Dict[str, List[torch.Tensor]] = {
            "p": [p.detach() for p in params],
            "g": [p.grad for p in params],
        }
        for written, read in passes:
            for name in written + read:
                if name not in self.streams:
                    self.streams[name] = [torch.empty_like(p.detach()).fill_(0.0) for p in params]
        self.num_tensors = len(params)
        self.calls = [
            ([t for name in written for t in self.streams[name]], [t for name in read for t in self.streams[name]])
            for written, read in passes
        ]

    def step(self):
        for written, read in self.calls:
            torch.ops.amos_fused.stream_floor(written, read, self.num_tensors)


def stream_floor_available() -> bool:
    """Whether the compiled op torch.ops.amos_fused.stream_floor is there."""
    try:
        import amos_fused  # noqa: F401  (registers torch.ops.amos_fused)

        torch.ops.amos_fused.stream_floor  # noqa: B018 - probe only
    except (ImportError, AttributeError, RuntimeError):
        return False
    return True


def torch_impls(floor: str = COPY) -> List[Impl]:
    b = ADAMW_FP32_BYTES_PER_PARAM
    return [
        Impl("torch-forloop-adamw", b, functools.partial(make_torch_adamw, foreach=False), floor),
        Impl("torch-foreach-adamw", b, functools.partial(make_torch_adamw, foreach=True), floor),
        Impl(TORCH_FUSED, b, functools.partial(make_torch_adamw, fused=True), floor),
    ]


def our_impls(device_type: str, stream_floors: bool = False) -> List[Impl]:
    """Each of our algorithms once per backend that is available and fast on this device type."""
    try:
        import amos_fused

        available = amos_fused.available_backends()
        amos_fused.AdamW  # noqa: B018 - probe only
    except (ImportError, AttributeError) as error:
        log(f"skipping amos_fused rows: the package does not provide AdamW yet ({error})")
        return []
    wanted = OUR_BACKENDS.get(device_type, ())
    backends = [b for b in wanted if b in available]
    if not backends:
        log(f"skipping amos_fused rows: none of {list(wanted)} in available_backends() = {available}")
    return [
        Impl(f"{b}-{algorithm}", bytes_per_param, functools.partial(make_ours, backend=b, algorithm=algorithm),
             floor_name(algorithm) if stream_floors else COPY)
        for b in backends
        for algorithm, bytes_per_param in OUR_ALGORITHMS.items()
    ]


def copy_impl() -> Impl:
    b = ADAMW_FP32_BYTES_PER_PARAM
    return Impl(COPY, b, functools.partial(CopyFloor, bytes_per_param=b), COPY)


def stream_floor_impls() -> List[Impl]:
    """One floor row per distinct pattern of passes of OUR_ALGORITHMS."""
    names = dict.fromkeys(floor_name(a) for a in OUR_ALGORITHMS)
    impls = []
    for name in names:
        algorithm = name[len(FLOOR_PREFIX):]
        dtype = torch.bfloat16 if element_size(algorithm) == 2 else None
        impls.append(Impl(name, bytes_per_param(PASSES[algorithm], element_size(algorithm)),
                          functools.partial(StreamFloor, passes=PASSES[algorithm], dtype=dtype), name))
    return impls


def uses_stream_floors(device_type: str) -> bool:
    """CPU rows are read against their algorithm's stream floor (when the op is built);
    GPU rows, and CPU rows without the op, against the copy."""
    if device_type != "cpu":
        return False
    if stream_floor_available():
        return True
    log("torch.ops.amos_fused.stream_floor is not available: the copy is the floor of every row")
    return False


def all_impls(device_type: str, stream_floors: Optional[bool] = None) -> List[Impl]:
    """Every row: torch's, ours, then the floors they are read against."""
    if stream_floors is None:
        stream_floors = uses_stream_floors(device_type)
    if stream_floors:
        return torch_impls(floor_name("adamw")) + our_impls(device_type, True) + stream_floor_impls()
    return torch_impls() + our_impls(device_type) + [copy_impl()]


def is_floor(impl_name: str) -> bool:
    return impl_name == COPY or impl_name.startswith(FLOOR_PREFIX)


# ---------------------------------------------------------------- progress


class _TextBar:
    """The fallback progress bar without tqdm: one line on stderr per item."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width = total, 0, width

    def start(self, label: str):
        filled = self.width * self.done // max(self.total, 1)
        print(f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}",
              file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1

    def write(self, message: str):
        print(message, file=sys.stderr, flush=True)

    def close(self):
        print(f"[{'#' * self.width}] {self.done}/{self.total} done", file=sys.stderr, flush=True)


class _TqdmBar:
    def __init__(self, tqdm, total: int):
        self.bar = tqdm(total=total, file=sys.stderr, unit="run", desc="bench", dynamic_ncols=True)
        self.tqdm = tqdm

    def start(self, label: str):
        self.bar.set_postfix_str(label)

    def advance(self):
        self.bar.update(1)

    def write(self, message: str):
        self.tqdm.write(message, file=sys.stderr)

    def close(self):
        self.bar.close()


_progress = None  # the bar in use while the benchmark runs (log() writes through it)


def progress_bar(total: int):
    """A tqdm bar when tqdm is installed, else a plain text one."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total)
    return _TqdmBar(tqdm, total)


# ---------------------------------------------------------------- timing


def log(message: str):
    if _progress is not None:
        _progress.write(message)
    else:
        print(message, file=sys.stderr, flush=True)


def step_times_cpu(step, warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def step_times_cuda(step, warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def state_bytes(optimizer) -> Optional[int]:
    """Bytes of the optimizer's per-parameter state tensors (None when it has none)."""
    state = getattr(optimizer, "state", None)
    if state is None:
        return None
    return sum(
        value.numel() * value.element_size()
        for per_param in state.values()
        for key, value in per_param.items()
        if isinstance(value, torch.Tensor) and key != "step"
    )


def measure(impl: Impl, make_model, device, warmup: int, steps: int) -> dict:
    """Median ms per step of `impl` on fresh parameters, which are freed afterwards."""
    model = make_model(device, DTYPE)
    params = list(model.parameters())
    sizes = dict(params=sum(p.numel() for p in params), tensors=len(params))
    del params
    optimizer = impl.build(model)
    sizes["dtype"] = next(model.parameters()).dtype  # (a bfloat16 row converts the model)
    del model  # the optimizer keeps what it needs
    timer = step_times_cuda if device.type == "cuda" else step_times_cpu
    times = timer(optimizer.step, warmup, steps)
    sizes["state_bytes"] = state_bytes(optimizer)
    del optimizer
    release_memory(device)
    log(f"      {impl.name}: {statistics.median(times):.3f} ms/step "
        f"(min {min(times):.3f}, max {max(times):.3f})")
    return dict(impl=impl, times=times, **sizes)


def pool_rounds(rounds: List[List[dict]]) -> List[dict]:
    """One measurement per implementation: the median of its step times over all rounds."""
    pooled = []
    for per_impl in zip(*rounds):
        times = [t for m in per_impl for t in m["times"]]
        pooled.append(dict(per_impl[0], times=times, ms=statistics.median(times)))
    return pooled


# ---------------------------------------------------------------- reporting


def gbps(bytes_moved: float, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def result_rows(measurements: List[dict], workload: str) -> List[dict]:
    """Rows of the results schema; needs the torch fused measurement and every row's floor.

    `floor`, `floor_gbps`, `fraction_of_floor`: the row's floor and this row's GB/s as a
    fraction of it (the same bytes, so also floor ms / this ms).  `copy_gbps` and
    `fraction_of_copy_bandwidth`: the same against the copy, None where no copy ran
    (CPU, whose floors are stream floors)."""
    by_name = {m["impl"].name: m for m in measurements}

    def speed(m):
        return gbps(m["impl"].bytes_per_param * m["params"], m["ms"])

    copy_gbps = speed(by_name[COPY]) if COPY in by_name else None
    fused_ms = by_name[TORCH_FUSED]["ms"]
    rows = []
    for m in measurements:
        this = speed(m)
        floor_gbps = speed(by_name[m["impl"].floor])
        rows.append({
            "workload": workload,
            "impl": m["impl"].name,
            "dtype": str(m.get("dtype", DTYPE)).replace("torch.", ""),
            "params": m["params"],
            "tensors": m["tensors"],
            "bytes_per_param": m["impl"].bytes_per_param,
            "ms": round(m["ms"], 4),
            "gbps": round(this, 3),
            "floor": m["impl"].floor,
            "floor_gbps": round(floor_gbps, 3),
            "fraction_of_floor": round(this / floor_gbps, 4),
            "copy_gbps": None if copy_gbps is None else round(copy_gbps, 3),
            "fraction_of_copy_bandwidth": None if copy_gbps is None else round(this / copy_gbps, 4),
            "ratio_vs_torch_fused": round(fused_ms / m["ms"], 4),
        })
    return rows


def memory_rows(measurements: List[dict]) -> List[dict]:
    """Optimizer-state bytes of every optimizer row, and their fraction of torch AdamW's."""
    adamw = next(m["state_bytes"] for m in measurements if m["impl"].name == TORCH_FUSED)
    return [
        {"impl": m["impl"].name, "state_bytes": m["state_bytes"],
         "fraction_of_adamw": round(m["state_bytes"] / adamw, 6)}
        for m in measurements
        if m["state_bytes"] is not None
    ]


def floor_legend(rows: List[dict]) -> List[str]:
    """One line per floor of the table: what it moves and which rows read against it."""
    lines = []
    for floor in dict.fromkeys(r["floor"] for r in rows):
        users = [r["impl"] for r in rows if r["floor"] == floor and r["impl"] != floor]
        if floor == COPY:
            what = f"dst.copy_(src), {ADAMW_FP32_BYTES_PER_PARAM // 2} B/param each way"
        else:
            algorithm = floor[len(FLOOR_PREFIX):]
            passes = PASSES[algorithm]
            dtype = "bfloat16" if element_size(algorithm) == 2 else "float32"
            what = f"{describe_passes(passes)} in {dtype}, {bytes_per_param(passes, element_size(algorithm))} B/param"
        lines.append(f"  {floor}: {what}; floor of {', '.join(users) or '-'}")
    return lines


def format_table(rows: List[dict], memory: List[dict], header: List[str], baseline: Optional[str]) -> str:
    """The speed table (with a column of speed-ups over `baseline`, our AdamW), the
    floors it reads against, and the optimizer-state table."""
    width = max(len(r["impl"]) for r in rows)
    floor_width = max(len("floor"), *(len(r["floor"]) for r in rows))
    base_ms = next((r["ms"] for r in rows if r["impl"] == baseline), None)
    lines = header + [
        "",
        f"{'impl':<{width}}  {'ms':>9}  {'GB/s':>7}  {'floor':<{floor_width}}  {'% of floor':>10}  "
        f"{'x vs torch fused':>16}" + (f"  {'x vs ' + baseline:>16}" if base_ms else ""),
    ]
    for r in rows:
        lines.append(
            f"{r['impl']:<{width}}  {r['ms']:>9.3f}  {r['gbps']:>7.2f}  {r['floor']:<{floor_width}}  "
            f"{100 * r['fraction_of_floor']:>9.1f}%  {r['ratio_vs_torch_fused']:>15.2f}x"
            + (f"  {base_ms / r['ms']:>15.2f}x" if base_ms else "")
        )
    lines += ["", "floors (GB/s counts the bytes of the row's algorithm; % of floor = floor ms / row ms):"]
    lines += floor_legend(rows)
    lines += ["", f"{'optimizer state':<{width}}  {'MB':>9}  {'% of AdamW':>10}"]
    for m in memory:
        lines.append(f"{m['impl']:<{width}}  {m['state_bytes'] / 1e6:>9.2f}  "
                     f"{100 * m['fraction_of_adamw']:>9.2f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def require_matplotlib():
    """Exits with the install hint when matplotlib is missing (checked before timing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}") from None


def plot_results(rows: List[dict], path: str, title: str) -> str:
    """A PNG of two bar charts: GB/s of every implementation in front of its floor's GB/s
    (labelled with the % of floor), and ms per step with the floor's ms marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = [r for r in rows if not is_floor(r["impl"])] or rows
    by_name = {r["impl"]: r for r in rows}
    names = [r["impl"] for r in shown]
    y = list(range(len(shown)))

    def color(name):
        return "tab:gray" if name.startswith("torch-") else (
            "tab:green" if name.startswith("triton-") else "tab:blue")

    figure = Figure(figsize=(13, 1.6 + 0.42 * len(shown)), layout="constrained")
    FigureCanvasAgg(figure)
    speed, time_ = figure.subplots(1, 2, sharey=True)
    speed.barh(y, [r["floor_gbps"] for r in shown], height=0.8, color="0.88", edgecolor="0.6")
    speed.barh(y, [r["gbps"] for r in shown], height=0.5, color=[color(n) for n in names])
    for i, r in enumerate(shown):
        speed.text(max(r["gbps"], r["floor_gbps"]), i, f" {100 * r['fraction_of_floor']:.0f}% of {r['floor']}",
                   va="center", fontsize=8)
    speed.set_xlabel("effective GB/s (bytes the algorithm must move / time)")
    speed.set_xlim(0, 1.45 * max(max(r["gbps"], r["floor_gbps"]) for r in shown))
    speed.set_yticks(y, names)
    speed.invert_yaxis()
    time_.barh(y, [r["ms"] for r in shown], height=0.5, color=[color(n) for n in names])
    # The floor's time for this row's bytes (a copy is credited its own bytes).
    floor_ms = [by_name[r["floor"]]["ms"] * r["bytes_per_param"] / by_name[r["floor"]]["bytes_per_param"]
                if r["floor"] in by_name else None for r in shown]
    time_.scatter([ms for ms in floor_ms if ms is not None], [i for i, ms in zip(y, floor_ms) if ms is not None],
                  marker="|", s=300, color="black", zorder=3)
    for i, (r, ms) in enumerate(zip(shown, floor_ms)):
        time_.text(max(r["ms"], ms or 0.0), i, f"  {r['ms']:.1f}", va="center", fontsize=8)
    time_.set_xlabel("ms per step (median)")
    time_.set_xlim(0, 1.15 * max(max(r["ms"], ms or 0.0) for r, ms in zip(shown, floor_ms)))
    handles = [Patch(color="tab:gray", label="torch"), Patch(color="tab:blue", label="amos_fused")]
    if any(n.startswith("triton-") for n in names):
        handles.append(Patch(color="tab:green", label="amos_fused (Triton)"))
    handles += [Patch(facecolor="0.88", edgecolor="0.6", label="floor's GB/s: the same bytes, trivial math"),
                Line2D([], [], marker="|", linestyle="", markersize=14, color="black",
                       label="floor's time for the same bytes")]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- run metadata


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return slug(f"cpu-{cpu_model_name()}-{torch.get_num_threads()}t")


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def command_line() -> str:
    return shlex.join(["python", "-m", "amos_fused.bench"] + sys.argv[1:])


# ---------------------------------------------------------------- entry point


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m amos_fused.bench",
        description="Time one optimizer step: torch for-loop / foreach / fused AdamW, amos_fused's "
                    "algorithms, and the floor of each (CPU: the same bytes with trivial math; "
                    "GPU: a copy of the same bytes).",
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS),
                        help="parameter set (default: %s)" % ", ".join(
                            f"{d}: {w}" for d, w in DEFAULT_WORKLOAD.items()))
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda if available, else cpu")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all implementations; each round builds every one afresh "
                             "and times it, so slow drifts of the machine hit all rows alike (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per round (default 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    parser.add_argument("--impls", help="comma-separated subset of rows to run "
                        f"({TORCH_FUSED} and the floors of the chosen rows always run)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", metavar="PATH",
                        help="result file (default: bench/results/<device>-<date>.json)")
    output.add_argument("--no-json", action="store_true", help="do not write a result file")
    parser.add_argument("--plot", nargs="?", const="", metavar="PATH",
                        help="also write a PNG bar chart (default path: the JSON's, ending in .png); "
                             "needs matplotlib: " + PLOT_EXTRA_HINT)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--rounds and --steps must be >= 1 and --warmup >= 0")
    return args


def select_impls(impls: List[Impl], names: Optional[str]) -> List[Impl]:
    """The rows named in `names`, torch's fused AdamW, and the floors of all of them."""
    if not names:
        return impls
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {TORCH_FUSED}
    unknown = wanted - {i.name for i in impls}
    if unknown:
        raise SystemExit(f"unknown or unavailable --impls: {sorted(unknown)}; "
                         f"choose from {[i.name for i in impls]}")
    wanted |= {i.floor for i in impls if i.name in wanted}
    return [i for i in impls if i.name in wanted]


def write_json(path: str, document: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def run_rounds(impls: List[Impl], make_model, device, args) -> List[List[dict]]:
    """Every implementation once per round, under a progress bar."""
    global _progress
    _progress = progress_bar(args.rounds * len(impls))
    try:
        rounds = []
        for r in range(1, args.rounds + 1):
            round_ = []
            for impl in impls:
                _progress.start(f"round {r}/{args.rounds}: {impl.name}")
                round_.append(measure(impl, make_model, device, args.warmup, args.steps))
                _progress.advance()
            rounds.append(round_)
    finally:
        _progress.close()
        _progress = None
    return rounds


def main(argv=None):
    args = parse_args(argv)
    if args.plot is not None:
        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workload = args.workload or DEFAULT_WORKLOAD[device.type]
    impls = select_impls(all_impls(device.type), args.impls)

    measurements = pool_rounds(run_rounds(impls, WORKLOADS[workload], device, args))
    rows = result_rows(measurements, workload)
    memory = memory_rows(measurements)
    baseline = next((f"{b}-adamw" for b in OUR_BACKENDS.get(device.type, ())
                     if any(r["impl"] == f"{b}-adamw" for r in rows)), None)

    slug_, date = device_slug(device), datetime.date.today().isoformat()
    header = [
        f"device {slug_} ({device.type}, {torch.get_num_threads()} threads)  "
        f"torch {torch.__version__}  triton {triton_version() or 'n/a'}",
        f"workload {workload}: {rows[0]['params']:,} {rows[0]['dtype']} params in "
        f"{rows[0]['tensors']} tensors; median of {args.rounds} x {args.steps} steps "
        f"({args.warmup} warm-up each round)",
    ]
    print(format_table(rows, memory, header, baseline), flush=True)

    json_path = None
    if not args.no_json:
        json_path = args.json or os.path.join("bench", "results", f"{slug_}-{date}.json")
        write_json(json_path, {
            "device": slug_,
            "torch": torch.__version__,
            "triton": triton_version(),
            "date": date,
            "command": command_line(),
            "results": rows,
            "memory": memory,
        })
        print(f"\nresults written to {json_path}")
    if args.plot is not None:
        default = json_path or os.path.join("bench", "results", f"{slug_}-{date}.json")
        path = args.plot or os.path.splitext(default)[0] + ".png"
        title = (f"{slug_}, torch {torch.__version__}: one step of {workload} "
                 f"({rows[0]['params']:,} fp32 params in {rows[0]['tensors']} tensors), "
                 f"median of {args.rounds} x {args.steps} steps")
        print(f"plot written to {plot_results(rows, path, title)}")


if __name__ == "__main__":
    main()
