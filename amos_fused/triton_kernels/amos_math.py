"""Per-element math of Amos, mirroring csrc/step_math.h: a slot's
update of v and b, which yields the slot's Δ = w·θ − a·g, then the elementwise
part (optional momentum, θ ← θ + Δ).  γ, c and d use the OLD b; b is updated
last; weight decay acts on the pre-update θ."""
import triton
import triton.language as tl

from .common import ieee_div, ieee_sqrt, nan_clamp, nan_maximum

AMOS_COLUMNS = (
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
)
# Positions of the two columns the gradient pre-processing needs on its own.
AMOS_CLIP_COLUMN = tl.constexpr(9)
AMOS_UNSCALE_COLUMN = tl.constexpr(12)


@triton.jit
def load_amos_coefficients(row):
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
            tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11),
            tl.load(row + 12))


@triton.jit
def amos_clip(g, grad_unscale, clip, CLIP: tl.constexpr):
    g = g * grad_unscale                  # g ← g · inv_grad_scale
    if CLIP:
        g = nan_clamp(g, 0.0 - clip, clip)   # g ← clamp(g, −clip, clip)
    return g


@triton.jit
def amos_slot(v, b, g2, beta, beta_complement, bias_correction, epsilon, c_scale, lr_sq, alpha,
              d_scale, extra_l2, FP64: tl.constexpr):
    """One slot given g2 = mean of g² over its elements.  Returns the new v, b and
    the slot's (w, a) with Δ = w·θ − a·g."""
    v = beta * v + beta_complement * g2                             # v ← β·v + (1−β)·g2
    r = ieee_div(bias_correction, nan_maximum(v, epsilon), FP64)           # r = (1−β^t)/max(v, ε)
    decay_c = ieee_div(1.0, ieee_sqrt(1.0 + c_scale * b, FP64), FP64)       # c = 1/sqrt(1 + c_coef·sqrt(ξ)·b)
    gamma = decay_c * lr_sq * r * g2                                # γ = c·ξ²·r·g2
    d = ieee_div(1.0, 1.0 + d_scale * b, FP64)                          # d = 1/(1 + d_coef·sqrt(α)·b)
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
