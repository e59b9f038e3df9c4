"""Ahead-of-time compile check of the Triton kernels for an NVIDIA GPU (sm_90 by
default), on a machine without one.

The kernel variants are not listed here: they are recorded.  Every algorithm of
``amos_fused.triton_kernels.ops`` is stepped through its public ``ops.step`` (and
those with FP8 states through ``ops.step_fp8``) on CPU tensors with ``JITFunction.run`` replaced by a recorder, so the launches pick the
kernels, constexprs and ``num_warps`` themselves; each recorded call is turned
into the compile the JIT would make for it (its signature, with the JIT's
specialisation of int arguments equal to 1 and of 16-divisible ints and
pointers).  The inputs swept:

  * every storage dtype (float32, bfloat16, float16, float64; the steps with
    block-scaled FP8 states, ``ops.step_fp8``, all but float64);
  * 16-byte aligned and misaligned tensors (ALIGNED, ROWS_ALIGNED);
  * buckets of one tensor and of several (the JIT turns ``n == 1`` into a constant);
  * steps without and with telemetry (the step op's optional [n, 2] float64 output:
    the TELEMETRY variants of the kernels that write θ, and its sums launch);
  * bfloat16 steps without and with stochastic rounding (the step op's round_keys:
    the ROUND variants of the kernels that write θ);
  * host-coefficient and capturable steps (``ops.step_capturable``: the SKIPPABLE
    variants of the kernels that write, which read GradScaler's found_inf);
  * the hyper-parameters that change a launch: starting from typical values, a
    hyper-parameter joins the sweep when setting it to another of its values
    (typical, 0, 1) at some point of the sweep changes what is launched, until
    none does;
  * for Amos, buckets of every combination of its walks (elementwise, short rows,
    rows, rows of a multiple of 8 elements), each with no phased tensor or with one of
    1, 2, … merged dims, up to the layout op's maximum (the kernels' ``ndim``
    argument, which the JIT specialises at 1 and at multiples of 16).

Each variant is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``
(through ptxas); its registers and spills come from ptxas' report.  Kernels with
at most ``--max-all`` variants are compiled in every variant; for a kernel with
more (amos_kernel: its walks times flags times alignment, thousands), a greedy pairwise
cover is compiled: every pair of values of two of its constexprs (or JIT
specialisations, or num_warps) that some launch produces is compiled together at
least once, starting from the heaviest variant (most flags set, largest ints,
widest dtype) for every value of each.  ``--all`` compiles every variant.

Prints one line per compiled variant and a summary; exits 1 when a variant fails
to compile or spills registers, 0 otherwise.  Skips (exit 0) when triton is not
installed.  Needs amos_fused built (its C++ ops describe the steps).

    python tools/check_triton_compile.py [--all] [--jobs N] [--arch 90] [--kernel REGEX] [--list]
"""
from __future__ import annotations

import os

# The kernels must be real JIT functions: the interpreter is never used here (this
# precedes any import of triton).
os.environ.pop("TRITON_INTERPRET", None)
# Triton prints ptxas' report (registers, spills) after each compile when this is set.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import heapq  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Tuple  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16", "float16", "float64")
FP8_DTYPES = DTYPES[:3]  # FP8 states are kept for float32 / bfloat16 / float16 params
# Typical values of the hyper-parameters (by the names of the algorithms' contracts);
# a name missing here starts at 0.5.  Each is also tried at 0 and at 1.
TYPICAL = dict(lr=1e-3, beta1=0.9, beta1_weight=0.1, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=1.0,
               amsgrad=0.0, bias_correction=1.0, rectify_threshold=5.0, beta=0.999,
               momentum=0.9, clip_value=1.0, extra_l2=0.01, d_coef=0.25, c_coef=0.25,
               epsilon=2.0 ** -125, use_momentum=0.0, clip=0.0, p=5.0, inverse_time=0.0, q=1.0)
# ops.step's slot states (shaped by reduce_axes), by algorithm.
SLOT_STATES = {"amos": ("v", "b")}
_FP_FUSION_WARNING = "TRITON_DEFAULT_FP_FUSION is unset"


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------

class Variant(NamedTuple):
    """One compile: what ``triton.compile`` gets for one specialisation of a kernel."""
    module: str
    kernel: str
    signature: Tuple[Tuple[str, str], ...]     # every argument: (name, type or "constexpr")
    constexprs: Tuple[Tuple[str, object], ...]  # (name, value): bool, int or tl.dtype
    divisible: Tuple[int, ...]                  # arguments known to be multiples of 16
    options: Tuple[Tuple[str, object], ...]     # num_warps, ...

    def axes(self) -> Dict[str, str]:
        """What varies between variants of a kernel, by name (shown, and covered pairwise)."""
        out = {name: show(value) for name, value in self.constexprs}
        for index, (name, kind) in enumerate(self.signature):
            if kind != "constexpr" and not kind.startswith("*"):  # scalars: type and divisibility
                out[name] = kind + (" %16" if index in self.divisible else "")
        out.update((name, show(value)) for name, value in self.options)
        return out

    def describe(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.axes().items())

    def weight(self) -> tuple:
        """Heavier variants hold more values: more flags set, larger ints, wider dtypes."""
        values = [value for _, value in self.constexprs]
        return (sum(1 for v in values if v is True),
                sum(v for v in values if isinstance(v, int) and not isinstance(v, bool)),
                sum(v.primitive_bitwidth for v in values if hasattr(v, "primitive_bitwidth")))


def show(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(getattr(value, "name", value))


_TRITON_TYPES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16",
                 "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                 "bool": "i1"}


def jit_argument(value, param) -> Tuple[str, bool]:
    """(signature type, divisible by 16) of a runtime argument as Triton's JIT
    specialises it; type "constexpr" for an int equal to 1."""
    import torch
    if isinstance(value, torch.Tensor):
        aligned = not param.do_not_specialize_on_alignment and value.data_ptr() % 16 == 0
        return "*" + _TRITON_TYPES[str(value.dtype).replace("torch.", "")], aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if param.do_not_specialize:
            return ("i32" if -2**31 <= value < 2**31 else "i64"), False
        if value == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, not param.do_not_specialize_on_alignment and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no signature type for an argument of type {type(value).__name__}")


def variant_of(kernel, args: Sequence, kwargs: Dict) -> Variant:
    """The compile the JIT makes for ``kernel[grid](*args, **kwargs)``."""
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    options = {}
    for name, value in kwargs.items():
        if name in names:
            values[name] = value
        else:
            options[name] = value
    missing = [name for name in names if name not in values]
    if missing:
        raise TypeError(f"{kernel.__name__}: launched without {', '.join(missing)}")
    signature, constexprs, divisible = [], [], []
    for index, (name, param) in enumerate(zip(names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            kind = "constexpr"
        else:
            kind, aligned = jit_argument(value, param)
            if aligned:
                divisible.append(index)
        signature.append((name, kind))
        if kind == "constexpr":
            constexprs.append((name, value))
    return Variant(kernel.fn.__module__, kernel.__name__, tuple(signature), tuple(constexprs),
                   tuple(divisible), tuple(sorted(options.items())))


# ---------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------

class Recorder:
    """Steps buckets through ``ops.step`` on CPU tensors, the kernels' launches
    recorded instead of run."""

    def __init__(self):
        import torch
        from triton.runtime.jit import JITFunction

        import amos_fused  # noqa: F401  (the C++ ops)
        from amos_fused import amos_slots, contracts, fp8_states
        from amos_fused.triton_kernels import amos, common, ops
        if common.kernels_interpreted() or not isinstance(common.program_entry, JITFunction):
            raise RuntimeError("the kernels were imported for Triton's interpreter (TRITON_INTERPRET=1)")
        torch.set_num_threads(1)  # thousands of tiny host ops: threads only add overhead
        self.torch, self.JITFunction = torch, JITFunction
        self.amos_slots, self.contracts, self.amos, self.common, self.ops = amos_slots, contracts, amos, common, ops
        self.fp8_states = fp8_states
        self.calls: List[Tuple[object, tuple, dict]] = []

    @contextlib.contextmanager
    def active(self):
        """JITFunction.run records its call; the device check admits CPU tensors (the
        kernels are compiled for CUDA ones: nothing is launched here)."""
        run, check_device = self.JITFunction.run, self.common.check_device

        def record(kernel, *args, grid, warmup, **kwargs):
            self.calls.append((kernel, args, kwargs))

        self.JITFunction.run, self.common.check_device = record, (lambda op, device: None)
        try:
            yield
        finally:
            self.JITFunction.run, self.common.check_device = run, check_device

    def _tensor(self, shape, dtype, aligned: bool):
        torch = self.torch
        if aligned:
            return torch.zeros(shape, dtype=dtype)
        numel = math.prod(shape)  # one element into an aligned allocation: not 16-byte aligned
        return torch.zeros(numel + 1, dtype=dtype)[1:].view(shape)

    def step(self, algorithm: str, hyper: Dict[str, float], dtype: str, aligned: bool,
             tensors: Sequence[Tuple[tuple, object]], strict: bool = True,
             telemetry: bool = False, rounding: bool = False, fp8: bool = False,
             capturable: bool = False) -> Optional[FrozenSet[Variant]]:
        """The variants one step launches (bucket: (shape, reduce_axes) per tensor),
        with a telemetry table when ``telemetry`` and round keys (stochastic rounding
        of bfloat16 params) when ``rounding``, through ``ops.step_fp8`` (uint8 codes
        and float32 absmax for the enabled states) when ``fp8``, through
        ``ops.step_capturable`` (found_inf read by the kernels) when ``capturable``;
        unless ``strict``, None when the step op refuses these hyper-parameters."""
        torch, contract = self.torch, self.contracts.contract(algorithm)
        if fp8 and algorithm in SLOT_STATES:  # Amos's FP8 step is that of its momentum (without, `step` runs)
            hyper = dict(hyper, use_momentum=1.0)
        dt = getattr(torch, dtype)
        params = [self._tensor(shape, dt, aligned) for shape, _ in tensors]
        grads = [self._tensor(shape, dt, aligned) for shape, _ in tensors]
        state = {}
        for key in contract.states:
            if key in SLOT_STATES.get(algorithm, ()):
                state[key] = [self._tensor(self.amos_slots.slot_shape(shape, axes), dt, aligned)
                              for shape, axes in tensors]
            else:
                state[key] = [self._tensor(shape, torch.uint8 if fp8 else dt, aligned) for shape, _ in tensors]
        states, values = self.contracts.step_arguments(algorithm, hyper, state)
        steps = [torch.tensor(0.0) for _ in tensors]
        per_tensor = [0.5] * len(tensors) if contract.per_tensor else []
        table = torch.full((len(tensors), 2), math.nan, dtype=torch.float64) if telemetry else None
        keys = [(1 << 32) | i for i in range(len(tensors))] if rounding else None
        self.calls.clear()
        with self.active():
            try:
                if fp8:  # Amos: its slots (v, b) in full precision, then the codes of mu
                    slots = 2 * len(tensors) if algorithm in SLOT_STATES else 0
                    codes = states[slots:]
                    absmax = [self._tensor((self.fp8_states.num_blocks(c.numel()),), torch.float32, aligned)
                              for c in codes]
                    self.ops.step_fp8(algorithm, params, grads, codes, absmax, steps, values,
                                      telemetry=table, round_keys=keys, states=states[:slots] or None,
                                      per_tensor=per_tensor or None)
                elif capturable:
                    self.ops.step_capturable(algorithm, params, grads, states, steps,
                                             dict(zip(contract.hyper, values)), per_tensor,
                                             grad_scale=torch.tensor(1.0), found_inf=torch.tensor(0.0))
                else:
                    self.ops.step(algorithm, params, grads, states, steps, values, per_tensor,
                                  telemetry=table, round_keys=keys)
            except (ValueError, RuntimeError):
                if strict:
                    raise
                return None
        return frozenset(variant_of(kernel, args, kwargs) for kernel, args, kwargs in self.calls)

    def max_amos_dims(self) -> int:
        """The most merged dims an Amos layout can have (the layout op's row holds
        kind, num_slots, row_len, ndim, then sizes and slot strides)."""
        torch = self.torch
        p, v = torch.zeros(2, 2), torch.zeros(2, 1)
        width = torch.ops.amos_fused.amos_slot_layouts("check", [p], [v], [v]).shape[1]
        return (width - 4) // 2


def hyper_values(name: str) -> List[float]:
    values = []
    for value in (TYPICAL.get(name, 0.5), 0.0, 1.0):
        if value not in values:
            values.append(value)
    return values


def hyper_sweep(names: Sequence[str], probe: Callable[[Dict[str, float]], Optional[FrozenSet[Variant]]]
                ) -> List[Dict[str, float]]:
    """The hyper-parameter points to step: the product of the values of the names
    that change what ``probe`` launches (closed: from no point of the sweep does
    setting another name to another value change it), the others typical."""
    base = {name: hyper_values(name)[0] for name in names}
    if probe(base) is None:
        raise RuntimeError(f"the step op refuses the typical hyper-parameters {base}")
    relevant: List[str] = []

    def points():
        for combo in itertools.product(*(hyper_values(name) for name in relevant)):
            yield dict(base, **dict(zip(relevant, combo)))

    def grow() -> bool:
        for point in points():
            ref = probe(point)
            if ref is None:
                continue
            for name in names:
                if name in relevant:
                    continue
                for value in hyper_values(name):
                    got = probe(dict(point, **{name: value}))
                    if got is not None and got != ref:
                        relevant.append(name)
                        return True
        return False

    while grow():
        pass
    return [point for point in points() if probe(point) is not None]


def amos_buckets(recorder: Recorder) -> List[List[Tuple[tuple, object]]]:
    """Every combination of Amos' walks, with at most one phased tensor, of each
    number of merged dims."""
    walks = [((5, 7), None),     # elementwise slots
             ((5, 7), (1,)),     # short rows of 7 elements (a tile of rows per program)
             ((2, 100), (1,)),   # rows of 100 elements (a program per row)
             ((4, 128), (1,))]   # rows of a multiple of 8 elements
    phased = [None, ((recorder.amos.AMOS_MAX_ROW + 1,), "all")]  # a long row: 1 merged dim
    for ndim in range(2, recorder.max_amos_dims() + 1):  # alternately reduced dims: ndim merged
        phased.append(((2,) * ndim, tuple(range(0, ndim, 2))))
    for ndim, (shape, axes) in enumerate(phased[1:], 1):
        p = recorder.torch.zeros(shape)
        v = recorder.torch.zeros(recorder.amos_slots.slot_shape(shape, axes))
        layout, = recorder.amos.slot_layouts("check", [p], [v], [v], recorder.amos.AMOS_MAX_ROW)
        if not layout.phased or len(layout.sizes) != ndim:
            raise RuntimeError(f"Amos tensor {shape} reducing {axes}: {layout}, expected {ndim} merged dims")
    buckets = []
    for count in range(len(walks) + 1):
        for subset in itertools.combinations(walks, count):
            for extra in phased:
                bucket = list(subset) + ([extra] if extra else [])
                if bucket:
                    buckets.append(bucket)
    return buckets


def launched_variants(recorder: Recorder, log: Callable[[str], None]) -> Dict[str, List[Variant]]:
    """Every variant the launches produce, by kernel (in first-launch order)."""
    found: Dict[Variant, None] = {}
    plain_buckets = [[((37,), None)], [((37,), None), ((5, 7), None)]]  # one tensor, two
    steps = [(algorithm, False) for algorithm in recorder.ops.algorithms()]
    steps += [(algorithm, True) for algorithm in recorder.ops.fp8_algorithms()]  # FP8 states
    for algorithm, fp8 in steps:
        buckets = amos_buckets(recorder) if algorithm == "amos" else plain_buckets
        probe_bucket = max(buckets, key=len)  # every walk of the algorithm
        dtypes = FP8_DTYPES if fp8 else DTYPES
        memo: Dict[tuple, Optional[FrozenSet[Variant]]] = {}

        def probe(hyper):
            key = tuple(sorted(hyper.items()))
            if key not in memo:
                results = [recorder.step(algorithm, hyper, dtype, True, probe_bucket, strict=False, fp8=fp8)
                           for dtype in dtypes]
                memo[key] = None if None in results else frozenset().union(*results)
            return memo[key]

        names = recorder.contracts.contract(algorithm).hyper
        sweep = hyper_sweep(names, probe)
        swept = sorted({name for point in sweep for name, value in point.items()
                        if value != hyper_values(name)[0]})
        before = len(found)
        for hyper, dtype, aligned, bucket, telemetry, rounding, capturable in itertools.product(
                sweep, dtypes, (True, False), buckets, (False, True), (False, True), (False, True)):
            if rounding and dtype != "bfloat16":  # round keys are for bfloat16 params only
                continue
            if capturable and (telemetry or rounding or fp8):  # capturable steps take neither
                continue
            for variant in recorder.step(algorithm, hyper, dtype, aligned, bucket, telemetry=telemetry,
                                         rounding=rounding, fp8=fp8, capturable=capturable):
                found.setdefault(variant)
        log(f"{algorithm}{' (FP8 states)' if fp8 else ''}: swept {', '.join(swept) or 'no hyper-parameter'} "
            f"({len(sweep)} point(s)) x {len(dtypes)} dtypes x aligned/misaligned x {len(buckets)} bucket(s) "
            f"x without/with telemetry x (bfloat16) without/with stochastic rounding x host/capturable: "
            f"{len(found) - before} new variant(s)")
    by_kernel: Dict[str, List[Variant]] = {}
    for variant in found:
        by_kernel.setdefault(variant.kernel, []).append(variant)
    return by_kernel


# ---------------------------------------------------------------------------
# Which variants to compile
# ---------------------------------------------------------------------------

def pairwise_cover(variants: Sequence[Variant]) -> List[Variant]:
    """A subset of ``variants`` holding every pair of (axis, value)s that some variant
    holds: first the heaviest variant for each value of each axis, then greedily
    the variant adding the most uncovered pairs."""
    pairs = [frozenset(itertools.combinations(sorted(v.axes().items()), 2)) for v in variants]
    chosen: List[int] = []
    best: Dict[Tuple[str, str], int] = {}
    for i, variant in enumerate(variants):
        for item in variant.axes().items():
            if item not in best or variant.weight() > variants[best[item]].weight():
                best[item] = i
    for i in best.values():
        if i not in chosen:
            chosen.append(i)
    uncovered = set().union(*pairs) - set().union(*(pairs[i] for i in chosen))
    # Lazy greedy: a variant's gain only shrinks as pairs get covered.
    heap = [(-len(pairs[i] & uncovered), i) for i in range(len(variants)) if i not in chosen]
    heapq.heapify(heap)
    while uncovered and heap:
        _, i = heapq.heappop(heap)
        gain = len(pairs[i] & uncovered)
        if gain == 0:
            continue
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        chosen.append(i)
        uncovered -= pairs[i]
    return [variants[i] for i in chosen]


# ---------------------------------------------------------------------------
# Compiling (in worker processes)
# ---------------------------------------------------------------------------

class Result(NamedTuple):
    variant: Variant
    seconds: float
    error: Optional[str] = None
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0


_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _init_worker(root: str) -> None:
    if root not in sys.path:
        sys.path.insert(0, root)
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True


def compile_variant(task: Tuple[Variant, int]) -> Result:
    variant, arch = task
    import triton
    from triton.backends.compiler import GPUTarget
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    source = triton.compiler.ASTSource(
        fn=fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs),
        attrs={(i,): [["tt.divisibility", 16]] for i in variant.divisible})
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    except Exception as error:  # a kernel that does not compile: reported, not raised
        text = f"{type(error).__name__}: {error}".strip()
        if not str(error).strip():
            text += "\n" + traceback.format_exc()
        return Result(variant, time.perf_counter() - start, error=text)
    seconds = time.perf_counter() - start
    report = log.getvalue()
    registers = [int(n) for n in _REGISTERS.findall(report)]
    frames = [tuple(map(int, m)) for m in _FRAME.findall(report)]
    if not registers or not frames:
        return Result(variant, seconds, error="no ptxas report of registers and spills in:\n" + report)
    return Result(variant, seconds, registers=max(registers), stack=max(f[0] for f in frames),
                  spill_stores=sum(f[1] for f in frames), spill_loads=sum(f[2] for f in frames),
                  shared=int(compiled.metadata.shared))


def compile_all(variants: Sequence[Variant], arch: int, jobs: int) -> Iterable[Result]:
    tasks = [(variant, arch) for variant in variants]
    if jobs <= 1:
        _init_worker(ROOT)
        yield from map(compile_variant, tasks)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that ran torch
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(ROOT,)) as pool:
        yield from pool.map(compile_variant, tasks, chunksize=1)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def line(result: Result) -> str:
    v = result.variant
    if result.error:
        status, numbers = "FAILED", "compile error"
    else:
        spilled = result.spill_stores or result.spill_loads
        status = "SPILLS" if spilled else "ok"
        numbers = (f"regs {result.registers:3d}  spill {result.spill_stores}/{result.spill_loads} B  "
                   f"stack {result.stack} B  smem {result.shared} B")
    return f"{status:6s} {v.kernel:26s} {numbers:52s} {result.seconds:5.1f}s  {v.describe()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")),
                        help="parallel compiles (default: $JOBS or 2)")
    parser.add_argument("--max-all", type=int, default=256,
                        help="kernels with at most this many variants are compiled in all of them; "
                             "others in a pairwise cover (default 256: every kernel but amos_kernel, "
                             "adam_kernel's 224 the most)")
    parser.add_argument("--all", action="store_true", help="compile every variant of every kernel")
    parser.add_argument("--kernel", default="", help="only kernels whose name matches this regex")
    parser.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("triton") is None:
        print("SKIPPED: triton is not installed")
        return 0
    start = time.perf_counter()
    sys.path.insert(0, ROOT)
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
    import triton
    recorder = Recorder()
    print(f"triton {triton.__version__}, target cuda sm_{args.arch}; kernels from "
          f"{os.path.dirname(recorder.common.__file__)}")
    by_kernel = launched_variants(recorder, print)
    pattern = re.compile(args.kernel)
    selected: List[Variant] = []
    plan = []
    for kernel, variants in by_kernel.items():
        if not pattern.search(kernel):
            continue
        chosen = variants if args.all or len(variants) <= args.max_all else pairwise_cover(variants)
        plan.append((kernel, len(chosen), len(variants)))
        selected.extend(chosen)
    print(f"{len(selected)} variant(s) to compile, of {sum(n for _, _, n in plan)} launched "
          f"(recorded in {time.perf_counter() - start:.0f}s):")
    for kernel, count, total in plan:
        how = "all" if count == total else "pairwise cover"
        print(f"  {kernel:26s} {count:4d} of {total:5d}  ({how})")
    if args.list:
        for variant in selected:
            print(f"{variant.kernel:26s} {variant.describe()}")
        return 0

    cache = tempfile.mkdtemp(prefix="triton-aot-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every variant really compiles
    results: List[Result] = []
    compile_start = time.perf_counter()
    try:
        for result in compile_all(selected, args.arch, max(1, args.jobs)):
            results.append(result)
            print(line(result), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    print(f"\nsummary (sm_{args.arch}, {len(results)} variant(s), compiled in "
          f"{time.perf_counter() - compile_start:.0f}s with {args.jobs} job(s), "
          f"{time.perf_counter() - start:.0f}s in all):")
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and (r.spill_stores or r.spill_loads)]
    for kernel, _, total in plan:
        mine = [r for r in results if r.variant.kernel == kernel and not r.error]
        regs = [r.registers for r in mine]
        print(f"  {kernel:26s} {len(mine):4d} compiled of {total:5d}"
              + (f"  regs {min(regs)}-{max(regs)}  max spill {max(r.spill_stores + r.spill_loads for r in mine)} B"
                 f"  max smem {max(r.shared for r in mine)} B" if mine else "")
              + "".join(f"  {n} {what}" for n, what in (
                  (sum(1 for r in failed if r.variant.kernel == kernel), "FAILED"),
                  (sum(1 for r in spilled if r.variant.kernel == kernel), "SPILL")) if n))
    for result in failed:
        print(f"\nFAILED {result.variant.kernel} {result.variant.describe()}\n{result.error}")
    for result in spilled:
        print(f"SPILLS {result.variant.kernel}: {result.spill_stores} B stores / {result.spill_loads} B loads, "
              f"{result.registers} registers: {result.variant.describe()}")
    ok = not failed and not spilled
    print(f"triton compile check: {'passed' if ok else 'FAILED'} ({len(failed)} failed to compile, "
          f"{len(spilled)} spill registers)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
