"""Two-phase kernels of scale-aware Adam and LAMB over a whole
bucket, one launch per phase (program map: common.py):
  phase 1 updates m, v and adds each block's Σu² (LAMB: and Σθ²) to its tensor's
          accumulators with one atomic per block;
  phase 2 turns the sums into the tensor's k on the device, recomputes u from the
          stored m, v and writes θ ← θ − (k·u + ρ·θ).
For bf16/fp16 storage (MOMENTS_IN_PHASE2) phase 1 only reads, and phase 2 updates
and stores m, v itself, so both phases use the same unrounded u (rounding m, v in
between would change u after it was normed; in fp16 v can underflow to 0).
The accumulators are double-buffered by step parity: phase 2 of one step reads
``sums[parity]`` and zeroes ``sums[1 − parity]`` for the next step, so no memset
launch is needed.  Math: norm_scaled_math.py."""
import triton
import triton.language as tl

from .common import load_block, program_entry, store_block, stream
from .norm_scaled_math import (MOMENT_COLUMNS, adam_direction, load_moment_coefficients,
                               load_scale_coefficients, norm_scale, scaled_update,
                               update_moments)

MOMENT_WIDTH = tl.constexpr(len(MOMENT_COLUMNS))


@triton.jit
def _phase1_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef_row, COMPUTE: tl.constexpr,
                  FP64: tl.constexpr, LAMB: tl.constexpr, MASKED: tl.constexpr,
                  MOMENTS_IN_PHASE2: tl.constexpr):
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    b1c, b2, b2c, eps, bc1, bc2_sqrt, wd, unscale, small = load_moment_coefficients(coef_row)
    m, v = update_moments(g, m, v, b1c, b2, b2c, unscale, small)
    p = g  # θ is read only by LAMB (its direction includes λθ)
    if LAMB:
        p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    u = adam_direction(p, m, v, eps, bc1, bc2_sqrt, wd, LAMB, FP64)
    if not MOMENTS_IN_PHASE2:
        store_block(m_ptr + offs, m, mask, MASKED)
        store_block(v_ptr + offs, v, mask, MASKED)
    if MASKED:
        u = tl.where(mask, u, 0.0)
        p = tl.where(mask, p, 0.0)
    u_sq = tl.sum(u * u, 0)
    theta_sq = u_sq
    if LAMB:
        theta_sq = tl.sum(p * p, 0)
    return u_sq, theta_sq


@triton.jit
def norm_scaled_phase1_kernel(addresses, grad_addresses, numels, blocks, coef, sums, n, parity,
                              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                              LAMB: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                              MOMENTS_IN_PHASE2: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq.  sums: [2 parities, n, (Σu², Σθ²)]."""
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * MOMENT_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if start + BLOCK <= numel:
        u_sq, theta_sq = _phase1_block(p, g, m, v, offs, offs < numel, coef_row, COMPUTE, FP64, LAMB,
                                       False, MOMENTS_IN_PHASE2)
    else:
        u_sq, theta_sq = _phase1_block(p, g, m, v, offs, offs < numel, coef_row, COMPUTE, FP64, LAMB,
                                       True, MOMENTS_IN_PHASE2)
    acc = sums + (parity * n + t) * 2
    tl.atomic_add(acc, u_sq, sem="relaxed")
    if LAMB:
        tl.atomic_add(acc + 1, theta_sq, sem="relaxed")


@triton.jit
def _phase2_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef_row, k, rho, COMPUTE: tl.constexpr,
                  FP64: tl.constexpr, LAMB: tl.constexpr, MASKED: tl.constexpr,
                  MOMENTS_IN_PHASE2: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    b1c, b2, b2c, eps, bc1, bc2_sqrt, wd, unscale, small = load_moment_coefficients(coef_row)
    if MOMENTS_IN_PHASE2:
        g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
        m, v = update_moments(g, m, v, b1c, b2, b2c, unscale, small)
        store_block(m_ptr + offs, m, mask, MASKED)
        store_block(v_ptr + offs, v, mask, MASKED)
    u = adam_direction(p, m, v, eps, bc1, bc2_sqrt, wd, LAMB, FP64)
    store_block(p_ptr + offs, scaled_update(p, u, k, rho), mask, MASKED)


@triton.jit
def norm_scaled_phase2_kernel(addresses, grad_addresses, numels, blocks, coef, sums, n, parity,
                              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                              LAMB: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                              MOMENTS_IN_PHASE2: tl.constexpr):
    t, index = program_entry(blocks)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * MOMENT_WIDTH
    acc = sums + (parity * n + t) * 2
    k_scale, rho = load_scale_coefficients(coef_row)
    k = norm_scale(tl.load(acc), tl.load(acc + 1), k_scale, LAMB, FP64)
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if start + BLOCK <= numel:
        _phase2_block(p, g, m, v, offs, offs < numel, coef_row, k, rho, COMPUTE, FP64, LAMB, False,
                      MOMENTS_IN_PHASE2)
    else:
        _phase2_block(p, g, m, v, offs, offs < numel, coef_row, k, rho, COMPUTE, FP64, LAMB, True,
                      MOMENTS_IN_PHASE2)
    if index == 0:  # clear the other parity's accumulators for the next step
        other = sums + ((1 - parity) * n + t) * 2
        tl.store(other, 0.0)
        tl.store(other + 1, 0.0)
