"""Amos on the Triton backend: slot layouts, bucket metadata, the coefficient
columns it reads, per-element math, kernels and launch.

Slot layouts.  How an Amos tensor's elements map to its v / b slots, read off
the shapes of the param and of its slot tensor by csrc/amos_layout.h (the
``amos_slot_layouts`` op): elementwise, rows or general, walked four ways:
  ELEMENTWISE — one slot per element (no reduced axis, or ≤ 1 element): one pass;
  SHORT_ROWS  — the reduced axes are trailing and merge into rows of ≤ SHORT_ROW_MAX
                contiguous elements: one program owns BLOCK // ROW_TILE consecutive
                rows as a [rows, ROW_TILE] tile (ROW_TILE: the bucket's longest
                short row, rounded up to a power of two), sums each row's g²,
                updates the slots and then the rows (one pass over memory);
  ROWS        — the same layout with rows of ≤ max_row elements: one program owns
                a row, sums its g², updates the slot and then the row;
  LONG_ROWS   — the same layout with longer rows (e.g. 'all' over a big tensor):
                split over many programs, so reduced in phases like GENERAL;
  GENERAL     — any other reduced axes: phases (Σg² per slot, slot update,
                elementwise update), the slot of an element found from the
                merged sizes and slot strides.

Bucket metadata.  The bucket tables of common.py plus, per tensor, its slot
layout as one int64 row of ``info``:

    numel, kind, row_len, slot_base, num_slots, partial_base, chunks, chunk_len,
    sizes[ndim], slot_strides[ndim]

(merged dims padded in front with size 1 / stride 0), and three program maps:
  * main  — ELEMENTWISE / phased tensors in blocks of ``block`` elements, ROWS one
            program per row, SHORT_ROWS one per ``block // row_tile`` rows: the
            launch that writes θ (and v, b of all but the phased);
  * sums  — phased tensors: (tensor, piece) pairs.  A LONG_ROWS row is cut into
            ``chunks`` pieces of ``block`` elements (a piece never crosses a row);
            piece i sums its elements.  A GENERAL tensor's slots are walked in
            blocks of ``block`` slots, each slot's elements (k = 0 … numel/num_slots)
            in ``chunks`` runs of ``chunk_len``; piece i = (run, slot block) sums,
            per slot, its run in k order;
  * slots — phased tensors' slots in blocks of ``block``.
Each piece writes its sums to its own entries of the ``partials`` buffer
(partial_base + row·chunks + piece for LONG_ROWS, partial_base + run·num_slots +
slot for GENERAL), never adding to another program's; the slot launch adds a
slot's ``chunks`` partials in order.  The reductions are therefore deterministic:
no atomics, nothing depends on the order the programs run in.  Phased tensors
also share a scratch buffer of (w, a) indexed by slot_base + slot.

Math, mirroring csrc/step_math.h: a slot's update of v and b, which yields the
slot's Δ = w·θ − a·g, then the elementwise part (optional momentum, θ ← θ + Δ).
γ, c and d use the OLD b; b is updated last; weight decay acts on the pre-update θ.

Launch order of a step:
  amos_sums_kernel   (phased tensors only) partial sums of clip(g)² per slot;
  amos_slots_kernel  (phased tensors only) Σ of each slot's partials (in order),
                     v, b of each slot and its (w, a);
  amos_kernel        every tensor: ELEMENTWISE blocks (slot math per element),
                     SHORT_ROWS (a tile of rows per program) and ROWS (one program
                     per row): Σg², slot update, row update — one pass over memory;
                     phased blocks (Δ from the slot's w, a);
                     with TELEMETRY each program (a block, or a ROWS row: its
                     chunks added lane by lane) writes Σθ², Σ(Δθ)² of the θ it
                     stored to its own pair of the telemetry partials; with ROUND
                     (bf16_stochastic_round) θ is rounded stochastically before
                     its store (common.py's round_block), and
  tensor_sums_kernel (telemetry only; common.py) adds each tensor's pairs in order.

Inputs are checked by ops.py before anything here runs (describing the slot
layouts checks the slot shapes)."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contracts import contract
from .common import (column_constants, BLOCK, FP_FUSION, StreamTables, addresses_of, cached, compute_dtype, ieee_div,
                     ieee_sqrt, int64_table, kernel_dtypes, launch_telemetry_sums, launching,
                     load_block, nan_clamp, nan_maximum, program_entry, program_map, round_block, rounding_table,
                     store_block, stream, telemetry_entry, telemetry_partials, to_storage, track_block, from_storage,
                     to_device, tracked_squares, upload_coefficients, write_telemetry, ROUND_WIDTH, skip_flag)

AMOS_NUM_WARPS = 8    # the Amos kernels hold more values per element (fewer registers per thread)
AMOS_MAX_ROW = 16384  # Amos rows longer than this are split over programs (LONG_ROWS)
SHORT_ROW_MAX = 64    # Amos rows up to this long share a program (SHORT_ROWS)
AMOS_SUM_WORK = 32 * 1024  # GENERAL Σg²: about this many elements per program


# ---------------------------------------------------------------------------
# Slot layouts (host)
# ---------------------------------------------------------------------------

# How this backend walks a tensor: the three slot kinds of csrc/amos_layout.h, with
# rows split into SHORT_ROWS (a tile of rows per program), ROWS (one program per
# row) and LONG_ROWS (reduced in phases).  The phased kinds come last.
ELEMENTWISE, SHORT_ROWS, ROWS, LONG_ROWS, GENERAL = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SlotLayout:
    kind: int
    num_slots: int
    row_len: int = 1                      # (SHORT_/LONG_)ROWS: elements per slot
    sizes: Tuple[int, ...] = ()           # LONG_ROWS / GENERAL: merged dims (row-major)
    slot_strides: Tuple[int, ...] = ()    # slot stride of each merged dim (0 = reduced)

    @property
    def phased(self) -> bool:
        """True when its slots are reduced and updated in separate launches."""
        return self.kind in (LONG_ROWS, GENERAL)


# The slot kinds of csrc/amos_layout.h (AmosSlotKind), described there for every backend.
SLOTS_ELEMENTWISE, SLOTS_ROWS, SLOTS_GENERAL = 0, 1, 2


def slot_layouts(op: str, params: Sequence[Tensor], vs: Sequence[Tensor], bs: Sequence[Tensor],
                 max_row: int, short_row: int = 0) -> List[SlotLayout]:
    """Every tensor's layout, as csrc/amos_layout.h describes it (the ``amos_slot_layouts``
    op, which also checks the slots: ValueError), with rows of at most ``short_row``
    elements walked as SHORT_ROWS and rows longer than ``max_row`` as LONG_ROWS."""
    table = torch.ops.amos_fused.amos_slot_layouts(op, list(params), list(vs), list(bs)).tolist()
    out = []
    for kind, num_slots, row_len, ndim, *rest in table:
        sizes = tuple(rest[:ndim])
        strides = tuple(rest[len(rest) // 2:len(rest) // 2 + ndim])
        if kind == SLOTS_ELEMENTWISE:
            out.append(SlotLayout(ELEMENTWISE, num_slots))
        elif kind == SLOTS_ROWS and row_len <= short_row:
            out.append(SlotLayout(SHORT_ROWS, num_slots, row_len=row_len))
        elif kind == SLOTS_ROWS and row_len <= max_row:
            out.append(SlotLayout(ROWS, num_slots, row_len=row_len))
        elif kind == SLOTS_ROWS:
            out.append(SlotLayout(LONG_ROWS, num_slots, row_len, sizes, strides))
        else:
            out.append(SlotLayout(GENERAL, num_slots, 0, sizes, strides))
    return out


# ---------------------------------------------------------------------------
# Bucket metadata (host)
# ---------------------------------------------------------------------------

# numel, kind, row_len, slot_base, num_slots, partial_base, chunks, chunk_len
INFO_FIXED = tl.constexpr(8)


class AmosMeta(StreamTables):
    """Device tables and scratch buffers of one Amos bucket (see the module docstring)."""

    def __init__(self, streams: Sequence[Sequence[Tensor]], layouts: Sequence[SlotLayout],
                 block: int):
        super().__init__(streams)
        params = streams[0]
        numels = [p.numel() for p in params]
        phased = [layout.phased and numel > 0 for layout, numel in zip(layouts, numels)]
        self.ndim = max([len(l.sizes) for l, ph in zip(layouts, phased) if ph] + [1])
        self.kinds = {l.kind for l, numel in zip(layouts, numels) if numel > 0}
        # ROWS chunks may start on 16-byte boundaries (with an aligned bucket).
        self.rows_aligned = all(l.row_len % 8 == 0 for l in layouts if l.kind == ROWS)
        # SHORT_ROWS tiles: [block // row_tile rows, row_tile elements]
        self.row_tile = row_tile([l.row_len for l in layouts if l.kind == SHORT_ROWS], block)

        info: List[List[int]] = []
        main_programs, slot_programs, sum_programs = [], [], []
        slot_base = partial_base = 0
        for layout, numel, is_phased in zip(layouts, numels, phased):
            pad = self.ndim - len(layout.sizes)
            chunks, chunk_len, pieces = (self._sum_pieces(layout, numel, block) if is_phased
                                         else (0, 0, 0))
            info.append([numel, layout.kind, layout.row_len, slot_base, layout.num_slots,
                         partial_base, chunks, chunk_len]
                        + [1] * pad + list(layout.sizes) + [0] * pad + list(layout.slot_strides))
            if layout.kind == ROWS:
                main_programs.append(numel // layout.row_len)
            elif layout.kind == SHORT_ROWS:
                rows_per_program = block // self.row_tile
                main_programs.append(-(-layout.num_slots // rows_per_program))
            else:
                main_programs.append(-(-numel // block))
            slot_programs.append(-(-layout.num_slots // block) if is_phased else 0)
            sum_programs.append(pieces)
            if is_phased:
                slot_base += layout.num_slots
                partial_base += chunks * layout.num_slots
        self.info = int64_table(info, self.device)
        self.program_counts = main_programs  # the telemetry partials: one pair per main program
        self.main_blocks = to_device(program_map(torch.tensor(main_programs, device="cpu")), self.device)
        self.num_main = len(self.main_blocks) // 2
        self.slot_blocks = to_device(program_map(torch.tensor(slot_programs, device="cpu")), self.device)
        self.num_slot_blocks = len(self.slot_blocks) // 2
        self.sum_blocks = to_device(program_map(torch.tensor(sum_programs, device="cpu")), self.device)
        self.num_sum_blocks = len(self.sum_blocks) // 2
        self.total_slots = slot_base
        scratch = dict(dtype=compute_dtype(params[0].dtype), device=self.device)
        self.partials = torch.empty(max(partial_base, 1), **scratch)  # Σg² pieces
        self.slot_updates = torch.empty(2 * max(slot_base, 1), **scratch)  # (w, a) per slot

    @staticmethod
    def _sum_pieces(layout: SlotLayout, numel: int, block: int) -> Tuple[int, int, int]:
        """(chunks, chunk_len, pieces) of a phased tensor's Σg² (module docstring)."""
        if layout.kind == LONG_ROWS:  # pieces of ≤ block elements inside each row
            chunks = -(-layout.row_len // block)
            return chunks, 0, layout.num_slots * chunks
        assert layout.kind == GENERAL
        count = numel // layout.num_slots  # elements per slot
        chunk_len = min(count, -(-AMOS_SUM_WORK // min(layout.num_slots, block)))
        chunks = -(-count // chunk_len)
        return chunks, chunk_len, chunks * -(-layout.num_slots // block)


def row_tile(short_row_lengths: Sequence[int], block: int) -> int:
    """The width of a bucket's SHORT_ROWS tiles: its longest short row rounded up to
    a power of two (at least 8 elements, at most ``block``)."""
    return min(block, max(8, triton.next_power_of_2(max(short_row_lengths, default=1))))


def amos_meta(op: str, params: Sequence[Tensor], vs: Sequence[Tensor], bs: Sequence[Tensor],
              mus: Optional[Sequence[Tensor]]) -> AmosMeta:
    """The cached metadata of an Amos bucket (blocks of BLOCK, rows up to AMOS_MAX_ROW,
    rows up to SHORT_ROW_MAX in tiles); describing the layouts checks the slot shapes
    (ValueError) before anything is written."""
    block, max_row, short_row = BLOCK, AMOS_MAX_ROW, SHORT_ROW_MAX
    streams = [params, vs, bs] + ([mus] if mus is not None else [])
    param_shapes = tuple(tuple(p.shape) for p in params)
    slot_shapes = tuple(tuple(v.shape) for v in vs)
    key = ("amos", params[0].dtype, params[0].device, block, max_row, short_row, AMOS_SUM_WORK,
           addresses_of(streams), param_shapes, slot_shapes)

    def build() -> AmosMeta:
        return AmosMeta(streams, slot_layouts(op, params, vs, bs, max_row, short_row), block)

    return cached(key, build)


# ---------------------------------------------------------------------------
# Per-element math
# ---------------------------------------------------------------------------

# The columns this module reads, placed by the contract (csrc/step_math.h's AmosCoef).
(M_BETA, M_BETA_C, M_BIAS_CORRECTION, M_EPSILON, M_C_SCALE, M_LR_SQ, M_ALPHA, M_D_SCALE,
 M_EXTRA_L2, M_CLIP, M_MOMENTUM, M_MOMENTUM_C, M_UNSCALE) = column_constants("amos", (
    "beta", "beta_complement",  # β, 1 − β
    "bias_correction",          # 1 − β^t
    "epsilon",                  # floor of v
    "c_scale",                  # c_coef·sqrt(ξ)
    "lr_sq",                    # ξ²
    "alpha",                    # α = ξ·η
    "d_scale",                  # d_coef·sqrt(α)
    "extra_l2",
    "clip",                     # clip_value (used only when clipping)
    "momentum", "momentum_complement",
    "grad_unscale",             # 1/GradScaler scale, or 1
))


@triton.jit
def load_amos_coefficients(row):
    return (tl.load(row + M_BETA), tl.load(row + M_BETA_C), tl.load(row + M_BIAS_CORRECTION),
            tl.load(row + M_EPSILON), tl.load(row + M_C_SCALE), tl.load(row + M_LR_SQ), tl.load(row + M_ALPHA), tl.load(row + M_D_SCALE),
            tl.load(row + M_EXTRA_L2), tl.load(row + M_CLIP), tl.load(row + M_MOMENTUM),
            tl.load(row + M_MOMENTUM_C), tl.load(row + M_UNSCALE))


@triton.jit
def amos_clip(g, grad_unscale, clip, CLIP: tl.constexpr):
    g = g * grad_unscale                  # g ← g · inv_grad_scale
    if CLIP:
        g = nan_clamp(g, 0.0 - clip, clip)  # g ← clamp(g, −clip, clip)
    return g


@triton.jit
def amos_slot(v, b, g2, beta, beta_complement, bias_correction, epsilon, c_scale, lr_sq, alpha,
              d_scale, extra_l2, FP64: tl.constexpr):
    """One slot given g2 = mean of g² over its elements.  Returns the new v, b and
    the slot's (w, a) with Δ = w·θ − a·g."""
    v = beta * v + beta_complement * g2                             # v ← β·v + (1−β)·g2
    r = ieee_div(bias_correction, nan_maximum(v, epsilon), FP64)    # r = (1−β^t)/max(v, ε)
    decay_c = ieee_div(1.0, ieee_sqrt(1.0 + c_scale * b, FP64), FP64)  # c = 1/sqrt(1 + c_coef·sqrt(ξ)·b)
    gamma = decay_c * lr_sq * r * g2                                # γ = c·ξ²·r·g2
    d = ieee_div(1.0, 1.0 + d_scale * b, FP64)                      # d = 1/(1 + d_coef·sqrt(α)·b)
    w = d * (-0.5 * gamma - extra_l2)                               # Δ = d·((−½γ − l2)·θ − α·sqrt(r)·g)
    a = d * alpha * ieee_sqrt(r, FP64)
    b = b + gamma * (1.0 + b)                                       # b ← b + γ·(1+b)  (last)
    return v, b, w, a


@triton.jit
def amos_element(p, g, mu, w, a, momentum, momentum_complement, MOMENTUM: tl.constexpr):
    """Δ = w·θ − a·g, optional un-debiased EMA of Δ, θ ← θ + Δ.  Returns p, mu."""
    delta = w * p - a * g
    if MOMENTUM:
        mu = momentum * mu + momentum_complement * delta  # mu ← m·mu + (1−m)·Δ;  Δ ← mu
        delta = mu
    p = p + delta
    return p, mu


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

AMOS_WIDTH = tl.constexpr(len(contract("amos").columns))
ELEMENTWISE_KIND = tl.constexpr(ELEMENTWISE)
SHORT_ROWS_KIND = tl.constexpr(SHORT_ROWS)
ROWS_KIND = tl.constexpr(ROWS)
LONG_ROWS_KIND = tl.constexpr(LONG_ROWS)


@triton.jit
def tensor_info(info, t, ndim):
    """Row of tensor t in the info table: numel, kind, row_len, slot_base, num_slots,
    sizes[ndim], slot_strides[ndim]."""
    return info + t * (INFO_FIXED + 2 * ndim)


# The number of merged dims (ndim, 1 … 16) is a runtime argument and the dims are
# walked by while loops, each digit read with one int64 division (the remainder
# from the quotient).  As a constexpr unrolled over the dims, every dim's size and
# slot stride was loaded up front and held in registers, and the values live across
# the int64 divisions (a called routine on NVIDIA GPUs) took more: with many merged
# dims amos_kernel and amos_sums_kernel spilled for sm_90
# (tools/check_triton_compile.py fails on that).

@triton.jit
def slot_index(offs, layout, ndim):
    """Slot of each element offset, from the merged sizes (layout[0:ndim], row-major)
    and their slot strides (layout[ndim:2·ndim], 0 for reduced dims)."""
    rem = offs
    slot = tl.zeros_like(offs)
    d = ndim - 1
    while d >= 0:
        size = tl.load(layout + d)
        quotient = rem // size
        slot += (rem - quotient * size) * tl.load(layout + ndim + d)  # (rem % size)·stride
        rem = quotient
        d -= 1
    return slot


@triton.jit
def element_offset(x, layout, ndim, KEPT: tl.constexpr):
    """Element offset (row-major over the merged sizes layout[0:ndim]) of index x
    along the kept dims (KEPT: x is a slot) or along the reduced dims (x is the
    rank k of an element within its slot, reduced dims in row-major order); the
    other dims at 0.  A slot's elements are at element_offset(slot, True) +
    element_offset(k, False) for k = 0 … numel/num_slots − 1.

    x's digits, innermost dim first, in the radix of the sizes of the dims it
    walks (a slot's kept-dim strides are the products of the inner kept sizes);
    a dim it does not walk divides by 1 and yields digit 0."""
    off = x * 0
    elem_stride = x * 0 + 1
    rem = x
    d = ndim - 1
    while d >= 0:
        size = tl.load(layout + d)
        slot_stride = tl.load(layout + ndim + d)
        if KEPT:
            radix = tl.where(slot_stride != 0, size, 1)
        else:
            radix = tl.where(slot_stride == 0, size, 1)
        quotient = rem // radix
        off += (rem - quotient * radix) * elem_stride
        rem = quotient
        elem_stride = elem_stride * size
        d -= 1
    return off


@triton.jit
def amos_sums_kernel(grad_addresses, info, blocks, coef, partials, n, ndim, DTYPE: tl.constexpr,
                     COMPUTE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr, skip,
                     SKIPPABLE: tl.constexpr):
    """Phase 1: partial sums of clip(g)² (blocks: tensor, piece), each written to
    the piece's own entries of partials (see the module docstring)."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, piece = program_entry(blocks)
    g_ptr = stream(grad_addresses, 0, n, t, DTYPE, False)
    meta = tensor_info(info, t, ndim)
    numel = tl.load(meta)
    kind = tl.load(meta + 1)
    num_slots = tl.load(meta + 4)
    partial_base = tl.load(meta + 5)
    chunks = tl.load(meta + 6)
    coef_row = coef + t * AMOS_WIDTH
    unscale = tl.load(coef_row + M_UNSCALE)
    clip = tl.load(coef_row + M_CLIP)
    if kind == LONG_ROWS_KIND:  # piece (row, j): elements j·BLOCK … of the row, one sum
        row_len = tl.load(meta + 2)
        row = piece // chunks
        start = row * row_len + (piece % chunks) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < (row + 1) * row_len
        g = amos_clip(load_block(g_ptr + offs, mask, True, COMPUTE), unscale, clip, CLIP)
        tl.store(partials + partial_base + piece, tl.sum(tl.where(mask, g * g, 0.0), 0))
    else:  # GENERAL: piece (run c, slot block), per slot Σ over k in run c, in k order
        chunk_len = tl.load(meta + 7)
        slot_blocks = (num_slots + BLOCK - 1) // BLOCK
        c = piece // slot_blocks
        s = (piece % slot_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = s < num_slots
        layout = meta + INFO_FIXED
        slot_offs = element_offset(s, layout, ndim, True)
        k = c * chunk_len
        k_end = tl.minimum(k + chunk_len, numel // num_slots)
        acc = tl.zeros([BLOCK], COMPUTE)
        while k < k_end:
            offs = slot_offs + element_offset(k, layout, ndim, False)
            g = amos_clip(load_block(g_ptr + offs, mask, True, COMPUTE), unscale, clip, CLIP)
            acc += tl.where(mask, g * g, 0.0)
            k += 1
        tl.store(partials + partial_base + c * num_slots + s, acc, mask=mask)


@triton.jit
def amos_slots_kernel(addresses, info, blocks, coef, partials, slot_updates, n, ndim,
                      DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                      BLOCK: tl.constexpr, skip,
                      SKIPPABLE: tl.constexpr):
    """Phase 2: Σ of each slot's partials in order, g2 = Σ/count; updates v, b;
    stores the slot's (w, a) interleaved in slot_updates."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, index = program_entry(blocks)
    v_ptr = stream(addresses, 1, n, t, DTYPE, False)
    b_ptr = stream(addresses, 2, n, t, DTYPE, False)
    meta = tensor_info(info, t, ndim)
    numel = tl.load(meta)
    kind = tl.load(meta + 1)
    slot_base = tl.load(meta + 3)
    num_slots = tl.load(meta + 4)
    partial_base = tl.load(meta + 5)
    chunks = tl.load(meta + 6)
    s = index * BLOCK + tl.arange(0, BLOCK)
    mask = s < num_slots
    # A slot's partials: LONG_ROWS consecutive (row·chunks + j), GENERAL num_slots apart.
    long_rows = kind == LONG_ROWS_KIND
    slot_partials = partials + partial_base + s * tl.where(long_rows, chunks, 1)
    step = tl.where(long_rows, 1, num_slots)
    total = tl.zeros([BLOCK], COMPUTE)
    j = chunks * 0
    while j < chunks:
        total += tl.load(slot_partials + j * step, mask=mask, other=0.0)
        j += 1
    g2 = ieee_div(total, (numel // num_slots).to(COMPUTE), FP64)
    v = load_block(v_ptr + s, mask, True, COMPUTE)
    b = load_block(b_ptr + s, mask, True, COMPUTE)
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, _clip,
     _momentum, _momentum_c, _unscale) = load_amos_coefficients(coef + t * AMOS_WIDTH)
    v, b, w, a = amos_slot(v, b, g2, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    store_block(v_ptr + s, v, mask, True)
    store_block(b_ptr + s, b, mask, True)
    updates = slot_updates + 2 * (slot_base + s)
    tl.store(updates, w, mask=mask)
    tl.store(updates + 1, a, mask=mask)


@triton.jit
def _elementwise_block(p_ptr, g_ptr, v_ptr, b_ptr, mu_ptr, start, offs, mask, coef_row, own, round_row,
                       COMPUTE: tl.constexpr, FP64: tl.constexpr, MOMENTUM: tl.constexpr,
                       CLIP: tl.constexpr, MASKED: tl.constexpr, TELEMETRY: tl.constexpr,
                       ROUND: tl.constexpr, BLOCK: tl.constexpr):
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    b = load_block(b_ptr + offs, mask, MASKED, COMPUTE)
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    g = amos_clip(g, unscale, clip, CLIP)
    v, b, w, a = amos_slot(v, b, g * g, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    if TELEMETRY:  # v, b stored first: not held in registers beside θ before and after
        store_block(v_ptr + offs, v, mask, MASKED)
        store_block(b_ptr + offs, b, mask, MASKED)
    # θ (and mu) are read after the slot math: not held in registers across it.
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    before = p
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + offs, mask, MASKED, COMPUTE)
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    if ROUND:
        p = round_block(p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, p, mask, MASKED)
    if not TELEMETRY:
        store_block(v_ptr + offs, v, mask, MASKED)
        store_block(b_ptr + offs, b, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + offs, mu, mask, MASKED)
    if TELEMETRY:
        track_block(own, before, p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def _row_squares(g_ptr, cols, mask, unscale, clip, COMPUTE: tl.constexpr, CLIP: tl.constexpr,
                 MASKED: tl.constexpr):
    g = amos_clip(load_block(g_ptr + cols, mask, MASKED, COMPUTE), unscale, clip, CLIP)
    if MASKED:
        g = tl.where(mask, g, 0.0)
    return g * g


@triton.jit
def _row_update(p_ptr, g_ptr, mu_ptr, first, cols, mask, w, a, unscale, clip, momentum, momentum_c, round_row,
                COMPUTE: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
                MASKED: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """Updates a chunk of a row (elements cols, from first); returns θ before and
    after (compute dtype, after as stored)."""
    p = load_block(p_ptr + cols, mask, MASKED, COMPUTE)
    before = p
    g = amos_clip(load_block(g_ptr + cols, mask, MASKED, COMPUTE), unscale, clip, CLIP)
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + cols, mask, MASKED, COMPUTE)
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    if ROUND:
        p = round_block(p, round_row, first, cols, BLOCK)
    store_block(p_ptr + cols, p, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + cols, mu, mask, MASKED)
    return before, p


@triton.jit
def _tracked_row_update(p_ptr, g_ptr, mu_ptr, first, cols, mask, w, a, unscale, clip, momentum, momentum_c,
                        round_row, weight_acc, update_acc, COMPUTE: tl.constexpr, MOMENTUM: tl.constexpr,
                        CLIP: tl.constexpr, MASKED: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """_row_update, adding the chunk's θ², (Δθ)² of the stored θ to the row's lanes."""
    before, p = _row_update(p_ptr, g_ptr, mu_ptr, first, cols, mask, w, a, unscale, clip, momentum, momentum_c,
                            round_row, COMPUTE, MOMENTUM, CLIP, MASKED, ROUND, BLOCK)
    weight_sq, update_sq = tracked_squares(before, p, mask, p_ptr.dtype.element_ty, MASKED)
    return weight_acc + weight_sq, update_acc + update_sq


@triton.jit
def _row(p_ptr, g_ptr, v_ptr, b_ptr, mu_ptr, r, row_len, coef_row, own, round_row, COMPUTE: tl.constexpr,
         FP64: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
         ROWS_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr):
    """Row r (slot r): Σ clip(g)² over the row, the slot update, then the row's update.
    Full chunks run unmasked; with ROWS_ALIGNED (row lengths multiples of 8 elements
    in an aligned bucket) they start on 16-byte boundaries.  With TELEMETRY, the
    row's Σθ², Σ(Δθ)² (chunks added lane by lane, then one tree sum) go to own.

    The chunk loops are while loops: a ``for`` over ``range(0, row_len, BLOCK)``
    compiles, but older interpreters (Triton 3.6) turn a runtime bound into a
    Python int with ``int()`` of a one-element array, which NumPy 2 rejects."""
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    base = r * row_len
    end = base + row_len
    acc = tl.zeros([BLOCK], COMPUTE)
    off = row_len * 0
    while off < row_len:
        first = base + off
        if ROWS_ALIGNED:
            first = tl.multiple_of(first, 8)
        cols = first + tl.arange(0, BLOCK)
        if off + BLOCK <= row_len:
            acc += _row_squares(g_ptr, cols, cols < end, unscale, clip, COMPUTE, CLIP, False)
        else:
            acc += _row_squares(g_ptr, cols, cols < end, unscale, clip, COMPUTE, CLIP, True)
        off += BLOCK
    g2 = ieee_div(tl.sum(acc, 0), row_len.to(COMPUTE), FP64)  # g2 = mean of g² over the row
    v = from_storage(tl.load(v_ptr + r), COMPUTE)
    b = from_storage(tl.load(b_ptr + r), COMPUTE)
    v, b, w, a = amos_slot(v, b, g2, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    tl.store(v_ptr + r, to_storage(v, v_ptr.dtype.element_ty))
    tl.store(b_ptr + r, to_storage(b, b_ptr.dtype.element_ty))
    if TELEMETRY:
        weight_acc = tl.zeros([BLOCK], COMPUTE)
        update_acc = tl.zeros([BLOCK], COMPUTE)
    off = row_len * 0
    while off < row_len:  # the row is still in cache
        first = base + off
        if ROWS_ALIGNED:
            first = tl.multiple_of(first, 8)
        cols = first + tl.arange(0, BLOCK)
        if TELEMETRY:
            if off + BLOCK <= row_len:
                weight_acc, update_acc = _tracked_row_update(
                    p_ptr, g_ptr, mu_ptr, first, cols, cols < end, w, a, unscale, clip, momentum, momentum_c,
                    round_row, weight_acc, update_acc, COMPUTE, MOMENTUM, CLIP, False, ROUND, BLOCK)
            else:
                weight_acc, update_acc = _tracked_row_update(
                    p_ptr, g_ptr, mu_ptr, first, cols, cols < end, w, a, unscale, clip, momentum, momentum_c,
                    round_row, weight_acc, update_acc, COMPUTE, MOMENTUM, CLIP, True, ROUND, BLOCK)
        else:
            if off + BLOCK <= row_len:
                _row_update(p_ptr, g_ptr, mu_ptr, first, cols, cols < end, w, a, unscale, clip, momentum,
                            momentum_c, round_row, COMPUTE, MOMENTUM, CLIP, False, ROUND, BLOCK)
            else:
                _row_update(p_ptr, g_ptr, mu_ptr, first, cols, cols < end, w, a, unscale, clip, momentum,
                            momentum_c, round_row, COMPUTE, MOMENTUM, CLIP, True, ROUND, BLOCK)
        off += BLOCK
    if TELEMETRY:
        write_telemetry(own, weight_acc, update_acc)


@triton.jit
def _short_rows(p_ptr, g_ptr, v_ptr, b_ptr, mu_ptr, index, row_len, num_rows, coef_row, own, round_row,
                COMPUTE: tl.constexpr, FP64: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
                ROW_TILE: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr):
    """Rows index·R … index·R + R − 1 (slots; R = BLOCK // ROW_TILE, those that exist)
    as one [R, ROW_TILE] tile: each row's Σ clip(g)², its slot update, then its
    update — _row's math, rows side by side.  With TELEMETRY the tile's Σθ², Σ(Δθ)²
    go to own."""
    R: tl.constexpr = BLOCK // ROW_TILE
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    rows = index * R + tl.arange(0, R)
    row_mask = rows < num_rows
    cols = tl.arange(0, ROW_TILE)
    offs = rows[:, None] * row_len + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < row_len)
    squares = _row_squares(g_ptr, offs, mask, unscale, clip, COMPUTE, CLIP, True)
    g2 = ieee_div(tl.sum(squares, 1), row_len.to(COMPUTE), FP64)  # g2 = mean of g² over each row
    v = load_block(v_ptr + rows, row_mask, True, COMPUTE)
    b = load_block(b_ptr + rows, row_mask, True, COMPUTE)
    v, b, w, a = amos_slot(v, b, g2, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    store_block(v_ptr + rows, v, row_mask, True)
    store_block(b_ptr + rows, b, row_mask, True)
    first = index * R * row_len
    before, p = _row_update(p_ptr, g_ptr, mu_ptr, first, offs, mask, w[:, None], a[:, None], unscale, clip,
                            momentum, momentum_c, round_row, COMPUTE, MOMENTUM, CLIP, True, ROUND, BLOCK)
    if TELEMETRY:
        weight_sq, update_sq = tracked_squares(before, p, mask, p_ptr.dtype.element_ty, True)
        write_telemetry(own, tl.reshape(weight_sq, (BLOCK,)), tl.reshape(update_sq, (BLOCK,)))


@triton.jit
def load_slot_updates(slots, mask, MASKED: tl.constexpr):
    """The (w, a) amos_slots_kernel left for each element's slot (slots: scratch
    addresses of w; a follows each w)."""
    if MASKED:
        w = tl.load(slots, mask=mask, other=0.0)
        a = tl.load(slots + 1, mask=mask, other=0.0)
    else:
        w = tl.load(slots)
        a = tl.load(slots + 1)
    return w, a


@triton.jit
def _phased_block(p_ptr, g_ptr, mu_ptr, start, offs, mask, coef_row, slots, own, round_row, COMPUTE: tl.constexpr,
                  MOMENTUM: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr,
                  TELEMETRY: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """Elements of a phased tensor given the (w, a) of their slots (slots: scratch
    addresses of w; a follows each w)."""
    w, a = load_slot_updates(slots, mask, MASKED)
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + offs, mask, MASKED, COMPUTE)
    (_beta, _beta_c, _bias_correction, _epsilon, _c_scale, _lr_sq, _alpha, _d_scale, _extra_l2,
     clip, momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    g = amos_clip(g, unscale, clip, CLIP)
    before = p
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    if ROUND:
        p = round_block(p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, p, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + offs, mu, mask, MASKED)
    if TELEMETRY:
        track_block(own, before, p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def amos_kernel(addresses, grad_addresses, info, blocks, coef, slot_updates, telemetry, rounding, n, ndim,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                MOMENTUM: tl.constexpr, CLIP: tl.constexpr, ALIGNED: tl.constexpr,
                ROWS_ALIGNED: tl.constexpr, HAS_ELEMENTWISE: tl.constexpr, HAS_SHORT_ROWS: tl.constexpr,
                HAS_ROWS: tl.constexpr, HAS_PHASED: tl.constexpr, ROW_TILE: tl.constexpr, BLOCK: tl.constexpr,
                TELEMETRY: tl.constexpr, ROUND: tl.constexpr, skip,
                SKIPPABLE: tl.constexpr):
    """Streams: 0 param, 1 v, 2 b, 3 mu (MOMENTUM).  blocks: (tensor, block index),
    (tensor, row) for ROWS tensors, (tensor, tile) for SHORT_ROWS tensors (ROW_TILE:
    their tiles' width).  telemetry (TELEMETRY): the float64 telemetry partials, a
    pair per program; rounding (ROUND): the rounding table (common.py)."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    b = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    mu = p
    if MOMENTUM:
        mu = stream(addresses, 3, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * AMOS_WIDTH
    meta = tensor_info(info, t, ndim)
    numel = tl.load(meta)
    kind = tl.load(meta + 1)
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    if HAS_ELEMENTWISE:
        if kind == ELEMENTWISE_KIND:
            if start + BLOCK <= numel:
                _elementwise_block(p, g, v, b, mu, start, offs, offs < numel, coef_row, own, round_row, COMPUTE,
                                   FP64, MOMENTUM, CLIP, False, TELEMETRY, ROUND, BLOCK)
            else:
                _elementwise_block(p, g, v, b, mu, start, offs, offs < numel, coef_row, own, round_row, COMPUTE,
                                   FP64, MOMENTUM, CLIP, True, TELEMETRY, ROUND, BLOCK)
    if HAS_SHORT_ROWS:
        if kind == SHORT_ROWS_KIND:
            _short_rows(p, g, v, b, mu, index, tl.load(meta + 2), tl.load(meta + 4), coef_row, own, round_row,
                        COMPUTE, FP64, MOMENTUM, CLIP, ROW_TILE, BLOCK, TELEMETRY, ROUND)
    if HAS_ROWS:
        if kind == ROWS_KIND:
            _row(p, g, v, b, mu, index, tl.load(meta + 2), coef_row, own, round_row, COMPUTE, FP64, MOMENTUM,
                 CLIP, ROWS_ALIGNED, BLOCK, TELEMETRY, ROUND)
    if HAS_PHASED:
        if kind >= LONG_ROWS_KIND:
            slots = slot_updates + 2 * (tl.load(meta + 3) + slot_index(offs, meta + INFO_FIXED, ndim))
            if start + BLOCK <= numel:
                _phased_block(p, g, mu, start, offs, offs < numel, coef_row, slots, own, round_row, COMPUTE,
                              MOMENTUM, CLIP, False, TELEMETRY, ROUND, BLOCK)
            else:
                _phased_block(p, g, mu, start, offs, offs < numel, coef_row, slots, own, round_row, COMPUTE,
                              MOMENTUM, CLIP, True, TELEMETRY, ROUND, BLOCK)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def launch_slot_phases(meta: AmosMeta, grad_table: Tensor, coef: Tensor, types: dict, clip: bool, block: int,
                       skip: Optional[Tensor] = None) -> None:
    """The phased tensors' slots (when the bucket has any): amos_sums_kernel, then
    amos_slots_kernel, which leaves each slot's (w, a) in meta.slot_updates."""
    if not meta.num_sum_blocks:
        return
    amos_sums_kernel[(meta.num_sum_blocks,)](
        grad_table, meta.info, meta.sum_blocks, coef, meta.partials, meta.n, meta.ndim,
        DTYPE=types["DTYPE"], COMPUTE=types["COMPUTE"], CLIP=clip,
        BLOCK=block, num_warps=AMOS_NUM_WARPS, enable_fp_fusion=FP_FUSION, skip=skip_flag(skip, meta),
        SKIPPABLE=skip is not None)
    amos_slots_kernel[(meta.num_slot_blocks,)](
        meta.addresses, meta.info, meta.slot_blocks, coef, meta.partials,
        meta.slot_updates, meta.n, meta.ndim, **types, BLOCK=block,
        num_warps=AMOS_NUM_WARPS, enable_fp_fusion=FP_FUSION, skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)


def launch_amos(params, grads, states, hyper, coef: Tensor, meta: AmosMeta,
                telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                skip: Optional[Tensor] = None) -> None:
    momentum, clip = bool(hyper["use_momentum"]), bool(hyper["clip"])
    if meta.num_main == 0:
        with launching(meta):
            launch_telemetry_sums(meta, telemetry)  # zeros: no elements
        return
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    coef = upload_coefficients(coef, params)
    types = kernel_dtypes(params[0].dtype)
    with launching(meta):
        launch_slot_phases(meta, grad_table, coef, types, clip, BLOCK, skip)
        amos_kernel[(meta.num_main,)](
            meta.addresses, grad_table, meta.info, meta.main_blocks, coef, meta.slot_updates,
            telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n, meta.ndim, **types,
            MOMENTUM=momentum, CLIP=clip,
            ALIGNED=meta.aligned and grads_aligned,
            ROWS_ALIGNED=meta.aligned and grads_aligned and meta.rows_aligned,
            HAS_ELEMENTWISE=ELEMENTWISE in meta.kinds, HAS_SHORT_ROWS=SHORT_ROWS in meta.kinds,
            HAS_ROWS=ROWS in meta.kinds, HAS_PHASED=meta.num_sum_blocks > 0,
            ROW_TILE=meta.row_tile if SHORT_ROWS in meta.kinds else 8, BLOCK=BLOCK, num_warps=AMOS_NUM_WARPS,
            enable_fp_fusion=FP_FUSION,
            TELEMETRY=telemetry is not None, ROUND=rounding is not None,
            skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        launch_telemetry_sums(meta, telemetry)
