"""Time one optimizer step of amos_fused against torch.optim.AdamW, against other
libraries' 8-bit and bf16 optimizers, and against the bandwidth floor of each
algorithm.

    python -m amos_fused.bench [--workload NAME] [--rounds R] [--steps N] [--warmup N]
                               [--no-peers] [--json PATH | --no-json] [--plot [PATH]]

Every implementation steps its own copy of the same GPT-2-shaped fp32 parameters
(see amos_fused.bench_workloads) in the same run: torch's for-loop, foreach and fused
AdamW; each of our algorithms (AdamW, RAdam, Lion, Amos with factored slots from
amos_param_groups with and without momentum, ScaledAdamW, Lamb, and the 8-bit
AdamW8bit and Lion8bit) for each backend available on the device; the peers, when
their package is installed (each is skipped with a logged line otherwise; ``--no-peers``
skips them all): ``bnb-adamw8bit`` (bitsandbytes.optim.AdamW8bit, min_8bit_size=4096),
``torchao-adamw8bit`` (torchao.optim.AdamW8bit) and ``torchao-adamw-bf16-sr``
(torchao's full-precision AdamW, ``torchao.optim._AdamW``, with
bf16_stochastic_round=True on bfloat16 params); and the floors, each row's own
reference (``adamw-master``, AdamW on bfloat16 params and grads with float32 master
weights and states, moves 28 B/param like float32 AdamW and is read against its
floor: the same byte count, 14 B read and 14 B written where the floor reads 16 and
writes 12):

- on CPU, one `floor-<algorithm>` row per pattern of memory traffic (`PASSES`):
  ``torch.ops.amos_fused.stream_floor`` moves exactly the bytes of the algorithm's
  passes (e.g. AdamW: p, g, m, v in; p, m, v out — 28 B/param in fp32) with trivial
  math (p += g; m += g; v += g), through the same bucket loop, threads and SIMD
  tiles as the real kernels.  A row's time is then read against the time its
  traffic alone takes (≤ 100% up to noise).  A plain copy is no floor on CPU: with
  write-allocate caches, `dst.copy_(src)` reads every destination line before
  writing it, so it moves more bytes than it is credited.
  The 8-bit algorithms (`FP8_ALGORITHMS`) move streams of three sizes: p and g in
  float32, the moments as uint8 codes (1 B/param each) and one float32 absmax per
  block of 256 (4/256 B/param each), read and written — AdamW8bit 16.0625 B/param,
  Lion8bit and Amos8bit (its momentum) 14.03125 — and params under 4096 elements
  keep float32 states (their full-precision algorithm's bytes).  stream_floor takes streams of one float dtype
  only, so their floor (`WordFloor`) sees every buffer of the step as float32 words
  (a code tensor of n bytes as n/4 words) and cuts the written and the read words
  into the streams of two stream_floor calls: the exact bytes of the step on the
  workload (up to 3 bytes per code tensor whose size is not a multiple of 4: none in
  the GPT-2 workloads), with the same trivial math, in two passes rather than one.
  The peers are read against the floor of the same traffic: bitsandbytes' and
  torchao's 8-bit AdamW keep the same bytes (uint8 codes, one float32 absmax or scale
  per 256, float32 states under 4096 elements — torchao's also for sizes that are not
  a multiple of 256: none in the GPT-2 workloads) as AdamW8bit (plus their 256-entry
  code tables, a few KB); torchao's bf16 AdamW those of our adamw-bf16-sr.
- on GPU, `copy`: `dst.copy_(src)` of one flat buffer of 14 B/param (the 28 B/param
  that fp32 AdamW moves), the usual reference there, for every row.

Reported per implementation: median ms per step over all rounds, effective GB/s
(bytes the algorithm must move / time), its floor and the fraction of the floor's
GB/s, the speed-up over torch's fused AdamW (torch fused ms / this ms) and over our
AdamW; then the optimizer-state bytes of every optimizer (every tensor of its state
but the step counters, a tensor shared by several params once, a tensor subclass by
its inner tensors: for the 8-bit optimizers the codes, the absmax and the lookup
tables), per param, and their fraction of AdamW's.  The 8-bit rows, their floors and
the peers count the bytes of the workload's own params (``bytes_per_param`` is their
mean); the others the bytes per param of `OUR_ALGORITHMS`.  The peers are slow (on
CPU, eager or compiled per-param steps of seconds each, after a torch.compile of
minutes for torchao's): they run in the first `SLOW_ROUNDS` round(s) only, at most
`SLOW_WARMUP` warm-up and `SLOW_STEPS` timed steps each.  A table goes to stdout, progress to stderr (a tqdm bar when tqdm is
installed), and the results to bench/results/<device>-<date>.json (relative to the
current directory) in one schema for every device, plus a "memory" list of
{impl, state_bytes, state_bytes_per_param, fraction_of_adamw}.  The floor rows carry
the workload's params and tensors: the workload whose bytes they mirror.  ``--plot``
also draws the results (GB/s per implementation against its floor, and ms per step)
into a PNG beside the JSON; it needs matplotlib (the ``plot`` extra).
"""
import argparse
import bisect
import datetime
import functools
import gc
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from amos_fused.bench_paired import (TELEMETRY_SUFFIX, format_costs, format_speedups, paired_cost, paired_speedup,
                                     telemetry_pairs)
from amos_fused.bench_workloads import DEFAULT_WORKLOAD, WORKLOADS

DTYPE = torch.float32
ADAMW_FP32_BYTES_PER_PARAM = 28  # reads p, g, m, v; writes p, m, v
ADAMW_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
# Bytes per fp32 parameter each of our algorithms must move in one step (the 8-bit
# ones: per param that keeps FP8 states, whose size is a multiple of the block).
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
    # bfloat16 params and grads with float32 master weights and states (master_weights=True):
    # reads the master, m, v (12 B) and g (2 B); writes the master, m, v (12 B) and p (2 B)
    "adamw-master": 28,
    # FP8 states (amos_fused/fp8_states.py): p, g in float32 (12 B), each moment as uint8
    # codes (1 B in, 1 B out) and one float32 absmax per block of 256 (4/256 B in and out)
    "adamw8bit": 12 + 2 * (2 + 8 / 256),   # 16.0625
    "lion8bit": 12 + (2 + 8 / 256),        # 14.03125
    # Amos with momentum, mu as FP8 codes: Lion8bit's traffic (the slots v, b are left
    # out, as for amos); the kernels read g once more where slots reduce (README)
    "amos8bit": 12 + (2 + 8 / 256),        # 14.03125
}
BF16_ALGORITHMS = ("adamw-bf16-sr",)
# The 8-bit algorithms, and the full-precision algorithm whose states (and bytes) the
# params with fewer than fp8_states.MIN_NUMEL elements keep.
FP8_ALGORITHMS = {"adamw8bit": "adamw", "lion8bit": "lion", "amos8bit": "amos-momentum"}
FP8_BACKENDS = ("cpu",)  # the backends with fused kernels for FP8 states
ABSMAX_SUFFIX = "_absmax"
# Where those bytes come from: each algorithm's passes over memory, each pass
# (streams read and written in place, streams only read), one param-sized tensor per
# stream and param: p the param, g its grad, the others optimizer state.  Slots
# smaller than the param (Amos's factored v, b: one value per row) are left out,
# except the FP8 states' absmax (`stream_bytes`).
Pass = Tuple[Tuple[str, ...], Tuple[str, ...]]
PASSES: Dict[str, List[Pass]] = {
    "adamw": [(("p", "m", "v"), ("g",))],
    "radam": [(("p", "m", "v"), ("g",))],
    "lion": [(("p", "m"), ("g",))],
    "amos": [(("p",), ("g",))],
    "amos-momentum": [(("p", "mu"), ("g",))],
    "scaled-adamw": [(("m", "v"), ("g",)), (("p",), ("m", "v"))],
    "lamb": [(("m", "v"), ("g", "p")), (("p",), ("m", "v"))],
    # m, v: the codes; m_absmax, v_absmax: their blocks' absmax
    "adamw8bit": [(("p", "m", "m" + ABSMAX_SUFFIX, "v", "v" + ABSMAX_SUFFIX), ("g",))],
    "lion8bit": [(("p", "m", "m" + ABSMAX_SUFFIX), ("g",))],
    "amos8bit": [(("p", "mu", "mu" + ABSMAX_SUFFIX), ("g",))],
}
PASSES.update({a + TELEMETRY_SUFFIX: PASSES[a] for a in ("adamw", "amos")})
PASSES["adamw-bf16-sr"] = PASSES["adamw"]
# 28 B as AdamW's floor (p, m, v read and written, g read, all float32), which it is
# read against: the same byte count, with 2 B of the reads moved to the writes.
PASSES["adamw-master"] = PASSES["adamw"]


def element_size(algorithm: str) -> int:
    """Bytes per element of the params and grads of `algorithm`'s rows (and of every
    stream but the FP8 states')."""
    return 2 if algorithm in BF16_ALGORITHMS else 4


def stream_bytes(algorithm: str, stream: str, numel: int) -> int:
    """Bytes of `stream` of one param of `numel` elements that keeps `algorithm`'s
    states: an FP8 state's codes take 1 B per element and its absmax 4 B per block."""
    if algorithm in FP8_ALGORITHMS and stream not in ("p", "g"):
        from amos_fused import fp8_states

        return 4 * fp8_states.num_blocks(numel) if stream.endswith(ABSMAX_SUFFIX) else numel
    return element_size(algorithm) * numel


def tensor_bytes(algorithm: str, numel: int) -> int:
    """Bytes one step of `algorithm` moves for a param of `numel` elements that keeps its
    states: each written stream is read and written."""
    return sum(stream_bytes(algorithm, name, numel) * (2 if name in written else 1)
               for written, read in PASSES[algorithm] for name in written + read)


def algorithm_bytes(algorithm: str) -> float:
    """Bytes per param of `algorithm` (`OUR_ALGORITHMS`): for an FP8 one, of a param
    that keeps FP8 states and whose size is a multiple of the block."""
    numel = 1
    if algorithm in FP8_ALGORITHMS:
        from amos_fused import fp8_states

        numel = fp8_states.BLOCK * (-(-fp8_states.MIN_NUMEL // fp8_states.BLOCK))
    return tensor_bytes(algorithm, numel) / numel


def param_algorithm(algorithm: str, param: torch.Tensor) -> str:
    """The algorithm whose states `param` keeps: an FP8 algorithm's full-precision one
    for the params fp8_states.keeps_fp8 turns down."""
    if algorithm in FP8_ALGORITHMS:
        from amos_fused import fp8_states

        if not fp8_states.keeps_fp8(param):
            return FP8_ALGORITHMS[algorithm]
    return algorithm


def step_bytes(algorithm: str, model: torch.nn.Module) -> int:
    """Bytes one step of `algorithm` moves on the model's params, param by param (an
    FP8 algorithm's small params keep full-precision states)."""
    return sum(tensor_bytes(param_algorithm(algorithm, p), p.numel()) for p in model.parameters())


AMOS_LR = 0.01
TORCH_FUSED = "torch-fused-adamw"
COPY = "copy"
FLOOR_PREFIX = "floor-"
# Our backends worth timing on each device type (the interpreted Triton on CPU is not).
OUR_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# The slow rows (the peers): in the first SLOW_ROUNDS rounds only, at most SLOW_WARMUP
# warm-up and SLOW_STEPS timed steps each (their steps take seconds on CPU, where a
# few more samples would not change what they show).
SLOW_ROUNDS, SLOW_WARMUP, SLOW_STEPS = 1, 1, 3
PLOT_EXTRA_HINT = ("install the 'plot' extra: pip install --no-build-isolation -e '.[plot]' "
                   "(or: pip install matplotlib tqdm)")


def bytes_per_param(passes: Sequence[Pass], element_size: int = 4) -> int:
    """Bytes per parameter that `passes` move when every stream has `element_size`-byte
    elements: each written stream is read and written."""
    return element_size * sum(2 * len(written) + len(read) for written, read in passes)


def traffic(algorithm: str) -> Tuple[Tuple[Tuple[float, ...], Tuple[float, ...]], ...]:
    """What a floor of `algorithm` moves: per pass, the bytes per element of each stream
    written and of each stream only read."""
    numel = 4096  # a multiple of the FP8 block: per-element sizes are exact binary fractions

    def sizes(names):
        return tuple(sorted(stream_bytes(algorithm, name, numel) / numel for name in names))

    return tuple((sizes(written), sizes(read)) for written, read in PASSES[algorithm])


def floor_name(algorithm: str) -> str:
    """The floor row of `algorithm`: named after the first algorithm of OUR_ALGORITHMS
    with the same traffic, stream by stream and byte by byte (RAdam's floor is AdamW's,
    Amos with momentum's is Lion's)."""
    first = next(a for a in OUR_ALGORITHMS if traffic(a) == traffic(algorithm))
    return FLOOR_PREFIX + first


def describe_passes(passes: Sequence[Pass]) -> str:
    """'p, m, v += g' (one pass), passes joined by '; then '."""
    return "; then ".join(f"{', '.join(written)} += {' + '.join(read)}" for written, read in passes)


@dataclass(frozen=True)
class Impl:
    """One row of the benchmark: `build(model)` returns an object whose .step() is timed;
    `floor` names the row whose GB/s this row is read against."""

    name: str
    bytes_per_param: float  # bytes one step must move per parameter (fp32)
    build: Callable[[torch.nn.Module], object]
    floor: str = COPY
    # The bytes one step moves on the workload's model, param by param (the 8-bit rows,
    # their floors and the peers); None: bytes_per_param × params.
    model_bytes: Optional[Callable[[torch.nn.Module], int]] = None
    slow: bool = False  # SLOW_ROUNDS rounds of at most SLOW_WARMUP warm-up and SLOW_STEPS timed steps
    optional: bool = False  # an error drops the row (logged) instead of stopping the run


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
    if algorithm == "adamw-master":
        return amos_fused.AdamW(model.to(torch.bfloat16).parameters(), **ADAMW_HYPER, backend=backend,
                                master_weights=True)
    if algorithm.endswith(TELEMETRY_SUFFIX):
        opt = make_ours(model, backend, algorithm[:-len(TELEMETRY_SUFFIX)])
        for group in opt.param_groups:
            group["track_rms"] = True
        return opt
    if algorithm == "adamw":
        return amos_fused.AdamW(model.parameters(), **ADAMW_HYPER, backend=backend)
    if algorithm == "adamw8bit":
        return amos_fused.AdamW8bit(model.parameters(), **ADAMW_HYPER, backend=backend)
    if algorithm == "lion8bit":
        return amos_fused.Lion8bit(model.parameters(), lr=1e-4, weight_decay=0.1, backend=backend)
    if algorithm == "amos":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR)
        return amos_fused.Amos(groups, lr=AMOS_LR, backend=backend)
    if algorithm == "amos-momentum":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR, momentum=0.9)
        return amos_fused.Amos(groups, lr=AMOS_LR, backend=backend)
    if algorithm == "amos8bit":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR, momentum=0.9)
        return amos_fused.Amos8bit(groups, lr=AMOS_LR, backend=backend)
    if algorithm == "radam":
        return amos_fused.RAdam(model.parameters(), lr=1e-3, backend=backend)
    if algorithm == "lion":
        return amos_fused.Lion(model.parameters(), lr=1e-4, weight_decay=0.1, backend=backend)
    if algorithm == "scaled-adamw":
        return amos_fused.ScaledAdamW(model.parameters(), lr=1e-3, half_life=1000, backend=backend)
    if algorithm == "lamb":
        return amos_fused.Lamb(model.parameters(), lr=1e-3, weight_decay=0.01, backend=backend)
    raise ValueError(f"unknown algorithm {algorithm!r}")


# ---------------------------------------------------------------- steps captured in a CUDA graph

GRAPH_SUFFIX = "-graph"
# Our algorithms with a CUDA-graph row on a GPU (capturable=True): the elementwise
# AdamW and Amos without momentum, the workloads' headline rows.
GRAPH_ALGORITHMS = ("adamw", "amos")


class CapturedStep:
    """A capturable optimizer's step captured once in a CUDA graph; ``step()`` replays
    it, so a timed step costs the host one launch and the kernels' time is what is
    measured (how torch recommends stepping many small tensors: capturable=True).
    The optimizer steps ``warmup`` times on a side stream first (its state, the
    kernels' compilation, the Triton backend's cached tables), as CUDA graph capture
    requires."""

    def __init__(self, optimizer, warmup: int = 3):
        self.optimizer = optimizer
        self.state = optimizer.state  # (state_bytes reads it)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            optimizer.step()

    def step(self):
        self.graph.replay()


def make_captured(model, build):
    """The optimizer ``build(model)`` (capturable=True) in a CapturedStep."""
    return CapturedStep(build(model))


def make_ours_capturable(model, backend: str, algorithm: str):
    import amos_fused

    if algorithm == "adamw":
        return amos_fused.AdamW(model.parameters(), **ADAMW_HYPER, backend=backend, capturable=True)
    if algorithm == "amos":
        groups = amos_fused.amos_param_groups(model, lr=AMOS_LR)
        return amos_fused.Amos(groups, lr=AMOS_LR, backend=backend, capturable=True)
    raise ValueError(f"no CUDA-graph row for {algorithm!r}")


def graph_impls(backends: Sequence[str]) -> List[Impl]:
    """The CUDA-graph rows (optional: a capture that fails drops its row): torch's fused
    AdamW with capturable=True, and ours on each of ``backends``."""
    b = ADAMW_FP32_BYTES_PER_PARAM
    rows = [Impl(TORCH_FUSED + GRAPH_SUFFIX, b, functools.partial(
        make_captured, build=functools.partial(make_torch_adamw, fused=True, capturable=True)), optional=True)]
    for backend in backends:
        for algorithm in GRAPH_ALGORITHMS:
            build = functools.partial(make_ours_capturable, backend=backend, algorithm=algorithm)
            rows.append(Impl(f"{backend}-{algorithm}{GRAPH_SUFFIX}", OUR_ALGORITHMS[algorithm],
                             functools.partial(make_captured, build=build), optional=True))
    return rows


# ---------------------------------------------------------------- peers: other libraries


def make_bnb_adamw8bit(model):
    """bitsandbytes' AdamW8bit (block-wise dynamic 8-bit states; on CPU its eager
    torch path); min_8bit_size as ours: params under 4096 elements keep float32 states."""
    import bitsandbytes

    from amos_fused import fp8_states

    return bitsandbytes.optim.AdamW8bit(model.parameters(), **ADAMW_HYPER, min_8bit_size=fp8_states.MIN_NUMEL)


def make_torchao_adamw8bit(model):
    """torchao's AdamW8bit (block size 256; params under 4096 elements keep float32
    states); each param's step is torch.compile'd (the first step compiles)."""
    import torchao.optim

    return torchao.optim.AdamW8bit(model.parameters(), **ADAMW_HYPER)


def torchao_adamw_class():
    """torchao's full-precision AdamW, the one that takes bf16_stochastic_round:
    torchao.optim._AdamW (torchao.prototype.low_bit_optim._AdamW in older torchao)."""
    try:
        from torchao.optim import _AdamW
    except ImportError:
        from torchao.prototype.low_bit_optim import _AdamW
    return _AdamW


def make_torchao_adamw_bf16_sr(model):
    """torchao's AdamW on the bfloat16 model with bf16_stochastic_round=True (states in
    bfloat16, as our adamw-bf16-sr)."""
    return torchao_adamw_class()(model.to(torch.bfloat16).parameters(), **ADAMW_HYPER, bf16_stochastic_round=True)


# name: (package to import, builder, the algorithm of OUR_ALGORITHMS with the same traffic)
PEERS = {
    "bnb-adamw8bit": ("bitsandbytes", make_bnb_adamw8bit, "adamw8bit"),
    "torchao-adamw8bit": ("torchao", make_torchao_adamw8bit, "adamw8bit"),
    "torchao-adamw-bf16-sr": ("torchao", make_torchao_adamw_bf16_sr, "adamw-bf16-sr"),
}
PEER_INSTALL_HINT = {"bitsandbytes": "pip install bitsandbytes==0.50.2", "torchao": "pip install torchao==0.18.0"}


def peer_missing(name: str) -> Optional[str]:
    """Why peer `name` cannot run here (its package does not import, or lacks the
    optimizer), or None."""
    package = PEERS[name][0]
    try:
        if package == "bitsandbytes":
            import bitsandbytes

            bitsandbytes.optim.AdamW8bit  # noqa: B018 - probe only
        else:
            import torchao.optim

            torchao.optim.AdamW8bit  # noqa: B018 - probe only
            torchao_adamw_class()
    except Exception as error:  # an ImportError, or a broken install of the package
        return f"{package} is not usable ({type(error).__name__}: {error}; {PEER_INSTALL_HINT[package]})"
    return None


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


class _Tape:
    """Float32 buffers laid end to end: `piece(begin, end)` is the view of tape words
    [begin, end), which must lie in one buffer."""

    def __init__(self, buffers: Sequence[torch.Tensor]):
        self.buffers = [b for b in buffers if b.numel() > 0]
        self.offsets = [0]
        for b in self.buffers:
            self.offsets.append(self.offsets[-1] + b.numel())

    def __len__(self) -> int:
        return self.offsets[-1]

    def boundaries(self, begin: int, end: int) -> List[int]:
        """The buffer boundaries strictly inside (begin, end)."""
        return self.offsets[bisect.bisect_right(self.offsets, begin):bisect.bisect_left(self.offsets, end)]

    def piece(self, begin: int, end: int) -> torch.Tensor:
        i = bisect.bisect_right(self.offsets, begin) - 1
        assert end <= self.offsets[i + 1], "a piece crosses a buffer boundary"
        return self.buffers[i][begin - self.offsets[i]:end - self.offsets[i]]


# Pairs of (written, read) stream counts of stream_floor calls, by written:read ratio:
# a step whose ratio lies between a pair's is cut into one call of each.
WORD_FLOOR_SHAPES = (((1, 1), (3, 2)), ((3, 2), (2, 1)), ((2, 1), (3, 1)), ((3, 1), (4, 1)))


def word_floor_calls(written_words: int, read_words: int) -> List[Tuple[int, int, int]]:
    """(W, R, S) of the stream_floor calls (W written and R read streams of S words each)
    that read and write `written_words` and read `read_words`, each word once: one call
    of each shape of the `WORD_FLOOR_SHAPES` pair whose ratios bracket the step's
    written:read ratio (1 to 4).  For every pair the split is whole: with r_b the read
    words of the second call, a·(r − r_b) + b·r_b = w has the solutions 2(w − r),
    2w − 3r (leaving 4r − 2w, even, to (3, 2)), w − 2r and w − 3r."""
    w, r = written_words, read_words
    for (wa, ra), (wb, rb) in WORD_FLOOR_SHAPES:
        if wa * r <= w * ra and w * rb <= wb * r:  # wa/ra <= w/r <= wb/rb
            num, den = (w * ra - wa * r) * rb, wb * ra - wa * rb
            assert num % den == 0
            r_b = num // den
            r_a = r - r_b
            assert r_a % ra == 0 and r_b % rb == 0
            return [call for call in ((wa, ra, r_a // ra), (wb, rb, r_b // rb)) if call[2] > 0]
    raise ValueError(f"no floor for {w} written and {r} read words (ratio outside [1, 4])")


class WordFloor:
    """The memory traffic of an 8-bit algorithm's step (`FP8_ALGORITHMS`) on the model's
    params, byte for byte, with trivial math.  ``torch.ops.amos_fused.stream_floor``
    takes streams of one float dtype with one element count per tensor, and the step's
    streams are of three sizes (p, g float32; codes uint8; absmax one float32 per block),
    so every buffer of the step is seen as float32 words (a code tensor of n bytes as
    ceil(n/4) words): the buffers the step reads and writes laid end to end on one tape
    (p and, per param that keeps FP8 states, each state's codes and absmax; a small
    param's float32 states), the ones it only reads (g) on another, and the tapes cut
    into the streams of two stream_floor calls (`word_floor_calls`), each call's streams
    cut at every buffer boundary into tensors.  Every word is read once and, if its
    buffer is written, written once: the step's bytes, in two passes instead of one.
    p and g are the params' own memory and grads; the states are new buffers, filled."""

    def __init__(self, model, algorithm: str):
        written, read = [], []
        for p in model.parameters():
            kind = param_algorithm(algorithm, p)
            (w_names, r_names), = PASSES[kind]
            for names, tape in ((w_names, written), (r_names, read)):
                for name in names:
                    if name == "p":
                        tape.append(p.detach().view(-1))
                    elif name == "g":
                        tape.append(p.grad.view(-1))
                    else:
                        words = -(-stream_bytes(kind, name, p.numel()) // 4)
                        tape.append(torch.empty(words, dtype=torch.float32).fill_(0.0))
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in written + read)
        self.written, self.read = _Tape(written), _Tape(read)
        self.calls = []  # (written tensors, read tensors, num_tensors) of each stream_floor call
        w_at = r_at = 0
        for num_w, num_r, size in word_floor_calls(len(self.written), len(self.read)):
            bases = ([(self.written, w_at + k * size) for k in range(num_w)]
                     + [(self.read, r_at + k * size) for k in range(num_r)])
            cuts = sorted({0, size}.union(*({b - base for b in tape.boundaries(base, base + size)}
                                             for tape, base in bases)))
            streams = [[tape.piece(base + a, base + b) for a, b in zip(cuts, cuts[1:])] for tape, base in bases]
            self.calls.append(([t for s in streams[:num_w] for t in s], [t for s in streams[num_w:] for t in s],
                               len(cuts) - 1))
            w_at, r_at = w_at + num_w * size, r_at + num_r * size
        assert (w_at, r_at) == (len(self.written), len(self.read))
        self.bytes_moved = 4 * (2 * len(self.written) + len(self.read))

    def step(self):
        for written, read, num_tensors in self.calls:
            torch.ops.amos_fused.stream_floor(written, read, num_tensors)


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


def _model_bytes(algorithm: str) -> Optional[Callable[[torch.nn.Module], int]]:
    """The bytes of `algorithm` counted param by param, for the FP8 algorithms (whose
    small params keep full-precision states); None for the others."""
    return functools.partial(step_bytes, algorithm) if algorithm in FP8_ALGORITHMS else None


def is_ours(impl: Impl) -> bool:
    """Whether a row steps one of our optimizers (built by make_ours)."""
    return isinstance(impl.build, functools.partial) and impl.build.func is make_ours


def our_impls(device_type: str, stream_floors: bool = False) -> List[Impl]:
    """Each of our algorithms once per backend that is available and fast on this device
    type (the 8-bit ones on the backends of FP8_BACKENDS)."""
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
             floor_name(algorithm) if stream_floors else COPY, _model_bytes(algorithm))
        for b in backends
        for algorithm, bytes_per_param in OUR_ALGORITHMS.items()
        if algorithm not in FP8_ALGORITHMS or b in FP8_BACKENDS
    ] + (graph_impls(backends) if device_type == "cuda" else [])


def peer_impls(stream_floors: bool = False) -> List[Impl]:
    """The other libraries' optimizers (`PEERS`) whose package is usable here; a logged
    line for each one that is not."""
    impls = []
    for name, (_, build, algorithm) in PEERS.items():
        why = peer_missing(name)
        if why is not None:
            log(f"skipping {name}: {why}")
            continue
        impls.append(Impl(name, OUR_ALGORITHMS[algorithm], build, floor_name(algorithm) if stream_floors else COPY,
                          functools.partial(step_bytes, algorithm), slow=True))
    return impls


def copy_impl() -> Impl:
    b = ADAMW_FP32_BYTES_PER_PARAM
    return Impl(COPY, b, functools.partial(CopyFloor, bytes_per_param=b), COPY)


def stream_floor_impls() -> List[Impl]:
    """One floor row per distinct pattern of traffic of OUR_ALGORITHMS: a StreamFloor of
    its passes, or for an FP8 algorithm the WordFloor of its bytes."""
    names = dict.fromkeys(floor_name(a) for a in OUR_ALGORITHMS)
    impls = []
    for name in names:
        algorithm = name[len(FLOOR_PREFIX):]
        if algorithm in FP8_ALGORITHMS:
            impls.append(Impl(name, OUR_ALGORITHMS[algorithm], functools.partial(WordFloor, algorithm=algorithm),
                              name, _model_bytes(algorithm)))
            continue
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


def all_impls(device_type: str, stream_floors: Optional[bool] = None, peers: bool = True) -> List[Impl]:
    """Every row: torch's, ours, the peers (with `peers`), then the floors they are read
    against."""
    if stream_floors is None:
        stream_floors = uses_stream_floors(device_type)
    others = peer_impls(stream_floors) if peers else []
    if stream_floors:
        return (torch_impls(floor_name("adamw")) + our_impls(device_type, True) + others
                + stream_floor_impls())
    return torch_impls() + our_impls(device_type) + others + [copy_impl()]


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


def _storage_tensors(value: torch.Tensor) -> List[torch.Tensor]:
    """The plain tensors that hold `value`'s data: a wrapper tensor subclass (torchao's
    quantized optimizer states) by its inner tensors (codes, scales, lookup table)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(value):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [inner for name in names for inner in _storage_tensors(getattr(value, name))]


def state_bytes(optimizer) -> Optional[int]:
    """Bytes of the optimizer's per-parameter state tensors but the step counters (None
    when it has none): an 8-bit state's codes, absmax and lookup tables; a tensor that
    several params share (bitsandbytes' quantization maps) once."""
    state = getattr(optimizer, "state", None)
    if state is None:
        return None
    seen = {}
    for per_param in state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                for t in _storage_tensors(value):
                    seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def measure(impl: Impl, make_model, device, warmup: int, steps: int) -> dict:
    """Median ms per step of `impl` on fresh parameters, which are freed afterwards (a
    slow row: at most SLOW_WARMUP warm-up and SLOW_STEPS timed steps)."""
    if impl.slow:
        warmup, steps = min(warmup, SLOW_WARMUP), min(steps, SLOW_STEPS)
    model = make_model(device, DTYPE)
    params = list(model.parameters())
    sizes = dict(params=sum(p.numel() for p in params), tensors=len(params))
    del params
    sizes["bytes"] = impl.model_bytes(model) if impl.model_bytes is not None else None
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
    """One measurement per implementation, in the order of their first round: the
    median of its step times over all rounds it ran in."""
    per_impl: Dict[str, List[dict]] = {}
    for round_ in rounds:
        for m in round_:
            per_impl.setdefault(m["impl"].name, []).append(m)
    pooled = []
    for ms in per_impl.values():
        times = [t for m in ms for t in m["times"]]
        pooled.append(dict(ms[0], times=times, ms=statistics.median(times)))
    return pooled


# ---------------------------------------------------------------- reporting


def gbps(bytes_moved: float, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def moved_bytes(m: dict) -> float:
    """Bytes one step of a measured row moves: counted param by param on the workload's
    model (the 8-bit rows, their floors and the peers), else bytes_per_param × params."""
    if m.get("bytes") is not None:
        return m["bytes"]
    return m["impl"].bytes_per_param * m["params"]


def result_rows(measurements: List[dict], workload: str) -> List[dict]:
    """Rows of the results schema; needs the torch fused measurement and every row's floor.

    `bytes_per_param`: the bytes one step moves / params (for the rows counted param by
    param, their mean over the workload's params, rounded to 4 decimals).  `floor`,
    `floor_gbps`, `fraction_of_floor`: the row's floor and this row's GB/s as a
    fraction of it (the same bytes, so also floor ms / this ms).  `copy_gbps` and
    `fraction_of_copy_bandwidth`: the same against the copy, None where no copy ran
    (CPU, whose floors are stream floors).  `samples`: the timed steps of all rounds."""
    by_name = {m["impl"].name: m for m in measurements}

    def speed(m):
        return gbps(moved_bytes(m), m["ms"])

    copy_gbps = speed(by_name[COPY]) if COPY in by_name else None
    fused_ms = by_name[TORCH_FUSED]["ms"]
    rows = []
    for m in measurements:
        this = speed(m)
        floor_gbps = speed(by_name[m["impl"].floor])
        per_param = (m["impl"].bytes_per_param if m.get("bytes") is None
                     else round(m["bytes"] / m["params"], 4))
        rows.append({
            "workload": workload,
            "impl": m["impl"].name,
            "dtype": str(m.get("dtype", DTYPE)).replace("torch.", ""),
            "params": m["params"],
            "tensors": m["tensors"],
            "bytes_per_param": per_param,
            "ms": round(m["ms"], 4),
            "samples": len(m["times"]),
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
    """Optimizer-state bytes of every optimizer row, per param, and their fraction of
    torch AdamW's."""
    adamw = next(m["state_bytes"] for m in measurements if m["impl"].name == TORCH_FUSED)
    return [
        {"impl": m["impl"].name, "state_bytes": m["state_bytes"],
         "state_bytes_per_param": round(m["state_bytes"] / m["params"], 4),
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
        elif floor[len(FLOOR_PREFIX):] in FP8_ALGORITHMS:
            algorithm = floor[len(FLOOR_PREFIX):]
            on_workload = next((r["bytes_per_param"] for r in rows if r["impl"] == floor), None)
            what = (f"the bytes of {describe_passes(PASSES[algorithm])}, p and g float32, the states' codes "
                    f"uint8 and absmax float32 per 256 ({algorithm_bytes(algorithm)} B/param"
                    + (f"; {on_workload:g} on this workload, whose params under 4096 elements keep float32 "
                       f"{FP8_ALGORITHMS[algorithm]} states" if on_workload is not None else "")
                    + "), moved as float32 words by one or two stream_floor calls")
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
        f"{'impl':<{width}}  {'ms':>9}  {'B/param':>7}  {'GB/s':>7}  {'floor':<{floor_width}}  {'% of floor':>10}  "
        f"{'x vs torch fused':>16}" + (f"  {'x vs ' + baseline:>16}" if base_ms else ""),
    ]
    for r in rows:
        lines.append(
            f"{r['impl']:<{width}}  {r['ms']:>9.3f}  {r['bytes_per_param']:>7.4g}  {r['gbps']:>7.2f}  "
            f"{r['floor']:<{floor_width}}  "
            f"{100 * r['fraction_of_floor']:>9.1f}%  {r['ratio_vs_torch_fused']:>15.2f}x"
            + (f"  {base_ms / r['ms']:>15.2f}x" if base_ms else "")
        )
    lines += ["", "floors (GB/s counts the bytes of the row's algorithm; % of floor = floor ms / row ms):"]
    lines += floor_legend(rows)
    lines += ["", f"{'optimizer state':<{width}}  {'MB':>9}  {'B/param':>9}  {'% of AdamW':>10}"]
    for m in memory:
        lines.append(f"{m['impl']:<{width}}  {m['state_bytes'] / 1e6:>9.2f}  {m['state_bytes_per_param']:>9.3f}  "
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


def instruction_sets() -> Dict[str, str]:
    """The instruction set each library's CPU kernels run with (ours may be forced
    with AMOS_FUSED_CPU_CAPABILITY; torch's with ATEN_CPU_CAPABILITY)."""
    return {"amos_fused": torch.ops.amos_fused.cpu_capability(),
            "torch": torch.backends.cpu.get_cpu_capability().lower()}


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
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the other libraries' rows (" + ", ".join(PEERS) + ")")
    parser.add_argument("--impls", help="comma-separated subset of rows to run "
                        f"({TORCH_FUSED} and the floors of the chosen rows always run)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", metavar="PATH",
                        help="result file (default: bench/results/<device>-<date>.json)")
    output.add_argument("--no-json", action="store_true", help="do not write a result file")
    parser.add_argument("--plot", nargs="?", const="", metavar="PATH",
                        help="also write a PNG bar chart (default path: the JSON's, ending in .png); "
                             "needs matplotlib: " + PLOT_EXTRA_HINT)
    parser.add_argument("--pairs", type=int, default=40,
                        help="after the rounds, each chosen <row> and <row>+rms pair steps in alternation "
                             "this many times, for the cost of telemetry as a median ratio (default 40; "
                             "0: skip; else at least 2)")
    parser.add_argument("--speedup-pairs", type=int, default=40, metavar="PAIRS",
                        help="after the rounds, each chosen row of ours (not the +rms ones) and torch's fused "
                             "AdamW step in alternation this many times, for the speed-up as a median ratio "
                             "(default 40; 0: skip; else at least 2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.pairs < 0 or args.speedup_pairs < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup, --pairs and --speedup-pairs >= 0")
    if args.pairs == 1 or args.speedup_pairs == 1:  # (each median ratio takes two halves / two quartiles)
        parser.error("--pairs and --speedup-pairs must be 0 (skip) or at least 2")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.json is not None and not writable_path(args.json):
        parser.error(f"--json {args.json!r}: cannot write there (checked before the benchmark runs)")
    if args.plot:
        if names_a_folder(args.plot):
            parser.error(f"--plot {args.plot}: a folder, not a file (checked before the benchmark runs)")
        if not os.path.splitext(args.plot)[1]:
            args.plot += ".png"  # (the name matplotlib would give it)
        kinds = plot_file_types()
        if kinds is not None and os.path.splitext(args.plot)[1][1:].lower() not in kinds:
            parser.error(f"--plot {args.plot}: matplotlib writes none of that kind; end the name in one of "
                         f"{sorted(kinds)} (checked before the benchmark runs)")
        if not writable_path(args.plot):
            parser.error(f"--plot {args.plot}: cannot write there (checked before the benchmark runs)")
    return args


def plot_file_types() -> Optional[set]:
    """The file name endings matplotlib writes by itself (None without matplotlib:
    main then exits with the install hint); not pgf, which needs a LaTeX install."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    return set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"}


def names_a_folder(path: str) -> bool:
    """Whether ``path`` is a folder, or names one by ending in a separator."""
    return os.path.isdir(path) or path.endswith(os.sep) or bool(os.altsep and path.endswith(os.altsep))


# torch.set_num_threads beyond this many threads may fail to start them (a crash, not an error).
MAX_THREADS = 4096


def writable_path(path: str) -> bool:
    """Whether a file can be written at ``path``: its folder is made (as writing the
    result would) and a scratch file written and removed there.  Not for an empty
    path, nor one that names a folder (names_a_folder)."""
    if not path or names_a_folder(path):
        return False
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def select_impls(impls: List[Impl], names: Optional[str]) -> List[Impl]:
    """The rows named in `names`, torch's fused AdamW, and the floors of all of them."""
    if names is None:
        return impls
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if not wanted:
        raise SystemExit(f"--impls {names!r}: name at least one of {[i.name for i in impls]}")
    wanted |= {TORCH_FUSED}
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
    """Every implementation once per round (a slow one in the first SLOW_ROUNDS rounds),
    under a progress bar.  A peer (a slow row) or an optional row (a CUDA graph) that
    raises is dropped with a logged line (e.g. torchao's torch.compile without a
    working C++ toolchain); any other row's error stops the run."""
    global _progress
    plan = [[impl for impl in impls if not impl.slow or r <= SLOW_ROUNDS] for r in range(1, args.rounds + 1)]
    _progress = progress_bar(sum(len(round_) for round_ in plan))
    failed = set()
    try:
        rounds = []
        for r, round_impls in enumerate(plan, 1):
            round_ = []
            for impl in round_impls:
                _progress.start(f"round {r}/{args.rounds}: {impl.name}")
                if impl.name not in failed:
                    try:
                        round_.append(measure(impl, make_model, device, args.warmup, args.steps))
                    except Exception as error:
                        if not (impl.slow or impl.optional):
                            raise
                        failed.add(impl.name)
                        release_memory(device)
                        log(f"dropping {impl.name}: it raised {type(error).__name__}: {error}")
                _progress.advance()
            rounds.append(round_)
    finally:
        _progress.close()
        _progress = None
    return [[m for m in round_ if m["impl"].name not in failed] for round_ in rounds]


def main(argv=None):
    args = parse_args(argv)
    if args.plot is not None:
        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workload = args.workload or DEFAULT_WORKLOAD[device.type]
    chosen = {n.strip() for n in (args.impls or "").split(",")}
    peers = not args.no_peers and (args.impls is None or bool(chosen & set(PEERS)))
    impls = select_impls(all_impls(device.type, peers=peers), args.impls)

    measurements = pool_rounds(run_rounds(impls, WORKLOADS[workload], device, args))
    rows = result_rows(measurements, workload)
    memory = memory_rows(measurements)
    baseline = next((f"{b}-adamw" for b in OUR_BACKENDS.get(device.type, ())
                     if any(r["impl"] == f"{b}-adamw" for r in rows)), None)

    slug_, date = device_slug(device), datetime.date.today().isoformat()
    isa = instruction_sets() if device.type == "cpu" else {}
    header = [
        f"device {slug_} ({device.type}, {torch.get_num_threads()} threads)  "
        f"torch {torch.__version__}  triton {triton_version() or 'n/a'}"
        + (f"  CPU kernels: amos_fused {isa['amos_fused']}, torch {isa['torch']}" if isa else ""),
        f"workload {workload}: {rows[0]['params']:,} {rows[0]['dtype']} params in "
        f"{rows[0]['tensors']} tensors; median of {args.rounds} x {args.steps} steps "
        f"({args.warmup} warm-up each round)"
        + (f"; {', '.join(i.name for i in impls if i.slow)}: {SLOW_ROUNDS} round of at most {SLOW_WARMUP} "
           f"warm-up and {SLOW_STEPS} steps" if any(i.slow for i in impls) else ""),
    ]
    print(format_table(rows, memory, header, baseline), flush=True)
    costs = []
    if args.pairs:
        for plain, tracked in telemetry_pairs(impls):
            costs.append(paired_cost(plain, tracked, WORKLOADS[workload], device, DTYPE, args.warmup, args.pairs))
            release_memory(device)
        if costs:
            print("\n" + format_costs(costs), flush=True)
    speedups = []
    if args.speedup_pairs:
        torch_fused = next(i for i in impls if i.name == TORCH_FUSED)
        for impl in impls:
            if is_ours(impl) and not impl.name.endswith(TELEMETRY_SUFFIX):
                speedups.append(paired_speedup(impl, torch_fused, WORKLOADS[workload], device, DTYPE, args.warmup,
                                               args.speedup_pairs))
                release_memory(device)
        if speedups:
            print("\n" + format_speedups(speedups), flush=True)

    json_path = None
    if not args.no_json:
        json_path = args.json or os.path.join("bench", "results", f"{slug_}-{date}.json")
        write_json(json_path, {
            "device": slug_,
            "torch": torch.__version__,
            "triton": triton_version(),
            "date": date,
            "command": command_line(),
            **({"cpu_kernels": isa} if isa else {}),
            "results": rows,
            "memory": memory,
            "telemetry_cost": costs,
            "paired_speedup": speedups,
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
