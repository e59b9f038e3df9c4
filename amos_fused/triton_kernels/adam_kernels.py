"""One-pass kernels of the Adam family over a whole bucket:
program i steps block ``blocks[2i+1]`` of tensor ``blocks[2i]`` (common.py).
Full blocks run unmasked (vector accesses); only a tensor's last block is masked.
Math: adam_math.py."""
import triton
import triton.language as tl

from .adam_math import (ADAM_COLUMNS, LION_COLUMNS, RADAM_COLUMNS, adam_update,
                        load_adam_coefficients, load_lion_coefficients,
                        load_radam_coefficients, lion_update, radam_update)
from .common import load_block, program_entry, store_block, stream

ADAM_WIDTH = tl.constexpr(len(ADAM_COLUMNS))
RADAM_WIDTH = tl.constexpr(len(RADAM_COLUMNS))
LION_WIDTH = tl.constexpr(len(LION_COLUMNS))


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, coef_row, COMPUTE: tl.constexpr,
                FP64: tl.constexpr, AMSGRAD: tl.constexpr, L2: tl.constexpr,
                MASKED: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    vmax = v
    if AMSGRAD:
        vmax = load_block(vmax_ptr + offs, mask, MASKED, COMPUTE)
    b1c, b2, b2c, decay, l2, eps, bc2_sqrt, neg_step, unscale, small = load_adam_coefficients(coef_row)
    p, m, v, vmax = adam_update(p, g, m, v, vmax, b1c, b2, b2c, decay, l2, eps, bc2_sqrt,
                                neg_step, unscale, small, AMSGRAD, L2, FP64)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)
    store_block(v_ptr + offs, v, mask, MASKED)
    if AMSGRAD:
        store_block(vmax_ptr + offs, vmax, mask, MASKED)


@triton.jit
def adam_kernel(addresses, grad_addresses, numels, blocks, coef, n, DTYPE: tl.constexpr,
                COMPUTE: tl.constexpr, FP64: tl.constexpr, AMSGRAD: tl.constexpr,
                L2: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq, 3 max_exp_avg_sq (AMSGRAD)."""
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    vmax = v
    if AMSGRAD:
        vmax = stream(addresses, 3, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * ADAM_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if start + BLOCK <= numel:
        _adam_block(p, g, m, v, vmax, offs, offs < numel, coef_row, COMPUTE, FP64, AMSGRAD, L2, False)
    else:
        _adam_block(p, g, m, v, vmax, offs, offs < numel, coef_row, COMPUTE, FP64, AMSGRAD, L2, True)


@triton.jit
def _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef_row, COMPUTE: tl.constexpr,
                 FP64: tl.constexpr, L2: tl.constexpr, MASKED: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    (b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect, unscale,
     rectified, small) = load_radam_coefficients(coef_row)
    p, m, v = radam_update(p, g, m, v, b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect,
                           unscale, rectified, small, L2, FP64)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)
    store_block(v_ptr + offs, v, mask, MASKED)


@triton.jit
def radam_kernel(addresses, grad_addresses, numels, blocks, coef, n, DTYPE: tl.constexpr,
                 COMPUTE: tl.constexpr, FP64: tl.constexpr, L2: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq."""
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * RADAM_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if start + BLOCK <= numel:
        _radam_block(p, g, m, v, offs, offs < numel, coef_row, COMPUTE, FP64, L2, False)
    else:
        _radam_block(p, g, m, v, offs, offs < numel, coef_row, COMPUTE, FP64, L2, True)


@triton.jit
def _lion_block(p_ptr, g_ptr, m_ptr, offs, mask, coef_row, COMPUTE: tl.constexpr,
                MASKED: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    beta1, b1c, beta2, b2c, decay, neg_lr, unscale = load_lion_coefficients(coef_row)
    p, m = lion_update(p, g, m, beta1, b1c, beta2, b2c, decay, neg_lr, unscale)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)


@triton.jit
def lion_kernel(addresses, grad_addresses, numels, blocks, coef, n, DTYPE: tl.constexpr,
                COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Streams: 0 param, 1 exp_avg."""
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * LION_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if start + BLOCK <= numel:
        _lion_block(p, g, m, offs, offs < numel, coef_row, COMPUTE, False)
    else:
        _lion_block(p, g, m, offs, offs < numel, coef_row, COMPUTE, True)
