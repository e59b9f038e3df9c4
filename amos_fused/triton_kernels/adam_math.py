"""Per-element math of the Adam family: Adam / AdamW (+ amsgrad,
L2, no bias correction), RAdam and Lion.  Mirrors csrc/step_math.h operation by
operation (torch.optim's single-tensor order), in the compute dtype of the
caller (fp32, or fp64 for fp64 tensors).

Each ``*_COLUMNS`` tuple names the per-tensor coefficients of one algorithm in
the order of its row in the coefficient table (built by coefficients.py, read
by the ``load_*`` helpers below)."""
import triton
import triton.language as tl

from .common import ieee_div, ieee_sqrt, nan_maximum, torch_lerp, torch_sign

ADAM_COLUMNS = (
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
)


@triton.jit
def load_adam_coefficients(row):
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
            tl.load(row + 8), tl.load(row + 9))


@triton.jit
def adam_update(p, g, m, v, vmax, beta1_complement, beta2, beta2_complement, param_decay, l2,
                eps, bc2_sqrt, neg_step_size, grad_unscale, lerp_small,
                AMSGRAD: tl.constexpr, L2: tl.constexpr, FP64: tl.constexpr):
    """One Adam(W) step; vmax is only used with AMSGRAD.  Returns p, m, v, vmax."""
    g = g * grad_unscale                             # g ← g · inv_grad_scale
    if L2:
        g = tl.fma(l2, p, g)                         # g ← g + λθ  (grad.add(θ, alpha=λ))
    p = p * param_decay                              # θ ← θ·(1 − ηλ)
    m = torch_lerp(m, g, beta1_complement, lerp_small)    # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)   # v ← β2·v + (1−β2)·g² (addcmul)
    second = v
    if AMSGRAD:
        vmax = nan_maximum(vmax, v)                     # v̂max ← max(v̂max, v)
        second = vmax
    denom = ieee_div(ieee_sqrt(second, FP64), bc2_sqrt, FP64) + eps  # sqrt(v/bc2) + ε
    p = p + ieee_div(neg_step_size * m, denom, FP64)     # θ ← θ − η/bc1 · m/denom
    return p, m, v, vmax


RADAM_COLUMNS = (
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
)


@triton.jit
def load_radam_coefficients(row):
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
            tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11),
            tl.load(row + 12))


@triton.jit
def radam_update(p, g, m, v, beta1_complement, beta2, beta2_complement, param_decay, l2, eps,
                 bc1, lr, bc2_sqrt, rect, grad_unscale, rectified, lerp_small,
                 L2: tl.constexpr, FP64: tl.constexpr):
    """One RAdam step.  Returns p, m, v."""
    g = g * grad_unscale
    if L2:
        g = tl.fma(l2, p, g)                         # g ← g + λθ  (grad.add(θ, alpha=λ))
    p = p * param_decay                              # θ ← θ·(1 − ηλ)
    m = torch_lerp(m, g, beta1_complement, lerp_small)    # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)   # v ← β2·v + (1−β2)·g² (addcmul)
    step = ieee_div(m, bc1, FP64) * lr                   # η·m̂
    adaptive = ieee_div(bc2_sqrt, ieee_sqrt(v, FP64) + eps, FP64)  # sqrt(bc2)/(sqrt(v)+ε)
    step = tl.where(rectified != 0, step * adaptive * rect, step)  # ρ_t > threshold
    p = p - step
    return p, m, v


LION_COLUMNS = (
    "beta1", "beta1_complement", "beta2", "beta2_complement",
    "param_decay",   # 1 − ηλ
    "neg_lr",        # −η
    "grad_unscale",
)


@triton.jit
def load_lion_coefficients(row):
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6))


@triton.jit
def lion_update(p, g, m, beta1, beta1_complement, beta2, beta2_complement, param_decay, neg_lr,
                grad_unscale):
    """One Lion / SignSGDM-W step.  Returns p, m."""
    g = g * grad_unscale
    direction = torch_sign(m * beta1 + g * beta1_complement)  # sign(β1·m + (1−β1)·g)
    p = p * param_decay + neg_lr * direction             # θ ← θ(1−ηλ) − η·sign(c)
    m = m * beta2 + g * beta2_complement                 # m ← β2·m + (1−β2)·g
    return p, m
