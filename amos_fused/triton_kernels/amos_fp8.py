"""Amos with its momentum in block-scaled FP8 (Amos8bit) on the Triton backend:
amos.py's slot kernels and math with fp8.py's format.

Every tensor whose slots reduce (rows or general layouts) is walked in phases,
as amos.py walks its LONG_ROWS and GENERAL tensors: amos_sums_kernel (partial
sums of clip(g)² per slot) and amos_slots_kernel (v, b and the slot's (w, a)).
Then amos_fp8_kernel steps every tensor in tiles of PROGRAM_BLOCKS blocks of
256 elements (fp8.py's tiles): it decodes mu, gets each element's (w, a) (from
its slot's scratch entry, or for elementwise slots from the slot math on v, b,
read and written here), runs amos_element (Δ = w·θ − a·g, mu ← m·mu + (1−m)·Δ,
θ ← θ + mu), encodes mu back block by block and stores θ (stochastically
rounded with ROUND; telemetry as fp8.py's).

Streams: 0 param, 1 v, 2 b (the slot kernels' order), 3 mu codes, 4 mu absmax.
Inputs are checked by ops.py (the C++ prologue, begin_step_fp8) before
anything here runs."""
from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import amos
from .amos import (AMOS_NUM_WARPS, AMOS_WIDTH, ELEMENTWISE_KIND, INFO_FIXED, AmosMeta, amos_clip,
                   amos_element, amos_slot, launch_slot_phases, load_amos_coefficients, load_slot_updates, slot_index,
                   slot_layouts, tensor_info)
from .common import (FP_FUSION, ROUND_WIDTH, addresses_of, cached, kernel_dtypes, launch_telemetry_sums, launching,
                     load_block, program_entry, rounding_table, store_block, stream, telemetry_entry,
                     telemetry_partials, upload_coefficients)
from .fp8 import FP8_BLOCK, PROGRAM_BLOCKS, fp8_tile, load_fp8, store_fp8, store_param

TILE = PROGRAM_BLOCKS * 256  # elements per program: the slot kernels' BLOCK too


def amos_fp8_meta(op: str, params: Sequence[Tensor], vs: Sequence[Tensor], bs: Sequence[Tensor],
                  codes: Sequence[Tensor], absmax: Sequence[Tensor]) -> AmosMeta:
    """The cached metadata of an Amos8bit bucket: every reduced layout phased (rows
    walked as LONG_ROWS), main programs of TILE elements; describing the layouts
    checks the slot shapes (ValueError) before anything is written."""
    streams = [params, vs, bs, codes, absmax]
    key = ("amos_fp8", params[0].dtype, params[0].device, TILE, amos.AMOS_SUM_WORK, addresses_of(streams),
           tuple(tuple(p.shape) for p in params), tuple(tuple(v.shape) for v in vs))
    return cached(key, lambda: AmosMeta(streams, slot_layouts(op, params, vs, bs, max_row=0), TILE))


@triton.jit
def _amos_fp8_tile(addresses, grad_addresses, meta, coef_row, slot_updates, own, round_row, n, t, index, numel,
                   ndim, DTYPE: tl.constexpr, CLIP: tl.constexpr, ELEMENTWISE_SLOTS: tl.constexpr,
                   ROWS: tl.constexpr, MASKED: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr):
    p_ptr = stream(addresses, 0, n, t, DTYPE, False)
    g_ptr = stream(grad_addresses, 0, n, t, DTYPE, False)
    mu_codes = stream(addresses, 3, n, t, tl.uint8, False)
    mu_absmax = stream(addresses, 4, n, t, tl.float32, False)
    blocks, offs, mask, block_mask = fp8_tile(index, numel, ROWS)
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    g = amos_clip(load_block(g_ptr + offs, mask, MASKED, tl.float32), unscale, clip, CLIP)
    if ELEMENTWISE_SLOTS:  # one slot per element: its v, b here
        v_ptr = stream(addresses, 1, n, t, DTYPE, False)
        b_ptr = stream(addresses, 2, n, t, DTYPE, False)
        v = load_block(v_ptr + offs, mask, MASKED, tl.float32)
        b = load_block(b_ptr + offs, mask, MASKED, tl.float32)
        v, b, w, a = amos_slot(v, b, g * g, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha,
                               d_scale, extra_l2, False)
        store_block(v_ptr + offs, v, mask, MASKED)
        store_block(b_ptr + offs, b, mask, MASKED)
    else:  # the (w, a) of each element's slot (amos_slots_kernel)
        slots = slot_updates + 2 * (tl.load(meta + 3) + slot_index(offs, meta + INFO_FIXED, ndim))
        w, a = load_slot_updates(slots, mask, MASKED)
    mu = load_fp8(mu_codes, mu_absmax, blocks, offs, mask, block_mask, MASKED)
    p = load_block(p_ptr + offs, mask, MASKED, tl.float32)
    before = p
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, True)
    store_fp8(mu_codes, mu_absmax, blocks, offs, mask, block_mask, mu, MASKED)
    store_param(p_ptr, offs, mask, p, before, own, round_row, index * (ROWS * FP8_BLOCK), MASKED, TELEMETRY,
                ROUND, ROWS * FP8_BLOCK)


@triton.jit
def amos_fp8_kernel(addresses, grad_addresses, info, blocks, coef, slot_updates, telemetry, rounding, n, ndim,
                    DTYPE: tl.constexpr, CLIP: tl.constexpr, ROWS: tl.constexpr, TELEMETRY: tl.constexpr,
                    ROUND: tl.constexpr):
    """Program (tensor, tile) of ROWS blocks: the module docstring."""
    t, index = program_entry(blocks)
    meta = tensor_info(info, t, ndim)
    numel = tl.load(meta)
    elementwise = tl.load(meta + 1) == ELEMENTWISE_KIND
    coef_row = coef + t * AMOS_WIDTH
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    whole = (index + 1) * (ROWS * FP8_BLOCK) <= numel
    if elementwise:
        if whole:
            _amos_fp8_tile(addresses, grad_addresses, meta, coef_row, slot_updates, own, round_row, n, t, index,
                           numel, ndim, DTYPE, CLIP, True, ROWS, False, TELEMETRY, ROUND)
        else:
            _amos_fp8_tile(addresses, grad_addresses, meta, coef_row, slot_updates, own, round_row, n, t, index,
                           numel, ndim, DTYPE, CLIP, True, ROWS, True, TELEMETRY, ROUND)
    else:
        if whole:
            _amos_fp8_tile(addresses, grad_addresses, meta, coef_row, slot_updates, own, round_row, n, t, index,
                           numel, ndim, DTYPE, CLIP, False, ROWS, False, TELEMETRY, ROUND)
        else:
            _amos_fp8_tile(addresses, grad_addresses, meta, coef_row, slot_updates, own, round_row, n, t, index,
                           numel, ndim, DTYPE, CLIP, False, ROWS, True, TELEMETRY, ROUND)


def launch_amos_fp8(params, grads, vs, bs, codes, absmax, hyper, coef: Tensor, meta: AmosMeta,
                    telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None) -> None:
    """One Amos8bit step over a bucket: the slot phases (if any tensor's slots
    reduce), then amos_fp8_kernel; ``coef``: begin_step_fp8's table."""
    clip = bool(hyper["clip"])
    grad_table, _ = meta.grad_addresses.get(grads)
    coef = upload_coefficients(coef, params)
    types = kernel_dtypes(params[0].dtype)
    with launching(meta):
        launch_slot_phases(meta, grad_table, coef, types, clip, TILE)
        if meta.num_main:
            amos_fp8_kernel[(meta.num_main,)](
                meta.addresses, grad_table, meta.info, meta.main_blocks, coef, meta.slot_updates,
                telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n, meta.ndim,
                DTYPE=types["DTYPE"], CLIP=clip, ROWS=PROGRAM_BLOCKS, TELEMETRY=telemetry is not None,
                ROUND=rounding is not None, num_warps=AMOS_NUM_WARPS, enable_fp_fusion=FP_FUSION)
        launch_telemetry_sums(meta, telemetry)

