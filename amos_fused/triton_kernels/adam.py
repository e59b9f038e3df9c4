"""Adam / AdamW (+ amsgrad, L2, no bias correction), RAdam and Lion on the Triton
backend: for each, the columns it reads from its coefficient table (computed on
the host in double by csrc/step_coefficients.h, columns named by the contract),
its per-element math (mirroring
csrc/step_math.h operation by operation, torch.optim's single-tensor order, in
the compute dtype: fp32, or fp64 for fp64 tensors), its one-pass kernel over a
whole bucket and its launch.

Each algorithm names the coefficient columns it reads with ``column_constants``
(common.py: the contract's columns, checked at import to be exactly the names
given), and its ``load_*_coefficients`` helper reads a row through them.
Program i of a kernel steps block ``blocks[2i+1]`` of tensor ``blocks[2i]``
(common.py); full blocks run unmasked (vector accesses), only a tensor's last
block is masked.  With TELEMETRY, program i also writes its block's Σθ², Σ(Δθ)²
to pair i of ``telemetry`` (the float64 partials; common.py adds them per tensor).
With ROUND (bf16_stochastic_round: bfloat16 params with round_keys), θ is rounded
stochastically before its store (common.py's round_block, row t of ``rounding``);
telemetry then sees the rounded stored value.

Inputs are checked by ops.py before anything here runs."""
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..contracts import contract
from .common import (column_constants, BLOCK, FP_FUSION, NUM_WARPS, elementwise_meta, ieee_div, ieee_sqrt,
                     kernel_dtypes, launch_telemetry_sums, launching, load_block, nan_maximum, program_entry,
                     round_block, rounding_table, store_block, stream, telemetry_entry, telemetry_partials, torch_lerp,
                     torch_sign, track_block, upload_coefficients, ROUND_WIDTH, skip_flag)


# ---------------------------------------------------------------------------
# Adam / AdamW
# ---------------------------------------------------------------------------

# The columns this module reads, placed by the contract (csrc/step_math.h's AdamCoef).
(A_B1C, A_B2, A_B2C, A_DECAY, A_L2, A_EPS, A_BC2_SQRT, A_NEG_STEP, A_UNSCALE, A_LERP_SMALL) = column_constants("adam", (
    "beta1_complement",  # 1 − β1 (lerp weight)
    "beta2",
    "beta2_complement",  # 1 − β2
    "param_decay",       # 1 − ηλ when decoupled, else 1
    "l2",                # λ when coupled (L2), else 0
    "eps",
    "bc2_sqrt",          # sqrt(1 − β2^t), 1 without bias correction
    "neg_step_size",     # −η/(1 − β1^t), −η without bias correction
    "grad_unscale",      # 1/GradScaler scale, or 1
    "lerp_small",        # 1 when 1 − β1 < ½ (the form of torch_lerp), else 0
))


@triton.jit
def load_adam_coefficients(row):
    return (tl.load(row + A_B1C), tl.load(row + A_B2), tl.load(row + A_B2C), tl.load(row + A_DECAY),
            tl.load(row + A_L2), tl.load(row + A_EPS), tl.load(row + A_BC2_SQRT),
            tl.load(row + A_NEG_STEP), tl.load(row + A_UNSCALE), tl.load(row + A_LERP_SMALL))


@triton.jit
def adam_update(p, g, m, v, vmax, beta1_complement, beta2, beta2_complement, param_decay, l2,
                eps, bc2_sqrt, neg_step_size, grad_unscale, lerp_small,
                AMSGRAD: tl.constexpr, L2: tl.constexpr, FP64: tl.constexpr):
    """One Adam(W) step; vmax is only used with AMSGRAD.  Returns p, m, v, vmax and the
    root it took, sqrt(v) (sqrt(vmax) with AMSGRAD): the stored form of an FP8 v (fp8.py)."""
    g = g * grad_unscale                                 # g ← g · inv_grad_scale
    if L2:
        g = tl.fma(l2, p, g)                             # g ← g + λθ  (grad.add(θ, alpha=λ))
    p = p * param_decay                                  # θ ← θ·(1 − ηλ)
    m = torch_lerp(m, g, beta1_complement, lerp_small)   # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)       # v ← β2·v + (1−β2)·g² (addcmul)
    second = v
    if AMSGRAD:
        vmax = nan_maximum(vmax, v)                      # v̂max ← max(v̂max, v)
        second = vmax
    root = ieee_sqrt(second, FP64)
    denom = ieee_div(root, bc2_sqrt, FP64) + eps         # sqrt(v/bc2) + ε
    p = p + ieee_div(neg_step_size * m, denom, FP64)     # θ ← θ − η/bc1 · m/denom
    return p, m, v, vmax, root


ADAM_WIDTH = tl.constexpr(len(contract("adam").columns))


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, offs, mask, coef_row, own, round_row,
                COMPUTE: tl.constexpr, FP64: tl.constexpr, AMSGRAD: tl.constexpr, L2: tl.constexpr,
                MASKED: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    before = p
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    vmax = v
    if AMSGRAD:
        vmax = load_block(vmax_ptr + offs, mask, MASKED, COMPUTE)
    b1c, b2, b2c, decay, l2, eps, bc2_sqrt, neg_step, unscale, small = load_adam_coefficients(coef_row)
    p, m, v, vmax, _ = adam_update(p, g, m, v, vmax, b1c, b2, b2c, decay, l2, eps, bc2_sqrt,
                                   neg_step, unscale, small, AMSGRAD, L2, FP64)
    if ROUND:
        p = round_block(p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)
    store_block(v_ptr + offs, v, mask, MASKED)
    if AMSGRAD:
        store_block(vmax_ptr + offs, vmax, mask, MASKED)
    if TELEMETRY:
        track_block(own, before, p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def adam_kernel(addresses, grad_addresses, numels, blocks, coef, telemetry, rounding, n, DTYPE: tl.constexpr,
                COMPUTE: tl.constexpr, FP64: tl.constexpr, AMSGRAD: tl.constexpr,
                L2: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr,
                ROUND: tl.constexpr, skip,
                SKIPPABLE: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq, 3 max_exp_avg_sq (AMSGRAD)."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
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
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    if start + BLOCK <= numel:
        _adam_block(p, g, m, v, vmax, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, FP64,
                    AMSGRAD, L2, False, TELEMETRY, ROUND, BLOCK)
    else:
        _adam_block(p, g, m, v, vmax, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, FP64,
                    AMSGRAD, L2, True, TELEMETRY, ROUND, BLOCK)


def _l2(hyper) -> bool:
    """Coupled (L2) weight decay: g ← g + λθ."""
    return not hyper["decoupled"] and hyper["weight_decay"] != 0.0


def launch_adam(params, grads, states, hyper, coef: Tensor, _prepared=None,
                telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                skip: Optional[Tensor] = None) -> None:
    amsgrad = bool(hyper["amsgrad"])
    l2 = _l2(hyper)
    streams = [params, states["exp_avg"], states["exp_avg_sq"]] + ([states["max_exp_avg_sq"]] if amsgrad else [])
    meta = elementwise_meta("adam", streams, BLOCK)
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    with launching(meta):
        if meta.num_blocks:
            adam_kernel[(meta.num_blocks,)](
                meta.addresses, grad_table, meta.numels, meta.blocks, upload_coefficients(coef, params),
                telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n,
                **kernel_dtypes(params[0].dtype), AMSGRAD=amsgrad, L2=l2,
                ALIGNED=meta.aligned and grads_aligned, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
                TELEMETRY=telemetry is not None, ROUND=rounding is not None,
                skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        launch_telemetry_sums(meta, telemetry)


# ---------------------------------------------------------------------------
# RAdam
# ---------------------------------------------------------------------------

# The columns this module reads, placed by the contract (csrc/step_math.h's RAdamCoef).
(R_B1C, R_B2, R_B2C, R_DECAY, R_L2, R_EPS, R_BC1, R_LR, R_BC2_SQRT, R_RECT, R_UNSCALE,
 R_RECTIFIED, R_LERP_SMALL) = column_constants("radam", (
    "beta1_complement", "beta2", "beta2_complement",
    "param_decay",   # 1 − ηλ when decoupled, else 1
    "l2",            # λ when coupled, else 0
    "eps",
    "bc1",           # 1 − β1^t
    "lr",            # η
    "bc2_sqrt",      # sqrt(1 − β2^t)
    "rect",          # r_t (used only when rectified)
    "grad_unscale",
    "rectified",     # 1 when ρ_t > threshold, else 0
    "lerp_small",    # 1 when 1 − β1 < ½ (the form of torch_lerp), else 0
))


@triton.jit
def load_radam_coefficients(row):
    return (tl.load(row + R_B1C), tl.load(row + R_B2), tl.load(row + R_B2C), tl.load(row + R_DECAY),
            tl.load(row + R_L2), tl.load(row + R_EPS), tl.load(row + R_BC1), tl.load(row + R_LR),
            tl.load(row + R_BC2_SQRT), tl.load(row + R_RECT), tl.load(row + R_UNSCALE),
            tl.load(row + R_RECTIFIED), tl.load(row + R_LERP_SMALL))


@triton.jit
def radam_update(p, g, m, v, beta1_complement, beta2, beta2_complement, param_decay, l2, eps,
                 bc1, lr, bc2_sqrt, rect, grad_unscale, rectified, lerp_small,
                 L2: tl.constexpr, FP64: tl.constexpr):
    """One RAdam step.  Returns p, m, v."""
    g = g * grad_unscale
    if L2:
        g = tl.fma(l2, p, g)                             # g ← g + λθ  (grad.add(θ, alpha=λ))
    p = p * param_decay                                  # θ ← θ·(1 − ηλ)
    m = torch_lerp(m, g, beta1_complement, lerp_small)   # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)       # v ← β2·v + (1−β2)·g² (addcmul)
    step = ieee_div(m, bc1, FP64) * lr                   # η·m̂
    # sqrt(bc2)/(sqrt(v)+ε) as torch.optim.RAdam rounds it: 1/(sqrt(v)+ε), then times sqrt(bc2)
    adaptive = ieee_div(1.0, ieee_sqrt(v, FP64) + eps, FP64) * bc2_sqrt
    step = tl.where(rectified != 0, step * adaptive * rect, step)  # ρ_t > threshold
    p = p - step
    return p, m, v


RADAM_WIDTH = tl.constexpr(len(contract("radam").columns))


@triton.jit
def _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, start, offs, mask, coef_row, own, round_row, COMPUTE: tl.constexpr,
                 FP64: tl.constexpr, L2: tl.constexpr, MASKED: tl.constexpr, TELEMETRY: tl.constexpr,
                 ROUND: tl.constexpr, BLOCK: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    before = p
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    v = load_block(v_ptr + offs, mask, MASKED, COMPUTE)
    (b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect, unscale,
     rectified, small) = load_radam_coefficients(coef_row)
    p, m, v = radam_update(p, g, m, v, b1c, b2, b2c, decay, l2, eps, bc1, lr, bc2_sqrt, rect,
                           unscale, rectified, small, L2, FP64)
    if ROUND:
        p = round_block(p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)
    store_block(v_ptr + offs, v, mask, MASKED)
    if TELEMETRY:
        track_block(own, before, p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def radam_kernel(addresses, grad_addresses, numels, blocks, coef, telemetry, rounding, n, DTYPE: tl.constexpr,
                 COMPUTE: tl.constexpr, FP64: tl.constexpr, L2: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr, skip,
                 SKIPPABLE: tl.constexpr):
    """Streams: 0 param, 1 exp_avg, 2 exp_avg_sq."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    v = stream(addresses, 2, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * RADAM_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    if start + BLOCK <= numel:
        _radam_block(p, g, m, v, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, FP64, L2, False,
                     TELEMETRY, ROUND, BLOCK)
    else:
        _radam_block(p, g, m, v, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, FP64, L2, True,
                     TELEMETRY, ROUND, BLOCK)


def launch_radam(params, grads, states, hyper, coef: Tensor, _prepared=None,
                 telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                 skip: Optional[Tensor] = None) -> None:
    l2 = _l2(hyper)
    meta = elementwise_meta("radam", [params, states["exp_avg"], states["exp_avg_sq"]], BLOCK)
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    with launching(meta):
        if meta.num_blocks:
            radam_kernel[(meta.num_blocks,)](
                meta.addresses, grad_table, meta.numels, meta.blocks, upload_coefficients(coef, params),
                telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n,
                **kernel_dtypes(params[0].dtype), L2=l2, ALIGNED=meta.aligned and grads_aligned,
                BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
                TELEMETRY=telemetry is not None, ROUND=rounding is not None,
                skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        launch_telemetry_sums(meta, telemetry)


# ---------------------------------------------------------------------------
# Lion
# ---------------------------------------------------------------------------

# The columns this module reads, placed by the contract (csrc/step_math.h's LionCoef).
(L_B1, L_B1C, L_B2, L_B2C, L_DECAY, L_NEG_LR, L_UNSCALE) = column_constants("lion", (
    "beta1", "beta1_complement", "beta2", "beta2_complement",
    "param_decay",   # 1 − ηλ
    "neg_lr",        # −η
    "grad_unscale",
))


@triton.jit
def load_lion_coefficients(row):
    return (tl.load(row + L_B1), tl.load(row + L_B1C), tl.load(row + L_B2), tl.load(row + L_B2C),
            tl.load(row + L_DECAY), tl.load(row + L_NEG_LR), tl.load(row + L_UNSCALE))


@triton.jit
def lion_update(p, g, m, beta1, beta1_complement, beta2, beta2_complement, param_decay, neg_lr,
                grad_unscale):
    """One Lion / SignSGDM-W step.  Returns p, m."""
    g = g * grad_unscale
    direction = torch_sign(m * beta1 + g * beta1_complement)  # sign(β1·m + (1−β1)·g)
    p = p * param_decay + neg_lr * direction                  # θ ← θ(1−ηλ) − η·sign(c)
    m = m * beta2 + g * beta2_complement                      # m ← β2·m + (1−β2)·g
    return p, m


LION_WIDTH = tl.constexpr(len(contract("lion").columns))


@triton.jit
def _lion_block(p_ptr, g_ptr, m_ptr, start, offs, mask, coef_row, own, round_row, COMPUTE: tl.constexpr,
                MASKED: tl.constexpr, TELEMETRY: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    p = load_block(p_ptr + offs, mask, MASKED, COMPUTE)
    before = p
    g = load_block(g_ptr + offs, mask, MASKED, COMPUTE)
    m = load_block(m_ptr + offs, mask, MASKED, COMPUTE)
    beta1, b1c, beta2, b2c, decay, neg_lr, unscale = load_lion_coefficients(coef_row)
    p, m = lion_update(p, g, m, beta1, b1c, beta2, b2c, decay, neg_lr, unscale)
    if ROUND:
        p = round_block(p, round_row, start, offs, BLOCK)
    store_block(p_ptr + offs, p, mask, MASKED)
    store_block(m_ptr + offs, m, mask, MASKED)
    if TELEMETRY:
        track_block(own, before, p, mask, p_ptr.dtype.element_ty, MASKED)


@triton.jit
def lion_kernel(addresses, grad_addresses, numels, blocks, coef, telemetry, rounding, n, DTYPE: tl.constexpr,
                COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr,
                ROUND: tl.constexpr, skip,
                SKIPPABLE: tl.constexpr):
    """Streams: 0 param, 1 exp_avg."""
    if SKIPPABLE:  # a capturable step: GradScaler's found_inf read here, the step skipped on the device
        if tl.load(skip) != 0:
            return
    t, index = program_entry(blocks)
    p = stream(addresses, 0, n, t, DTYPE, ALIGNED)
    m = stream(addresses, 1, n, t, DTYPE, ALIGNED)
    g = stream(grad_addresses, 0, n, t, DTYPE, ALIGNED)
    coef_row = coef + t * LION_WIDTH
    start = index * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    own = telemetry_entry(telemetry)
    round_row = rounding + t * ROUND_WIDTH
    if start + BLOCK <= numel:
        _lion_block(p, g, m, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, False, TELEMETRY,
                    ROUND, BLOCK)
    else:
        _lion_block(p, g, m, start, offs, offs < numel, coef_row, own, round_row, COMPUTE, True, TELEMETRY,
                    ROUND, BLOCK)


def launch_lion(params, grads, states, hyper, coef: Tensor, _prepared=None,
                telemetry: Optional[Tensor] = None, rounding: Optional[Tensor] = None,
                skip: Optional[Tensor] = None) -> None:
    meta = elementwise_meta("lion", [params, states["exp_avg"]], BLOCK)
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    types = kernel_dtypes(params[0].dtype)
    del types["FP64"]  # Lion's math has no division or square root
    with launching(meta):
        if meta.num_blocks:
            lion_kernel[(meta.num_blocks,)](
                meta.addresses, grad_table, meta.numels, meta.blocks, upload_coefficients(coef, params),
                telemetry_partials(meta, telemetry), rounding_table(meta, rounding), meta.n,
                **types, ALIGNED=meta.aligned and grads_aligned, BLOCK=BLOCK,
                num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
                TELEMETRY=telemetry is not None, ROUND=rounding is not None,
                skip=skip_flag(skip, meta), SKIPPABLE=skip is not None)
        launch_telemetry_sums(meta, telemetry)
