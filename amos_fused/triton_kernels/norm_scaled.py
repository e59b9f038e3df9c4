"""Scale-aware Adam (ScaledAdamW) and LAMB on the Triton backend: the rules that
scale each tensor's Adam direction by a norm.  The coefficient columns it reads,
per-element math, two-phase kernels and launch.

Math, mirroring csrc/step_math.h: the moments, the direction u = m̂/(sqrt(v̂)+ε)
(+ λθ for LAMB), and the phase-2 update θ ← θ − (k·u + ρ·θ) with per-tensor k, ρ.

Kernels: one launch per phase over a whole bucket (program map: common.py), and
a small reduction launch between them:
  phase 1 updates m, v and writes each block's Σu² (LAMB: and Σθ²) to the block's
          own entry of ``partials`` (one pair per block, in block order);
  reduce  one program per tensor adds its blocks' partials (contiguous in the
          block list) in a fixed order, so the sums are deterministic: no
          atomics, nothing depends on the order the programs run in
          (common.py's tensor_sums_kernel);
  phase 2 turns the sums into the tensor's k on the device, recomputes u from the
          stored m, v and writes θ ← θ − (k·u + ρ·θ); with telemetry, each block's
          Σθ², Σ(Δθ)² of the stored θ go to its own pair of the telemetry partials,
          added per tensor by a second tensor_sums_kernel launch (common.py); with
          ROUND (bf16_stochastic_round) θ is rounded stochastically before its
          store (common.py's round_block).
For bf16/fp16 storage (MOMENTS_IN_PHASE2) phase 1 only reads, and phase 2 updates
and stores m, v itself, so both phases use the same unrounded u (rounding m, v in
between would change u after it was normed; in fp16 v can underflow to 0).
Every scratch entry is written before it is read in each step: nothing to zero.

Inputs are checked by ops.py before anything here runs."""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contracts import contract
from .common import (column_constants, BLOCK, NUM_WARPS, BucketMeta, compute_dtype, elementwise_meta,
                     first_programs, ieee_div, ieee_sqrt, int64_table, kernel_dtypes, launch_telemetry_sums,
                     launching, load_block, program_entry, round_block, rounding_table, store_block, stream,
                     telemetry_entry, telemetry_partials, tensor_sums_kernel, torch_lerp, track_block,
                     upload_coefficients, ROUND_WIDTH, skip_flag)


# ---------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------

# The columns this module reads, placed by the contract (csrc/step_coefficients.h's
# NormScaledCoef: MomentCoef's fields, then scale, rho, init_norm); both rules
# have the same columns.
(N_B1C, N_B2, N_B2C, N_EPS, N_BC1, N_BC2_SQRT, N_WEIGHT_DECAY, N_UNSCALE, N_LERP_SMALL, N_SCALE, N_RHO,
 N_INIT_NORM) = column_constants("scaled_adam", (
    "beta1_complement", "beta2", "beta2_complement",
    "eps",
    "bc1",           # 1 − β1^t (1 without bias correction)
    "bc2_sqrt",      # sqrt(1 − β2^t)
    "weight_decay",  # λ added to the direction (LAMB), else 0
    "grad_unscale",
    "lerp_small",    # 1 when 1 − β1 < ½ (the form of torch_lerp), else 0
    "scale",         # scale-aware Adam: α0·s(t);  LAMB: η
    "rho",           # scale-aware Adam: α0²/(2q)·s(t); LAMB: 0
    "init_norm",     # scale-aware Adam: ‖ε0‖;  LAMB: 0
))
assert contract("lamb").columns == contract("scaled_adam").columns


# ---------------------------------------------------------------------------
# Per-element math
# ---------------------------------------------------------------------------

@triton.jit
def load_moment_coefficients(row):
    return (tl.load(row + N_B1C), tl.load(row + N_B2), tl.load(row + N_B2C), tl.load(row + N_EPS),
            tl.load(row + N_BC1), tl.load(row + N_BC2_SQRT), tl.load(row + N_WEIGHT_DECAY),
            tl.load(row + N_UNSCALE), tl.load(row + N_LERP_SMALL))


@triton.jit
def load_scale_coefficients(row):
    return tl.load(row + N_SCALE), tl.load(row + N_RHO), tl.load(row + N_INIT_NORM)


@triton.jit
def update_moments(g, m, v, beta1_complement, beta2, beta2_complement, grad_unscale, lerp_small):
    g = g * grad_unscale                                 # g ← g · inv_grad_scale
    m = torch_lerp(m, g, beta1_complement, lerp_small)   # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)       # v ← β2·v + (1−β2)·g² (addcmul)
    return m, v


@triton.jit
def adam_direction(p, m, v, eps, bc1, bc2_sqrt, weight_decay, DECAY: tl.constexpr,
                   FP64: tl.constexpr):
    """u = m̂/(sqrt(v̂)+ε) with torch's ε placement, + λθ when DECAY (LAMB)."""
    u = ieee_div(ieee_div(m, bc1, FP64), ieee_div(ieee_sqrt(v, FP64), bc2_sqrt, FP64) + eps, FP64)
    if DECAY:
        u = u + weight_decay * p
    return u


@triton.jit
def norm_scale(u_sq, theta_sq, scale, init_norm, LAMB: tl.constexpr, FP64: tl.constexpr):
    """Per-tensor k from Σu² (and Σθ²):
    scale-aware Adam k = α0·s(t)·‖ε0‖/‖u‖ (0 when ‖u‖ = 0);
    LAMB k = η·‖θ‖/‖u‖ (η when either norm is 0, NaN or Inf)."""
    u_norm = ieee_sqrt(u_sq, FP64)
    safe_u_norm = tl.where(u_norm > 0, u_norm, 1.0)
    if LAMB:
        theta_norm = ieee_sqrt(theta_sq, FP64)
        both = (u_norm > 0) & (theta_norm > 0) & (u_norm < float("inf")) & (theta_norm < float("inf"))
        ratio = tl.where(both, ieee_div(theta_norm, tl.where(both, u_norm, 1.0), FP64), 1.0)
        k = scale * ratio
    else:
        k = tl.where(u_norm > 0, ieee_div(scale * init_norm, safe_u_norm, FP64), 0.0)
    return k


@triton.jit
def scaled_update(p, u, k, rho):
    return p - (k * u + rho * p)   # θ ← θ − (k·u + ρ·θ)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

MOMENT_WIDTH = tl.constexpr(len(contract("scaled_adam").columns))


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
def norm_scaled_phase1_kernel(addresses, grad_addresses, numels, blocks, coef, partials, n,
                              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                              LAMB: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                              MOMENTS_IN_PHASE2: tl.constexpr, skip,
                              SKIPPABLE: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq.  partials: [num_blocks, (Σu², Σθ²)],
    this program's pair written by it alone."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
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
    own = partials + 2 * tl.program_id(0).to(tl.int64)
    tl.store(own, u_sq)
    if LAMB:
        tl.store(own + 1, theta_sq)


@triton.jit
def _phase2_block(p_ptr, g_ptr, m_ptr, v_ptr, start, offs, mask, coef_row, k, rho, own, round_row,
                  COMPUTE: tl.constexpr, FP64: tl.constexpr, LAMB: tl.constexpr, MASKED: tl.constexpr,
                  MOMENTS_IN_PHASE2: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr,
                  BLOCK: tl.constexpr):
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
    new_p = scaled_update(p, u, k, rho)
    if ROUND:
        new_p = round_block(new_p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, new_p, mask, MASKED)
    if TELEMETRY:
        track_block(own, p, new_p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def norm_scaled_phase2_kernel(addresses, grad_addresses, numels, blocks, coef, sums, telemetry, rounding, n,
                              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FP64: tl.constexpr,
                              LAMB: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                              MOMENTS_IN_PHASE2: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr, skip,
                              SKIPPABLE: tl.constexpr):
    """telemetry (TELEMETRY): the float64 telemetry partials, a pair per program;
    rounding (ROUND): the rounding table (common.py)."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, index = program_entry(blocks)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * MOMENT_WIDTH
    acc = sums + 2 * t
    scale, rho, init_norm = load_scale_coefficients(coef_row)
    k = norm_scale(tl.load(acc), tl.load(acc + 1), scale, init_norm, LAMB, FP64)
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    if start + BLOCK <= numel:
        _phase2_block(p, g, m, v, start, offs, offs < numel, coef_row, k, rho, own, round_row, COMPUTE, FP64,
                      LAMB, False, MOMENTS_IN_PHASE2, TELEMETRY, ROUND, BLOCK)
    else:
        _phase2_block(p, g, m, v, start, offs, offs < numel, coef_row, k, rho, own, round_row, COMPUTE, FP64,
                      LAMB, True, MOMENTS_IN_PHASE2, TELEMETRY, ROUND, BLOCK)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

class NormScaledMeta(BucketMeta):
    """Adds the per-block partials [num_blocks, (Σu², Σθ²)], the per-tensor sums
    [n, (Σu², Σθ²)] and each tensor's first block (n + 1 entries, the last one
    num_blocks) (see the module docstring)."""

    def __init__(self, streams, block):
        super().__init__(streams, block)
        scratch = dict(dtype=compute_dtype(streams[0][0].dtype), device=self.device)
        self.partials = torch.zeros(2 * max(self.num_blocks, 1), **scratch)
        self.sums = torch.zeros(2 * self.n, **scratch)
        self.first_blocks = int64_table(first_programs(self.program_counts), self.device)


def launch_scaled_adam(params, grads, states, hyper, coef: Tensor, _prepared=None,
                       telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                       skip: Optional[Tensor] = None) -> None:
    _launch_norm_scaled(params, grads, states, coef, lamb=False, telemetry=telemetry, rounding=rounding, skip=skip)


def launch_lamb(params, grads, states, hyper, coef: Tensor, _prepared=None,
                telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                skip: Optional[Tensor] = None) -> None:
    _launch_norm_scaled(params, grads, states, coef, lamb=True, telemetry=telemetry, rounding=rounding, skip=skip)


def _launch_norm_scaled(params, grads, states, coef: Tensor, lamb: bool,
                        telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                        skip: Optional[Tensor] = None) -> None:
    """Scale-aware Adam (lamb=False) or LAMB: phase 1 then phase 2 (and, with
    ``telemetry``, the sums of phase 2's telemetry partials into it; with
    ``rounding``, phase 2 stores θ with stochastic rounding)."""
    meta = elementwise_meta("norm_scaled", [params, states["exp_avg"], states["exp_avg_sq"]], BLOCK,
                            NormScaledMeta)
    if meta.num_blocks == 0:
        with launching(meta):
            launch_telemetry_sums(meta, telemetry)  # zeros: no elements
        return
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    coef = upload_coefficients(coef, params)
    types = kernel_dtypes(params[0].dtype)
    grid = (meta.num_blocks,)
    # Narrow storage: m, v are written in phase 2 (see the module docstring).
    moments_in_phase2 = params[0].dtype in (torch.bfloat16, torch.float16)
    aligned = meta.aligned and grads_aligned
    with launching(meta):
        norm_scaled_phase1_kernel[grid](
            meta.addresses, grad_table, meta.numels, meta.blocks, coef, meta.partials, meta.n,
            **types, LAMB=lamb, ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
            MOMENTS_IN_PHASE2=moments_in_phase2, skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        tensor_sums_kernel[(meta.n,)](
            meta.partials, meta.first_blocks, meta.sums, COMPUTE=types["COMPUTE"], BOTH=lamb,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
        norm_scaled_phase2_kernel[grid](
            meta.addresses, grad_table, meta.numels, meta.blocks, coef, meta.sums,
            telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n,
            **types, LAMB=lamb, ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
            MOMENTS_IN_PHASE2=moments_in_phase2, TELEMETRY=telemetry is not None,
            ROUND=rounding is not None, skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        launch_telemetry_sums(meta, telemetry)
