"""Amos kernels over a whole bucket; slot layouts and tables:
amos_layout.py, amos_bucket.py; math: amos_math.py.

Launch order of a step:
  amos_sums_kernel   (phased tensors only) Σ clip(g)² per slot, atomically;
  amos_slots_kernel  (phased tensors only) v, b of each slot and its (w, a);
  amos_kernel        every tensor: ELEMENTWISE blocks (slot math per element),
                     ROWS (one program per row: Σg², slot update, row update —
                     one pass over memory), phased blocks (Δ from the slot's w, a).
"""
import triton
import triton.language as tl

from .amos_bucket import INFO_FIXED
from .amos_layout import ELEMENTWISE, LONG_ROWS, ROWS
from .amos_math import (AMOS_CLIP_COLUMN, AMOS_COLUMNS, AMOS_UNSCALE_COLUMN, amos_clip,
                        amos_element, amos_slot, load_amos_coefficients)
from .common import ieee_div, load_block, program_entry, store_block, stream, to_storage

AMOS_WIDTH = tl.constexpr(len(AMOS_COLUMNS))
INFO_FIXED_ = tl.constexpr(INFO_FIXED)
ELEMENTWISE_ = tl.constexpr(ELEMENTWISE)
ROWS_ = tl.constexpr(ROWS)
LONG_ROWS_ = tl.constexpr(LONG_ROWS)


@triton.jit
def tensor_info(info, t, NDIM: tl.constexpr):
    """Row of tensor t in the info table: numel, kind, row_len, slot_base, num_slots,
    sizes[NDIM], slot_strides[NDIM]."""
    return info + t * (INFO_FIXED_ + 2 * NDIM)


@triton.jit
def slot_index(offs, layout, NDIM: tl.constexpr):
    """Slot of each element offset, from the merged sizes (layout[0:NDIM], row-major)
    and their slot strides (layout[NDIM:2·NDIM], 0 for reduced dims)."""
    rem = offs
    slot = tl.zeros_like(offs)
    for i in tl.static_range(NDIM):
        d = NDIM - 1 - i
        size = tl.load(layout + d)
        slot += (rem % size) * tl.load(layout + NDIM + d)
        rem = rem // size
    return slot


@triton.jit
def amos_sums_kernel(grad_addresses, info, blocks, coef, slot_sums, n, DTYPE: tl.constexpr,
                     COMPUTE: tl.constexpr, CLIP: tl.constexpr, NDIM: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Phase 1: slot_sums[slot_base + slot] += Σ clip(g)² (blocks: tensor, first element)."""
    t, start = program_entry(blocks)
    g_ptr = stream(grad_addresses, 0, n, t, DTYPE, False)
    meta = tensor_info(info, t, NDIM)
    numel = tl.load(meta)
    kind = tl.load(meta + 1)
    slot_base = tl.load(meta + 3)
    coef_row = coef + t * AMOS_WIDTH
    unscale = tl.load(coef_row + AMOS_UNSCALE_COLUMN)
    clip = tl.load(coef_row + AMOS_CLIP_COLUMN)
    offs = start + tl.arange(0, BLOCK)
    if kind == LONG_ROWS_:  # the piece lies inside one row: one atomic for the block
        row_len = tl.load(meta + 2)
        mask = offs < (start // row_len + 1) * row_len
        g = amos_clip(load_block(g_ptr + offs, mask, True, COMPUTE), unscale, clip, CLIP)
        total = tl.sum(tl.where(mask, g * g, 0.0), 0)
        tl.atomic_add(slot_sums + slot_base + start // row_len, total, sem="relaxed")
    else:
        mask = offs < numel
        g = amos_clip(load_block(g_ptr + offs, mask, True, COMPUTE), unscale, clip, CLIP)
        slot = slot_base + slot_index(offs, meta + INFO_FIXED_, NDIM)
        tl.atomic_add(slot_sums + slot, g * g, mask=mask, sem="relaxed")


@triton.jit
def amos_slots_kernel(addresses, info, blocks, coef, slot_sums, slot_updates, n,
                      DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                      NDIM: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 2: g2 = Σ/count per slot; updates v, b; stores the slot's (w, a)
    interleaved in slot_updates; zeroes the slot's sum for the next step."""
    t, index = program_entry(blocks)
    v_ptr = stream(addresses, 1, n, t, DTYPE, False)
    b_ptr = stream(addresses, 2, n, t, DTYPE, False)
    meta = tensor_info(info, t, NDIM)
    numel = tl.load(meta)
    slot_base = tl.load(meta + 3)
    num_slots = tl.load(meta + 4)
    s = index * BLOCK + tl.arange(0, BLOCK)
    mask = s < num_slots
    sums = slot_sums + slot_base + s
    g2 = ieee_div(tl.load(sums, mask=mask, other=0.0), (numel // num_slots).to(COMPUTE), FP64)
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
    tl.store(sums, 0.0, mask=mask)


@triton.jit
def _elementwise_block(p_ptr, g_ptr, v_ptr, b_ptr, mu_ptr, offs, mask, coef_row,
                       COMPUTE: tl.constexpr, FP64: tl.constexpr, MOMENTUM: tl.constexpr,
                       CLIP: tl.constexpr, MASKED: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    b = load_block(b_ptr + offs, mask, MASKED, COMPUTE)
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + offs, mask, MASKED, COMPUTE)
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    g = amos_clip(g, unscale, clip, CLIP)
    v, b, w, a = amos_slot(v, b, g * g, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(v_ptr + offs, v, mask, MASKED)
    store_block(b_ptr + offs, b, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + offs, mu, mask, MASKED)


@triton.jit
def _row_squares(g_ptr, cols, mask, unscale, clip, COMPUTE: tl.constexpr, CLIP: tl.constexpr,
                 MASKED: tl.constexpr):
    g = amos_clip(load_block(g_ptr + cols, mask, MASKED, COMPUTE), unscale, clip, CLIP)
    if MASKED:
        g = tl.where(mask, g, 0.0)
    return g * g


@triton.jit
def _row_update(p_ptr, g_ptr, mu_ptr, cols, mask, w, a, unscale, clip, momentum, momentum_c,
                COMPUTE: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
                MASKED: tl.constexpr):
    p = load_block(p_ptr + cols, mask, MASKED, COMPUTE)
    g = amos_clip(load_block(g_ptr + cols, mask, MASKED, COMPUTE), unscale, clip, CLIP)
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + cols, mask, MASKED, COMPUTE)
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    store_block(p_ptr + cols, p, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + cols, mu, mask, MASKED)


@triton.jit
def _row(p_ptr, g_ptr, v_ptr, b_ptr, mu_ptr, r, row_len, coef_row, COMPUTE: tl.constexpr,
         FP64: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
         ROWS_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Row r (slot r): Σ clip(g)² over the row, the slot update, then the row's update.
    Full chunks run unmasked; with ROWS_ALIGNED (row lengths multiples of 8 elements
    in an aligned bucket) they start on 16-byte boundaries."""
    (beta, beta_c, bias_correction, epsilon, c_scale, lr_sq, alpha, d_scale, extra_l2, clip,
     momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    base = r * row_len
    end = base + row_len
    acc = tl.zeros([BLOCK], COMPUTE)
    for off in range(0, row_len, BLOCK):
        first = base + off
        if ROWS_ALIGNED:
            first = tl.multiple_of(first, 8)
        cols = first + tl.arange(0, BLOCK)
        if off + BLOCK <= row_len:
            acc += _row_squares(g_ptr, cols, cols < end, unscale, clip, COMPUTE, CLIP, False)
        else:
            acc += _row_squares(g_ptr, cols, cols < end, unscale, clip, COMPUTE, CLIP, True)
    g2 = ieee_div(tl.sum(acc, 0), row_len.to(COMPUTE), FP64)   # g2 = mean of g² over the row
    v = tl.load(v_ptr + r).to(COMPUTE)
    b = tl.load(b_ptr + r).to(COMPUTE)
    v, b, w, a = amos_slot(v, b, g2, beta, beta_c, bias_correction, epsilon, c_scale, lr_sq,
                           alpha, d_scale, extra_l2, FP64)
    tl.store(v_ptr + r, to_storage(v, v_ptr.dtype.element_ty))
    tl.store(b_ptr + r, to_storage(b, b_ptr.dtype.element_ty))
    for off in range(0, row_len, BLOCK):  # the row is still in cache
        first = base + off
        if ROWS_ALIGNED:
            first = tl.multiple_of(first, 8)
        cols = first + tl.arange(0, BLOCK)
        if off + BLOCK <= row_len:
            _row_update(p_ptr, g_ptr, mu_ptr, cols, cols < end, w, a, unscale, clip, momentum,
                        momentum_c, COMPUTE, MOMENTUM, CLIP, False)
        else:
            _row_update(p_ptr, g_ptr, mu_ptr, cols, cols < end, w, a, unscale, clip, momentum,
                        momentum_c, COMPUTE, MOMENTUM, CLIP, True)


@triton.jit
def _phased_block(p_ptr, g_ptr, mu_ptr, offs, mask, coef_row, slots, COMPUTE: tl.constexpr,
                  MOMENTUM: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr):
    """Elements of a phased tensor given the (w, a) of their slots (slots: scratch
    addresses of w; a follows each w)."""
    if MASKED:
        w = tl.load(slots, mask=mask, other=0.0)
        a = tl.load(slots + 1, mask=mask, other=0.0)
    else:
        w = tl.load(slots)
        a = tl.load(slots + 1)
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    mu = p
    if MOMENTUM:
        mu = load_block(mu_ptr + offs, mask, MASKED, COMPUTE)
    (_beta, _beta_c, _bias_correction, _epsilon, _c_scale, _lr_sq, _alpha, _d_scale, _extra_l2,
     clip, momentum, momentum_c, unscale) = load_amos_coefficients(coef_row)
    g = amos_clip(g, unscale, clip, CLIP)
    p, mu = amos_element(p, g, mu, w, a, momentum, momentum_c, MOMENTUM)
    store_block(p_ptr + offs, p, mask, MASKED)
    if MOMENTUM:
        store_block(mu_ptr + offs, mu, mask, MASKED)


@triton.jit
def amos_kernel(addresses, grad_addresses, info, blocks, coef, slot_updates, n,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                MOMENTUM: tl.constexpr, CLIP: tl.constexpr, ALIGNED: tl.constexpr,
                ROWS_ALIGNED: tl.constexpr, HAS_ELEMENTWISE: tl.constexpr, HAS_ROWS: tl.constexpr,
                HAS_PHASED: tl.constexpr, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    """Streams: 0 param, 1 v, 2 b, 3 mu (MOMENTUM).  blocks: (tensor, block index),
    or (tensor, row) for ROWS tensors."""
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    b = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    mu = p
    if MOMENTUM:
        mu = stream(addresses, 3, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * AMOS_WIDTH
    meta = tensor_info(info, t, NDIM)
    numel = tl.load(meta)
    kind = tl.load(meta + 1)
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if HAS_ELEMENTWISE:
        if kind == ELEMENTWISE_:
            if start + BLOCK <= numel:
                _elementwise_block(p, g, v, b, mu, offs, offs < numel, coef_row, COMPUTE, FP64,
                                   MOMENTUM, CLIP, False)
            else:
                _elementwise_block(p, g, v, b, mu, offs, offs < numel, coef_row, COMPUTE, FP64,
                                   MOMENTUM, CLIP, True)
    if HAS_ROWS:
        if kind == ROWS_:
            _row(p, g, v, b, mu, index, tl.load(meta + 2), coef_row, COMPUTE, FP64, MOMENTUM, CLIP,
                 ROWS_ALIGNED, BLOCK)
    if HAS_PHASED:
        if kind >= LONG_ROWS_:
            slots = slot_updates + 2 * (tl.load(meta + 3) + slot_index(offs, meta + INFO_FIXED_,
                                                                       NDIM))
            if start + BLOCK <= numel:
                _phased_block(p, g, mu, offs, offs < numel, coef_row, slots, COMPUTE, MOMENTUM, CLIP,
                              False)
            else:
                _phased_block(p, g, mu, offs, offs < numel, coef_row, slots, COMPUTE, MOMENTUM, CLIP,
                              True)
