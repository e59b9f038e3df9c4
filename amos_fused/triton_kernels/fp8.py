"""Adam / AdamW, RAdam and Lion with block-scaled FP8 states (the 8-bit optimizers)
on the Triton backend: the Triton copy of the format of csrc/fp8_states.h
(Python's: amos_fused/fp8_states.py) and one-pass kernels (one for the two-moment
rules and Lion, by a compile-time ALGORITHM).

Format: a state tensor is cut into blocks of 256 elements in the param's memory
order, each with one float32 absmax and one uint8 E4M3 code per element
(sign, 4 exponent bits with bias 7, 3 mantissa bits):
  encode  code = e4m3_rne(min(|x|·(448/absmax), 448)) with x's sign
  decode  x    = e4m3_value(code) · (absmax/448)
exp_avg stores m, exp_avg_sq stores sqrt(v).  absmax < 2^-96: absmax 0, codes 0;
a block holding NaN or ±Inf: absmax NaN (0x7fc00000), codes 0.  The bits are
made with integer operations (no float8 dtype), as the C++ encoder does.

Program i steps ROWS (= PROGRAM_BLOCKS) consecutive blocks of tensor
``blocks[2i]`` (its blocks ROWS·``blocks[2i+1]`` …) as a [ROWS, 256] tile
(missing blocks of a tensor's last program masked): it decodes the states, runs the
per-element update of the full-precision kernels (adam.py's adam_update /
radam_update / lion_update, the same functions), takes each block's new absmax (tl.max drops
NaN, in the interpreter as on GPUs: a NaN enters it as +Inf, and a block whose
max is not finite stores NaN either way) and encodes the block back.  Programs
covering whole blocks run unmasked.  θ is stored in the param's dtype,
stochastically rounded with ROUND; with TELEMETRY program i writes its
(Σθ², Σ(Δθ)²) to pair i of the partials (common.py), its blocks added lane by
lane, then one tree sum.

Inputs are checked by ops.py (the C++ prologue, begin_step_fp8) before anything
here runs."""
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import fp8_states
from .adam import (ADAM_WIDTH, LION_WIDTH, RADAM_WIDTH, _l2, adam_update, lion_update, load_adam_coefficients,
                   load_lion_coefficients, load_radam_coefficients, radam_update)
from .common import (FP_FUSION, NUM_WARPS, ROUND_WIDTH, elementwise_meta, ieee_div, ieee_sqrt, kernel_dtypes,
                     launch_telemetry_sums,
                     launching, load_block, program_entry, round_block, rounding_table, store_block, stream,
                     telemetry_entry, telemetry_partials, tracked_squares, upload_coefficients, write_telemetry)

FP8_BLOCK = tl.constexpr(fp8_states.BLOCK)     # elements per block (one absmax)
FP8_MAX = tl.constexpr(fp8_states.FP8_MAX)     # 448, the largest E4M3 value
FP8_TINY = tl.constexpr(fp8_states.TINY)       # 2^-96: a smaller absmax stores zeros
FLOAT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
INF = tl.constexpr(float("inf"))
NAN_BITS = tl.constexpr(0x7FC00000)            # the absmax of a non-finite block
PROGRAM_BLOCKS = 4                             # blocks per program (1024 elements)


# ---------------------------------------------------------------------------
# The format (csrc/fp8_states.h)
# ---------------------------------------------------------------------------

@triton.jit
def e4m3_magnitude(a):
    """The E4M3 code (uint32) of non-negative finite a ≤ 448, rounded to nearest even:
    a ≥ 2^-6 is a float32 with its exponent rebased by 120 and its mantissa rounded
    to 3 bits; below, the code is a·2^9 rounded to an integer (0..8)."""
    u = a.to(tl.uint32, bitcast=True)
    normal = (u - (120 << 23) + 0x7FFFF + ((u >> 20) & 1)) >> 20
    scaled = a * 512.0                            # exact
    whole = scaled.to(tl.int32)                   # floor (scaled ≥ 0)
    rest = scaled - whole.to(tl.float32)          # exact
    up = (rest > 0.5) | ((rest == 0.5) & ((whole & 1) != 0))
    subnormal = (whole + up.to(tl.int32)).to(tl.uint32)
    return tl.where(u >= (121 << 23), normal, subnormal)


@triton.jit
def fp8_encode(x, factor):
    """x's code (uint32) with factor = 448/absmax: sign | e4m3(min(|x·factor|, 448))."""
    scaled = x * factor
    sign = (scaled.to(tl.uint32, bitcast=True) >> 24) & 0x80
    return sign | e4m3_magnitude(tl.minimum(tl.abs(scaled), FP8_MAX))


@triton.jit
def fp8_decode(code, factor):
    """±e4m3_value(code)·factor of uint8 codes, factor = absmax/448; NaN for E4M3's
    NaN codes (0x7f, 0xff: never encoded, an edited state's)."""
    c = code.to(tl.uint32)
    magnitude = c & 0x7F
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    subnormal = magnitude.to(tl.float32) * (1.0 / 512.0)
    value = tl.where(magnitude >= 8, normal, subnormal)
    # the code's sign bit set on the value's bits (−0 for code 0x80, as in C++)
    signed = (value.to(tl.uint32, bitcast=True) | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)
    return tl.where(magnitude == 0x7F, nan_like(signed), signed * factor)


@triton.jit
def nan_like(x):
    """The absmax NaN (NAN_BITS) in x's shape."""
    return tl.full(x.shape, NAN_BITS, tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def stored_absmax(block_max):
    """A block's absmax as stored: NaN when it holds NaN or ±Inf, 0 below 2^-96."""
    return tl.where(block_max <= FLOAT_MAX, tl.where(block_max < FP8_TINY, 0.0, block_max), nan_like(block_max))


# ---------------------------------------------------------------------------
# A program's tile of blocks
# ---------------------------------------------------------------------------

@triton.jit
def fp8_tile(index, numel, ROWS: tl.constexpr):
    """Program ``index`` of a tensor of numel elements: its blocks' indices [ROWS],
    their elements' offsets [ROWS, 256], which elements and which blocks exist."""
    blocks = index * ROWS + tl.arange(0, ROWS)
    offs = blocks[:, None] * FP8_BLOCK + tl.arange(0, FP8_BLOCK)[None, :]
    return blocks, offs, offs < numel, blocks * FP8_BLOCK < numel


@triton.jit
def load_fp8(codes, absmax, blocks, offs, mask, block_mask, MASKED: tl.constexpr):
    """The float32 values of a tile of a coded state (masked elements decode as 0)."""
    if MASKED:
        scale = tl.load(absmax + blocks, mask=block_mask, other=0.0)
        code = tl.load(codes + offs, mask=mask, other=0)
    else:
        scale = tl.load(absmax + blocks)
        code = tl.load(codes + offs)
    # absmax/448; NaN for an absmax no encode stores (negative, +Inf): the block decodes as NaN
    factor = tl.where((scale >= 0.0) & (scale <= FLOAT_MAX), ieee_div(scale, FP8_MAX, False), nan_like(scale))
    return fp8_decode(code, factor[:, None])


@triton.jit
def store_fp8(codes, absmax, blocks, offs, mask, block_mask, x, MASKED: tl.constexpr):
    """Encodes a tile x (float32, a state in its stored form) block by block."""
    magnitude = tl.where(x == x, tl.abs(x), INF)  # NaN as +Inf: tl.max drops NaN (here and on GPUs)
    if MASKED:
        magnitude = tl.where(mask, magnitude, 0.0)
    scale = stored_absmax(tl.max(magnitude, 1))  # NaN when the block holds NaN or ±Inf
    coded = scale > 0.0  # else (zero or non-finite block) every code is 0
    factor = ieee_div(FP8_MAX, tl.where(coded, scale, 1.0), False)
    code = tl.where(coded[:, None], fp8_encode(x, factor[:, None]), 0).to(tl.uint8)
    if MASKED:
        tl.store(absmax + blocks, scale, mask=block_mask)
        tl.store(codes + offs, code, mask=mask)
    else:
        tl.store(absmax + blocks, scale)
        tl.store(codes + offs, code)


@triton.jit
def store_param(p_ptr, offs, mask, p, before, own, round_row, first, MASKED: tl.constexpr,
                TELEMETRY: tl.constexpr, ROUND: tl.constexpr, SPAN: tl.constexpr):
    """Stores the new θ of a tile (rounded stochastically with ROUND) and, with
    TELEMETRY, this program's (Σθ², Σ(Δθ)²) of θ as stored."""
    if ROUND:
        p = round_block(p, round_row, first, offs, SPAN)
    store_block(p_ptr + offs, p, mask, MASKED)
    if TELEMETRY:
        weight_sq, update_sq = tracked_squares(before, p, mask, p_ptr.dtype.element_ty, MASKED)
        write_telemetry(own, tl.sum(weight_sq, 0), tl.sum(update_sq, 0))  # blocks lane by lane


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

# The algorithms of fp8_kernel (its ALGORITHM), by name.
KINDS = {"adam": 0, "radam": 1, "lion": 2}
ADAM, RADAM, LION = (tl.constexpr(KINDS[name]) for name in ("adam", "radam", "lion"))


@triton.jit
def _fp8_tile(addresses, grad_addresses, coef, telemetry, rounding, n, t, index, numel,
              DTYPE: tl.constexpr, ALGORITHM: tl.constexpr, L2: tl.constexpr, ALIGNED: tl.constexpr,
              ROWS: tl.constexpr, MASKED: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr):
    p_ptr = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    g_ptr = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    m_codes = stream(addresses, 1, n, t, tl.uint8, ALIGNED)
    blocks, offs, mask, block_mask = fp8_tile(index, numel, ROWS)
    p = load_block(p_ptr + offs, mask, MASKED, tl.float32)
    before = p
    g = load_block(g_ptr + offs, mask, MASKED, tl.float32)
    if ALGORITHM == LION:
        m_absmax = stream(addresses, 2, n, t, tl.float32, ALIGNED)
        m = load_fp8(m_codes, m_absmax, blocks, offs, mask, block_mask, MASKED)
        beta1, b1c, beta2, b2c, decay, neg_lr, unscale = load_lion_coefficients(coef + t * LION_WIDTH)
        p, m = lion_update(p, g, m, beta1, b1c, beta2, b2c, decay, neg_lr, unscale)
    else:
        v_codes = stream(addresses, 2, n, t, tl.uint8, ALIGNED)
        m_absmax = stream(addresses, 3, n, t, tl.float32, ALIGNED)
        v_absmax = stream(addresses, 4, n, t, tl.float32, ALIGNED)
        m = load_fp8(m_codes, m_absmax, blocks, offs, mask, block_mask, MASKED)
        root = load_fp8(v_codes, v_absmax, blocks, offs, mask, block_mask, MASKED)  # sqrt(v)
        if ALGORITHM == RADAM:
            (b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect, unscale,
             rectified, small) = load_radam_coefficients(coef + t * RADAM_WIDTH)
            p, m, v = radam_update(p, g, m, root * root, b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect,
                                   unscale, rectified, small, L2, False)
            root = ieee_sqrt(v, False)
        else:
            b1c, b2, b2c, decay, l2, eps, bc2_sqrt, neg_step, unscale, small = load_adam_coefficients(
                coef + t * ADAM_WIDTH)
            p, m, v, _, root = adam_update(p, g, m, root * root, root, b1c, b2, b2c, decay, l2, eps, bc2_sqrt,
                                           neg_step, unscale, small, False, L2, False)
        store_fp8(v_codes, v_absmax, blocks, offs, mask, block_mask, root, MASKED)  # sqrt(v), the root taken
    store_fp8(m_codes, m_absmax, blocks, offs, mask, block_mask, m, MASKED)
    store_param(p_ptr, offs, mask, p, before, telemetry_entry(telemetry), rounding + t * ROUND_WIDTH,
                index * (ROWS * FP8_BLOCK), MASKED, TELEMETRY, ROUND, ROWS * FP8_BLOCK)


@triton.jit
def fp8_kernel(addresses, grad_addresses, numels, blocks, coef, telemetry, rounding, n,
               DTYPE: tl.constexpr, ALGORITHM: tl.constexpr, L2: tl.constexpr, ALIGNED: tl.constexpr,
               ROWS: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr):
    """ALGORITHM: ADAM (Adam(W)), RADAM or LION.  Streams: 0 param, 1 exp_avg codes
    (m), then for ADAM and RADAM 2 exp_avg_sq codes (sqrt(v)), 3 and 4 their absmax;
    for LION 2 the absmax of m."""
    t, index = program_entry(blocks)
    numel = tl.load(numels + t)
    if (index + 1) * (ROWS * FP8_BLOCK) <= numel:
        _fp8_tile(addresses, grad_addresses, coef, telemetry, rounding, n, t, index, numel, DTYPE, ALGORITHM, L2,
                  ALIGNED, ROWS, False, TELEMETRY, ROUND)
    else:
        _fp8_tile(addresses, grad_addresses, coef, telemetry, rounding, n, t, index, numel, DTYPE, ALGORITHM, L2,
                  ALIGNED, ROWS, True, TELEMETRY, ROUND)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def launch_fp8(algorithm: str, params: List[Tensor], grads: List[Tensor], codes: List[List[Tensor]],
               absmax: List[List[Tensor]], hyper: Dict[str, float], coef: Tensor,
               telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None) -> None:
    """One launch over a bucket: ``codes`` / ``absmax``: one list per state (the
    op's key-major order), ``hyper`` by name, ``coef`` begin_step_fp8's table."""
    streams = [params, *codes, *absmax]
    meta = elementwise_meta(f"{algorithm}_fp8", streams, PROGRAM_BLOCKS * fp8_states.BLOCK)
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    flags = dict(ALGORITHM=KINDS[algorithm], L2=algorithm != "lion" and _l2(hyper))
    with launching(meta):
        if meta.num_blocks:
            fp8_kernel[(meta.num_blocks,)](
                meta.addresses, grad_table, meta.numels, meta.blocks, upload_coefficients(coef, params),
                telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n,
                DTYPE=kernel_dtypes(params[0].dtype)["DTYPE"], ALIGNED=meta.aligned and grads_aligned, ROWS=PROGRAM_BLOCKS,
                TELEMETRY=telemetry is not None, ROUND=rounding is not None, num_warps=NUM_WARPS,
                enable_fp_fusion=FP_FUSION, **flags)
        launch_telemetry_sums(meta, telemetry)


ALGORITHMS = tuple(KINDS)
