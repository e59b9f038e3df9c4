"""Time one optimizer step of amos_fused against torch.optim.AdamW and a plain copy.

    python -m amos_fused.bench [--workload NAME] [--rounds R] [--steps N] [--warmup N] [--json PATH | --no-json]

Every implementation steps its own copy of the same GPT-2-shaped fp32 parameters
(see amos_fused.bench_workloads) in the same run: torch's for-loop, foreach and fused
AdamW; each of our algorithms (AdamW, RAdam, Lion, Amos with factored slots from
amos_param_groups with and without momentum, ScaledAdamW, Lamb) for each backend
available on the device; and `copy`, the floor: `dst.copy_(src)` of one flat
buffer of 14 B/param, i.e. the 28 B/param that fp32 AdamW must read and write
(p, g, m, v in; p, m, v out).

Reported per implementation: median ms per step over all rounds, effective GB/s
(bytes the algorithm must move / time), the fraction of the copy's GB/s, the
speed-up over torch's fused AdamW (torch fused ms / this ms) and over our AdamW;
then the optimizer-state bytes of every optimizer and their fraction of AdamW's.  A table goes to
stdout, progress to stderr, and the results to bench/results/<device>-<date>.json
(relative to the current directory) in one schema for every device, plus a
"memory" list of {impl, state_bytes, fraction_of_adamw}.  The `copy` row
carries the workload's params and tensors: the workload whose bytes it mirrors.
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
from typing import Callable, List, Optional

import torch

from amos_fused.bench_workloads import DEFAULT_WORKLOAD, WORKLOADS

DTYPE = torch.float32
ADAMW_FP32_BYTES_PER_PARAM = 28  # reads p, g, m, v; writes p, m, v
ADAMW_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
# Bytes per fp32 parameter each of our algorithms must move in one step.
OUR_ALGORITHMS = {
    "adamw": ADAMW_FP32_BYTES_PER_PARAM,
    "radam": 28,          # as AdamW
    "lion": 20,           # reads p, g, m; writes p, m
    "amos": 12,           # factored slots, no momentum: reads p, g; writes p
    "amos-momentum": 20,  # + reads and writes mu
    "scaled-adamw": 36,   # phase 1: g, m, v in, m, v out; phase 2: p, m, v in, p out
    "lamb": 40,           # as scaled-adamw, and phase 1 also reads p
}
AMOS_LR = 0.01
TORCH_FUSED = "torch-fused-adamw"
COPY = "copy"
# Our backends worth timing on each device type (the interpreted Triton on CPU is not).
OUR_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Impl:
    """One row of the benchmark: `build(model)` returns an object whose .step() is timed."""

    name: str
    bytes_per_param: int  # bytes one step must move per parameter (fp32)
    build: Callable[[torch.nn.Module], object]


# ---------------------------------------------------------------- implementations


def make_torch_adamw(model, **flags):
    return torch.optim.AdamW(model.parameters(), **ADAMW_HYPER, **flags)


def make_ours(model, backend="cpu", algorithm="adamw"):
    """Our optimizer `algorithm` on `backend`; Amos takes its groups from amos_param_groups."""
    import amos_fused

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


def torch_impls() -> List[Impl]:
    b = ADAMW_FP32_BYTES_PER_PARAM
    return [
        Impl("torch-forloop-adamw", b, functools.partial(make_torch_adamw, foreach=False)),
        Impl("torch-foreach-adamw", b, functools.partial(make_torch_adamw, foreach=True)),
        Impl(TORCH_FUSED, b, functools.partial(make_torch_adamw, fused=True)),
    ]


def our_impls(device_type: str) -> List[Impl]:
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
        Impl(f"{b}-{algorithm}", bytes_per_param, functools.partial(make_ours, backend=b, algorithm=algorithm))
        for b in backends
        for algorithm, bytes_per_param in OUR_ALGORITHMS.items()
    ]


def copy_impl() -> Impl:
    b = ADAMW_FP32_BYTES_PER_PARAM
    return Impl(COPY, b, functools.partial(CopyFloor, bytes_per_param=b))


def all_impls(device_type: str) -> List[Impl]:
    return torch_impls() + our_impls(device_type) + [copy_impl()]


# ---------------------------------------------------------------- timing


def log(message: str):
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
    del model  # the optimizer keeps what it needs
    timer = step_times_cuda if device.type == "cuda" else step_times_cpu
    times = timer(optimizer.step, warmup, steps)
    sizes["state_bytes"] = state_bytes(optimizer)
    del optimizer
    release_memory(device)
    log(f"      {statistics.median(times):.3f} ms/step (min {min(times):.3f}, max {max(times):.3f})")
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
    """Rows of the results schema; needs the copy and torch fused measurements."""
    by_name = {m["impl"].name: m for m in measurements}
    copy = by_name[COPY]
    copy_gbps = gbps(copy["impl"].bytes_per_param * copy["params"], copy["ms"])
    fused_ms = by_name[TORCH_FUSED]["ms"]
    rows = []
    for m in measurements:
        speed = gbps(m["impl"].bytes_per_param * m["params"], m["ms"])
        rows.append({
            "workload": workload,
            "impl": m["impl"].name,
            "dtype": str(DTYPE).replace("torch.", ""),
            "params": m["params"],
            "tensors": m["tensors"],
            "ms": round(m["ms"], 4),
            "gbps": round(speed, 3),
            "copy_gbps": round(copy_gbps, 3),
            "fraction_of_copy_bandwidth": round(speed / copy_gbps, 4),
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


def format_table(rows: List[dict], memory: List[dict], header: List[str], baseline: Optional[str]) -> str:
    """The speed table (with a column of speed-ups over `baseline`, our AdamW) and the
    optimizer-state table."""
    width = max(len(r["impl"]) for r in rows)
    base_ms = next((r["ms"] for r in rows if r["impl"] == baseline), None)
    lines = header + [
        "",
        f"{'impl':<{width}}  {'ms':>9}  {'GB/s':>7}  {'% of copy':>9}  {'x vs torch fused':>16}"
        + (f"  {'x vs ' + baseline:>16}" if base_ms else ""),
    ]
    for r in rows:
        lines.append(
            f"{r['impl']:<{width}}  {r['ms']:>9.3f}  {r['gbps']:>7.2f}  "
            f"{100 * r['fraction_of_copy_bandwidth']:>8.1f}%  {r['ratio_vs_torch_fused']:>15.2f}x"
            + (f"  {base_ms / r['ms']:>15.2f}x" if base_ms else "")
        )
    lines += ["", f"{'optimizer state':<{width}}  {'MB':>9}  {'% of AdamW':>10}"]
    for m in memory:
        lines.append(f"{m['impl']:<{width}}  {m['state_bytes'] / 1e6:>9.2f}  "
                     f"{100 * m['fraction_of_adamw']:>9.2f}%")
    return "\n".join(lines)


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
        description="Time one AdamW step: torch for-loop / foreach / fused, amos_fused, "
                    "and a copy of the same bytes (the floor).",
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
                        f"({COPY} and {TORCH_FUSED} always run)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", metavar="PATH",
                        help="result file (default: bench/results/<device>-<date>.json)")
    output.add_argument("--no-json", action="store_true", help="do not write a result file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--rounds and --steps must be >= 1 and --warmup >= 0")
    return args


def select_impls(impls: List[Impl], names: Optional[str]) -> List[Impl]:
    if not names:
        return impls
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {COPY, TORCH_FUSED}
    unknown = wanted - {i.name for i in impls}
    if unknown:
        raise SystemExit(f"unknown or unavailable --impls: {sorted(unknown)}; "
                         f"choose from {[i.name for i in impls]}")
    return [i for i in impls if i.name in wanted]


def write_json(path: str, document: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workload = args.workload or DEFAULT_WORKLOAD[device.type]
    impls = select_impls(all_impls(device.type), args.impls)

    rounds = []
    for r in range(1, args.rounds + 1):
        round_ = []
        for i, impl in enumerate(impls, 1):
            log(f"[round {r}/{args.rounds}, {i}/{len(impls)}] {impl.name} ...")
            round_.append(measure(impl, WORKLOADS[workload], device, args.warmup, args.steps))
        rounds.append(round_)
    measurements = pool_rounds(rounds)
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

    if not args.no_json:
        path = args.json or os.path.join("bench", "results", f"{slug_}-{date}.json")
        write_json(path, {
            "device": slug_,
            "torch": torch.__version__,
            "triton": triton_version(),
            "date": date,
            "command": command_line(),
            "results": rows,
            "memory": memory,
        })
        print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
