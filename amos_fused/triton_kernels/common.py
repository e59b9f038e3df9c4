"""What every algorithm of the Triton backend shares:

  * bucket metadata (host): per-bucket device tables, built once and cached;
  * the bucket walker (device): which tensor and block a program owns, the
    address of a tensor's stream, loads / stores in the storage dtype with math
    in the compute dtype;
  * scalar math helpers (the counterparts of the af_* helpers of csrc/step_math.h);
  * stochastic rounding of bfloat16 params: the Triton copy of the hash of
    csrc/stochastic_round.h and the per-step rounding table;
  * coefficient tables and launch helpers;
  * the input checks of the ops, run before anything is written.

The algorithms (math, kernels, coefficients and launch of each) live in adam.py,
amos.py and norm_scaled.py; ops.py holds the public ops."""
import contextlib
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Type

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .. import stochastic_round as host_rounding
from ..checks import Problem, Walk, check_step
from ..contracts import column_indices

BLOCK = 1024          # elements per program (blocks, row chunks, slots)
NUM_WARPS = 4
# Every launch but ScaledAdamW's and LAMB's (norm_scaled.py: their norms are sums
# whose last bits differ from the CPU kernels' anyway, and without contraction one
# of LAMB's float16 variants spills) passes enable_fp_fusion=FP_FUSION: no a·b + c
# contracted into one fma behind the code's back.  Triton's GPU backends contract by default (LLVM's
# fp-contract=fast, ptxas --fmad=true), the C++ kernels are built with
# -ffp-contract=off; both round once only where the math says so (tl.fma here,
# af_fma in csrc/step_math.h), which keeps them bitwise equal.  The interpreter
# contracts nothing and ignores the option.
FP_FUSION = False

# ---------------------------------------------------------------------------
# Bucket metadata (host)
# ---------------------------------------------------------------------------
#
# A bucket's kernels find everything through small device tables:
#   * addresses — the element address of every tensor of every stream (param and
#     state lists), int64, stream-major: ``addresses[s * n + t]``;
#   * numels    — elements per tensor, int64;
#   * blocks    — the block→tensor map: for program i, ``blocks[2i]`` is its tensor
#     and ``blocks[2i + 1]`` the index of its block (or row) within that tensor,
#     so ONE launch covers the whole bucket whatever the number of tensors.
# Grads get a table of their own (``GradAddresses``): autograd may hand over new
# grad tensors every step, and only that small table is re-uploaded then.
#
# The cache key is made of the tensors' ``data_ptr()``s and sizes (never ``id()``),
# so a table is rebuilt exactly when an address or a shape changes.

# Vector loads need 16-byte aligned tensors (torch's allocations are; views may not be).
VECTOR_BYTES = 16


class BucketCache:
    """Least-recently-used metadata, sized by use: it keeps at least ``minimum``
    entries, and twice the largest reuse distance seen (the number of lookups
    between two lookups of one key — about the buckets of one optimizer step),
    so a model with more buckets than ``minimum`` is never rebuilt every step."""

    def __init__(self, minimum: int = 64):
        self.minimum = minimum
        self.capacity = minimum
        self.entries: "OrderedDict[Hashable, object]" = OrderedDict()
        self.last_use: Dict[Hashable, int] = {}
        self.lookups = 0

    def get(self, key: Hashable, build: Callable[[], object]):
        self.lookups += 1
        if key in self.last_use:
            self.capacity = max(self.capacity, 2 * (self.lookups - self.last_use[key]))
        self.last_use[key] = self.lookups
        meta = self.entries.get(key)
        if meta is None:
            meta = build()
            meta.cache_key = key
            self.entries[key] = meta
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
            if len(self.last_use) > 4 * self.capacity:  # forget the reuse of long-gone keys
                self.last_use = {k: self.last_use[k] for k in self.entries}
        else:
            self.entries.move_to_end(key)
        return meta

    def forget(self, key: Hashable) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()
        self.last_use.clear()
        self.capacity = self.minimum


_cache = BucketCache()


def cached(key: Hashable, build: Callable[[], object]):
    """The metadata stored under ``key``, built on a miss."""
    return _cache.get(key, build)


def forget(key: Hashable) -> None:
    """Drops a cache entry (after a failed launch, whose scratch state is unknown)."""
    _cache.forget(key)


def clear_cache() -> None:
    _cache.clear()


def addresses_of(streams: Sequence[Sequence[Tensor]]) -> Tuple[int, ...]:
    return tuple(t.data_ptr() for stream in streams for t in stream)


def all_aligned(addresses: Sequence[int]) -> bool:
    return all(a % VECTOR_BYTES == 0 for a in addresses)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math dtype for a storage dtype: fp32, fp64 for fp64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host table on ``device``.  For CUDA it is staged in pinned memory and copied
    without blocking the host (a copy from pageable memory waits for the stream);
    torch's caching host allocator keeps the pinned block until the copy has run."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def int64_table(values, device: torch.device) -> Tensor:
    return to_device(torch.as_tensor(values, dtype=torch.int64, device="cpu"), device)


def program_map(programs: Tensor) -> Tensor:
    """Interleaved (tensor, index) pairs: ``programs[t]`` programs for tensor t,
    numbered 0, 1, … within it."""
    programs = programs.to(torch.int64)
    total = int(programs.sum())
    tensor = torch.repeat_interleave(torch.arange(len(programs), device="cpu"), programs)
    first = torch.cumsum(programs, 0) - programs
    index = torch.arange(total, device="cpu") - torch.repeat_interleave(first, programs)
    return torch.stack([tensor, index], 1).reshape(-1)


def first_programs(counts: Sequence[int]) -> List[int]:
    """Each tensor's first program of a program map with ``counts[t]`` programs for
    tensor t, then the total (len(counts) + 1 entries)."""
    firsts = [0]
    for count in counts:
        firsts.append(firsts[-1] + int(count))
    return firsts


def block_map(counts: Tensor, block: int) -> Tensor:
    """program_map covering ``counts[t]`` elements of each tensor in blocks of ``block``."""
    counts = counts.to(torch.int64)
    return program_map((counts + block - 1) // block)


class GradAddresses:
    """The grad address table of one bucket, re-uploaded only when a grad moved."""

    def __init__(self, device: torch.device):
        self.device = device
        self.key: Tuple[int, ...] = ()
        self.table: Tensor = torch.empty(0, dtype=torch.int64, device=device)
        self.aligned = True

    def get(self, grads: Sequence[Tensor]) -> Tuple[Tensor, bool]:
        key = tuple(g.data_ptr() for g in grads)
        if key != self.key:
            self.table = int64_table(key, self.device)
            self.aligned = all_aligned(key)
            self.key = key
        return self.table, self.aligned


class StreamTables:
    """What every bucket's metadata holds: its device, size, the address table of
    its streams (params first) and of its grads, and whether all are aligned."""

    def __init__(self, streams: Sequence[Sequence[Tensor]]):
        params = streams[0]
        self.device = params[0].device
        self.n = len(params)
        addresses = addresses_of(streams)
        self.addresses = int64_table(addresses, self.device)
        self.aligned = all_aligned(addresses)
        self.grad_addresses = GradAddresses(self.device)
        self.program_counts: List[int] = []  # programs per tensor of the launch that writes θ
        self._telemetry_scratch: Optional[Tuple[Tensor, Tensor]] = None

    def telemetry_scratch(self) -> Tuple[Tensor, Tensor]:
        """(partials, first_programs) of the telemetry of a step, built on first use:
        float64 partials [programs, (Σθ², Σ(Δθ)²)] of the launch that writes θ, one
        pair per program, and each tensor's first program (n + 1 entries)."""
        if self._telemetry_scratch is None:
            firsts = first_programs(self.program_counts)
            self._telemetry_scratch = (
                torch.empty(2 * max(firsts[-1], 1), dtype=torch.float64, device=self.device),
                int64_table(firsts, self.device))
        return self._telemetry_scratch


class BucketMeta(StreamTables):
    """Device tables of one bucket walked elementwise in blocks of ``block``."""

    def __init__(self, streams: Sequence[Sequence[Tensor]], block: int):
        super().__init__(streams)
        params = streams[0]
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device="cpu")
        self.numels = to_device(numels, self.device)
        blocks = block_map(numels, block)
        self.num_blocks = len(blocks) // 2
        self.blocks = to_device(blocks, self.device)
        self.program_counts = [-(-int(numel) // block) for numel in numels]


def elementwise_key(tag: str, streams: Sequence[Sequence[Tensor]], block: int) -> tuple:
    params = streams[0]
    return (tag, params[0].dtype, params[0].device, block, addresses_of(streams),
            tuple(p.numel() for p in params))


def elementwise_meta(tag: str, streams: List[Sequence[Tensor]], block: int,
                     kind: Type[BucketMeta] = BucketMeta) -> BucketMeta:
    """The cached metadata (of class ``kind``) of a bucket whose streams (params
    first) are walked elementwise."""
    return cached(elementwise_key(tag, streams, block), lambda: kind(streams, block))


# ---------------------------------------------------------------------------
# The bucket walker (device)
# ---------------------------------------------------------------------------

@triton.jit
def program_entry(table):
    """This program's (tensor, index) pair of a program map."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(table + 2 * pid), tl.load(table + 2 * pid + 1)


# True when triton.jit made interpreted functions (TRITON_INTERPRET=1 at import):
# the kernels then step CPU tensors.  The interpreter converts fp32 → bf16 by
# truncation where GPUs round to nearest even, so its stores round explicitly
# and CPU tests see the GPU's rounding.
INTERPRETED = tl.constexpr(isinstance(program_entry, InterpretedFunction))


@triton.jit
def stream(addresses, s, n, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the first element of tensor t of stream s (addresses[s·n + t])."""
    ptr = tl.load(addresses + s * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # lets full blocks use 16-byte vector accesses
    return ptr


@triton.jit
def load_block(ptrs, mask, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    """The elements at ptrs (masked ones read as 0) in the compute dtype."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return from_storage(x, COMPUTE)


@triton.jit
def from_storage(x, COMPUTE: tl.constexpr):
    """x (a storage dtype) in the compute dtype, exactly (a widening: every value
    kept, bfloat16 subnormals included, which the interpreter's own bfloat16 →
    float32 cast loses; there the bits are widened instead)."""
    y = x.to(COMPUTE)
    if INTERPRETED:
        if x.dtype == tl.bfloat16:
            bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            y = bits.to(tl.float32, bitcast=True).to(COMPUTE)
    return y


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """x (compute dtype) rounded to nearest even in the storage dtype."""
    y = x.to(DTYPE)
    if INTERPRETED:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            y = tl.where(x != x, y, rounded)  # NaN stays NaN
    return y


@triton.jit
def store_block(ptrs, x, mask, MASKED: tl.constexpr):
    """Stores x (compute dtype) at ptrs, rounded to their storage dtype."""
    y = to_storage(x, ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, y, mask=mask)
    else:
        tl.store(ptrs, y)


# ---------------------------------------------------------------------------
# Stochastic rounding of bfloat16 params (bf16_stochastic_round=True)
# ---------------------------------------------------------------------------
#
# The Triton copy of the hash of csrc/stochastic_round.h (the reference copy is
# amos_fused/stochastic_round.py; the bits are the same on every backend):
#   key     = seed << 32 | the param's index in the optimizer (round_keys)
#   pair    = element >> 1
#   base    = h(key_lo ^ h(key_hi ^ h(step ^ h(pair >> 32))))
#   word    = h(base ^ (pair & 0xffffffff))
#   bits    = word & 0xffff for an even element, word >> 16 for an odd one
#   rounded = bits_of(x) + bits, low 16 bits cleared (NaN kept as is)
# with h = lowbias32, step the param's step count after this step's increment and
# `element` the element's offset from the param's first element.
#
# A launch that writes θ with ROUND=True gets a ``rounding`` table (round_table):
# per tensor t, at rounding[4t …], (base for pairs < 2^32, key_lo, key_hi,
# step), uint32 values in int64.  A block whose elements all lie below 2^33 (every
# block of a tensor of fewer than 2^33 elements) takes the base from the table;
# any other block hashes each element's own base.  Without ROUND a kernel does
# what it did before (its rounding argument, then another table, is unused).

ROUND_WIDTH = tl.constexpr(4)


def round_table(round_keys: Optional[Sequence[int]], steps: Sequence[Tensor],
                device: torch.device) -> Optional[Tensor]:
    """The rounding table of a step (see above), or None without round_keys.
    ``steps``: the float32 step counters BEFORE this step's increment (the hash
    takes the count after it, float32 + 1 as csrc/step_prologue.h's next_steps)."""
    if round_keys is None:
        return None
    mask32 = host_rounding.MASK32
    after = torch.tensor([float(s) + 1.0 for s in steps], dtype=torch.float32, device="cpu").tolist()
    rows = []
    for key, step in zip(round_keys, after):
        key, step = int(key) & 0xFFFFFFFFFFFFFFFF, int(step) & mask32
        rows.append((host_rounding.round_base(key, step, 0), key & mask32, key >> 32, step))
    return int64_table(rows, device)


@triton.jit
def lowbias32(x):
    """C. Wellons' lowbias32 of uint32 values (csrc/stochastic_round.h)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def round_base(key_lo, key_hi, step, pair_hi):
    """The part of the hash shared by the elements of one tensor at one step whose
    pair indices have the same high word (uint32 values)."""
    return lowbias32(key_lo ^ lowbias32(key_hi ^ lowbias32(step ^ lowbias32(pair_hi))))


@triton.jit
def round_bits(round_row, first, offs, BLOCK: tl.constexpr):
    """The random bits (uint32, below 2^16) of the elements at offsets offs (int64)
    of the tensor whose rounding-table row is round_row; first: a scalar ≤ every
    offset of offs, all of them below first + BLOCK."""
    pairs = offs >> 1
    base = tl.zeros_like(offs).to(tl.uint32) + tl.load(round_row).to(tl.uint32)
    if (first + (BLOCK - 1)) >> 33 != 0:  # pairs at or past 2^32: a base per element
        key_lo = tl.load(round_row + 1).to(tl.uint32)
        key_hi = tl.load(round_row + 2).to(tl.uint32)
        step = tl.load(round_row + 3).to(tl.uint32)
        base = round_base(key_lo, key_hi, step, (pairs >> 32).to(tl.uint32))
    word = lowbias32(base ^ (pairs & 0xFFFFFFFF).to(tl.uint32))
    return (word >> ((offs & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def stochastic_round(x, bits):
    """x (float32) rounded to a bfloat16 value (still float32, exact in bfloat16)
    with the random bits; NaN kept as is."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (bits & 0xFFFF)) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


@triton.jit
def round_block(x, round_row, first, offs, BLOCK: tl.constexpr):
    """x (the float32 new θ of the elements at offs, see round_bits) stochastically
    rounded to bfloat16 values: stored as they are (to_storage is then exact)."""
    return stochastic_round(x, round_bits(round_row, first, offs, BLOCK))


def rounding_table(meta, rounding: Optional[Tensor]) -> Tensor:
    """The rounding table a launch that writes θ gets: ``rounding``, or (no rounding)
    the address table, never read (ROUND=False)."""
    return meta.addresses if rounding is None else rounding


# ---------------------------------------------------------------------------
# Per-tensor sums, deterministic
# ---------------------------------------------------------------------------
#
# A sum over a tensor that spans several programs (the norms of the norm-scaled
# rules, the telemetry of a step) is taken in two launches: each program writes
# its pair of sums to its own entry of a ``partials`` buffer (one pair per
# program, in program order — a tensor's programs are contiguous in a program
# map), then tensor_sums_kernel adds each tensor's entries in a fixed order.  No
# atomics: nothing depends on the order the programs run in.
#
# Telemetry (``track_rms``): the launch that writes θ gets TELEMETRY=True and the
# float64 partials of ``StreamTables.telemetry_scratch``; each program adds, over
# its elements, Σθ² of θ as stored and Σ(Δθ)² of Δθ = stored θ − θ before (both
# in the compute dtype, the stored values exact in it), in one tree sum per block
# (a program walking several blocks adds them lane by lane first), and writes the
# pair in float64; tensor_sums_kernel then writes row t of the [n, 2] float64
# telemetry table.  Without TELEMETRY a kernel does what it did before telemetry
# existed (its partials argument, then a table it never writes, is unused).

@triton.jit
def tracked_squares(before, x, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """(θ², (Δθ)²) per element of θ = x (compute dtype) as stored in DTYPE and
    Δθ = θ − before (the value loaded before the step); masked elements 0."""
    after = from_storage(to_storage(x, DTYPE), before.dtype)
    delta = after - before
    weight_sq = after * after
    update_sq = delta * delta
    if MASKED:
        weight_sq = tl.where(mask, weight_sq, 0.0)
        update_sq = tl.where(mask, update_sq, 0.0)
    return weight_sq, update_sq


@triton.jit
def write_telemetry(own, weight_sq, update_sq):
    """This program's (Σθ², Σ(Δθ)²) from per-element (or per-lane) values, to its
    own float64 pair of the telemetry partials."""
    tl.store(own, tl.sum(weight_sq, 0).to(tl.float64))
    tl.store(own + 1, tl.sum(update_sq, 0).to(tl.float64))


@triton.jit
def track_block(own, before, x, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Telemetry of a program that writes one block of θ: x (compute dtype) is its
    new θ, stored in DTYPE; before its θ before the step."""
    weight_sq, update_sq = tracked_squares(before, x, mask, DTYPE, MASKED)
    write_telemetry(own, weight_sq, update_sq)


@triton.jit
def telemetry_entry(partials):
    """This program's pair of the telemetry partials."""
    return partials + 2 * tl.program_id(0).to(tl.int64)


@triton.jit
def tensor_sums_kernel(partials, first_blocks, sums, COMPUTE: tl.constexpr, BOTH: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Program t: sums[2t] (and sums[2t + 1] when BOTH) = Σ of the first (second)
    entries of tensor t's pairs of partials (programs first_blocks[t] …
    first_blocks[t + 1] − 1), in COMPUTE and a fixed order: lane i of a vector takes
    the entries ≡ i (mod BLOCK) in program order, then one tree sum of the lanes.
    A tensor with no programs gets 0."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(first_blocks + t)
    end = tl.load(first_blocks + t + 1)
    acc = tl.zeros([BLOCK], COMPUTE)
    second_acc = tl.zeros([BLOCK], COMPUTE)
    j = first
    while j < end:
        blocks = j + tl.arange(0, BLOCK)
        mask = blocks < end
        acc += tl.load(partials + 2 * blocks, mask=mask, other=0.0)
        if BOTH:
            second_acc += tl.load(partials + 2 * blocks + 1, mask=mask, other=0.0)
        j += BLOCK
    tl.store(sums + 2 * t, tl.sum(acc, 0))
    if BOTH:
        tl.store(sums + 2 * t + 1, tl.sum(second_acc, 0))


def telemetry_partials(meta, telemetry: Optional[Tensor]) -> Tensor:
    """The partials a launch that writes θ gets: the float64 telemetry partials, or
    (no telemetry) the address table, never written (TELEMETRY=False)."""
    return meta.addresses if telemetry is None else meta.telemetry_scratch()[0]


def launch_telemetry_sums(meta, telemetry: Optional[Tensor]) -> None:
    """After the launch that wrote θ (with TELEMETRY): rows of ``telemetry`` from its
    partials.  Nothing without telemetry."""
    if telemetry is None:
        return
    partials, firsts = meta.telemetry_scratch()
    tensor_sums_kernel[(meta.n,)](partials, firsts, telemetry, COMPUTE=tl.float64, BOTH=True,
                                  BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)


# ---------------------------------------------------------------------------
# Scalar math helpers
# ---------------------------------------------------------------------------
#
# fp32 ``/`` and ``tl.sqrt`` lower to approximate instructions on NVIDIA GPUs;
# the C++ kernels use IEEE-rounded ones, so fp32 math here goes through
# ``div_rn`` / ``sqrt_rn``.  FP64 selects plain (IEEE) fp64 operations.

@triton.jit
def ieee_sqrt(x, FP64: tl.constexpr):
    """sqrt rounded to nearest (sqrt_rn in fp32)."""
    if FP64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def ieee_div(a, b, FP64: tl.constexpr):
    """a / b rounded to nearest (div_rn in fp32)."""
    if FP64:
        y = a / b
    else:
        y = tl.math.div_rn(a, b)
    return y


@triton.jit
def nan_maximum(a, b):
    """torch.maximum: a NaN in either operand propagates."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def nan_clamp(x, lo, hi):
    """torch.clamp: NaN stays NaN."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def torch_sign(x):
    """torch.sign's (x > 0) − (x < 0): sign(±0) = sign(NaN) = +0."""
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def torch_lerp(a, b, w, small):
    """torch.lerp(a, b, w) as torch rounds it (af_lerp): a + w·(b−a) when |w| < ½
    (``small`` ≠ 0, chosen per tensor on the host), else b + (w−1)·(b−a), each one
    fma; w − 1 is exact for ½ ≤ w ≤ 2."""
    return tl.where(small != 0, tl.fma(w, b - a, a), tl.fma(w - 1.0, b - a, b))


# ---------------------------------------------------------------------------
# Coefficient tables and launches
# ---------------------------------------------------------------------------
#
# Per-step, per-tensor scalars of each algorithm are computed on the host in
# double by the C++ prologue shared with the CPU and CUDA ops (the
# ``begin_step`` op; csrc/step_coefficients.h), then rounded once to the compute
# dtype and uploaded as one small table per launch: one row per tensor, its
# columns named by the algorithm's contract (amos_fused/contracts.py).

def column_constants(algorithm: str, names: Sequence[str]) -> Tuple[tl.constexpr, ...]:
    """The columns of ``names`` in ``algorithm``'s coefficient table, as constexprs the
    kernels add to a row's address (``names``: exactly the contract's columns)."""
    return tuple(tl.constexpr(i) for i in column_indices(algorithm, names))


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16, torch.float64: tl.float64}


def kernel_dtypes(dtype: torch.dtype) -> dict:
    """Storage and compute dtypes (fp32 math; fp64 for fp64 tensors) as constexprs."""
    fp64 = dtype == torch.float64
    return dict(DTYPE=_TL_DTYPES[dtype], COMPUTE=tl.float64 if fp64 else tl.float32, FP64=fp64)


def upload_coefficients(coef: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The step's coefficient table (float64, on the host or already on the params'
    device: a capturable step's, device_coefficients.py) in the compute dtype on the
    params' device, copied without a host sync (to_device)."""
    coef = coef.to(dtype=compute_dtype(params[0].dtype))
    return coef if coef.device == params[0].device else to_device(coef, params[0].device)


def skip_flag(found_inf: Optional[Tensor], meta) -> Tensor:
    """The ``skip`` argument of a kernel that writes: GradScaler's found_inf on the
    device (a capturable step: SKIPPABLE kernels return when it is non-zero), or a
    stand-in never read (the bucket's address table)."""
    return meta.addresses if found_inf is None else found_inf


@contextlib.contextmanager
def launching(meta):
    """Runs launches on the bucket's device; a failed launch drops the bucket's cached
    metadata (its scratch buffers may be left half-written)."""
    device = meta.device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with guard:
            yield
    except BaseException:
        forget(meta.cache_key)
        raise


# ---------------------------------------------------------------------------
# Input checks: the C++ checks of csrc/checks.h (the ``check_step`` op) plus what
# only Triton needs
# ---------------------------------------------------------------------------

_DESCRIBE_PROBLEM = {
    Problem.GRAD_SPARSE: "grads[{i}] is sparse",
    Problem.GRAD_DTYPE: "grads[{i}] has another dtype than its param",
    Problem.GRAD_DEVICE: "grads[{i}] is on another device than its param",
    Problem.GRAD_SHAPE: "grads[{i}] has another shape than its param",
    Problem.GRAD_LAYOUT: "grads[{i}] has other strides than its param",
    Problem.PARAM_DTYPE: "params[{i}] has an unsupported dtype (float32, float64, bfloat16, float16)",
    Problem.PARAM_MIXED: "params[{i}] has another dtype or device than params[0]",
    Problem.PARAM_LAYOUT: "params[{i}] is not dense in memory (a strided view?), or not contiguous "
                          "where its slots need it",
    Problem.SLOT: "{name}[{i}] must be a contiguous tensor of its param's dtype and device",
    Problem.STATE: "{name}[{i}] does not match its param",
    Problem.STEP: "steps[{i}] must be a float32 CPU scalar",
    Problem.OVERLAP: "params[{i}] shares memory with another param",
}


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def kernels_interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when
    they were first imported): they then step CPU tensors."""
    return bool(INTERPRETED.value)


def check_device(op: str, device: torch.device) -> None:
    if kernels_interpreted():
        if device.type != "cpu":
            raise ValueError(f"{op}: Triton's interpreter (TRITON_INTERPRET=1) steps CPU tensors, "
                             f"got tensors on {device}")
    elif device.type != "cuda":
        raise ValueError(f"{op}: the Triton kernels step CUDA tensors, got tensors on {device} "
                         "(CPU tensors need TRITON_INTERPRET=1)")


def check_bucket(op: str, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                 states: Dict[str, Sequence[Tensor]], steps: Sequence[Tensor],
                 slots: Optional[Dict[str, Sequence[Tensor]]] = None, elements: bool = True) -> None:
    """The C++ checks of csrc/checks.h (one pass): params dense (contiguous when
    ``slots`` are given: Amos), of one supported dtype and one device, not
    overlapping; every grad and state tensor shaped and laid out like its param;
    every slot (Amos v, b) contiguous, of its param's dtype and device; steps
    float32 CPU scalars.  An empty state list is not checked (that state is not
    used by the call).  ``elements=False``: the list lengths, grads and device
    only, for a caller that ran ``check_step`` over these very lists already."""
    slots = slots or {}
    n = len(params)
    if n == 0:
        raise ValueError(f"{op}: empty bucket")
    if len(grads) != n:
        raise ValueError(f"{op}: {n} params but {len(grads)} grads")
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise ValueError(f"{op}: grads[{missing[0]}] is None")
    check_device(op, params[0].device)
    names = [name for name, tensors in states.items() if len(tensors)]
    for name, tensors in list(states.items()) + list(slots.items()):
        if len(tensors) not in (0, n) or (name in slots and len(tensors) != n):
            raise ValueError(f"{op}: {n} params but {len(tensors)} {name}")
    if len(steps) not in (0, n):
        raise ValueError(f"{op}: {n} params but {len(steps)} steps")
    if not elements:
        return
    slot_names = list(slots)
    bad, problem, which = check_step(list(params), list(grads), [list(states[k]) for k in names],
                                     [list(slots[k]) for k in slot_names], list(steps),
                                     Walk.CONTIGUOUS if slots else Walk.DENSE)
    if problem != Problem.NONE:
        error = TypeError if problem in (Problem.PARAM_DTYPE, Problem.PARAM_MIXED) else ValueError
        name = {Problem.STATE: names, Problem.SLOT: slot_names}.get(problem, [""] * (which + 1))[which]
        raise error(f"{op}: " + _DESCRIBE_PROBLEM[problem].format(i=bad, name=name)
                    + f" (params[{bad}]: {_describe(params[bad])})")
