"""Per-element math of the rules that scale each tensor's Adam direction by a
norm (scale-aware Adam, LAMB), mirroring csrc/step_math.h: the
moments, the direction u = m̂/(sqrt(v̂)+ε) (+ λθ for LAMB), and the phase-2
update θ ← θ − (k·u + ρ·θ) with per-tensor k, ρ."""
import triton
import triton.language as tl

from .common import ieee_div, ieee_sqrt, torch_lerp

MOMENT_COLUMNS = (
    "beta1_complement", "beta2", "beta2_complement",
    "eps",
    "bc1",           # 1 − β1^t (1 without bias correction)
    "bc2_sqrt",      # sqrt(1 − β2^t)
    "weight_decay",  # λ added to the direction (LAMB), else 0
    "grad_unscale",
    "k_scale",       # scale-aware Adam: α0·‖ε0‖·s(t);  LAMB: η
    "rho",           # scale-aware Adam: α0²/(2q)·s(t); LAMB: 0
    "lerp_small",    # 1 when 1 − β1 < ½ (the form of torch_lerp), else 0
)


@triton.jit
def load_moment_coefficients(row):
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
            tl.load(row + 10))


@triton.jit
def load_scale_coefficients(row):
    return tl.load(row + 8), tl.load(row + 9)


@triton.jit
def update_moments(g, m, v, beta1_complement, beta2, beta2_complement, grad_unscale, lerp_small):
    g = g * grad_unscale                              # g ← g · inv_grad_scale
    m = torch_lerp(m, g, beta1_complement, lerp_small)     # m ← lerp(m, g, 1−β1)
    v = tl.fma(beta2_complement * g, g, v * beta2)    # v ← β2·v + (1−β2)·g² (addcmul)
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
def norm_scale(u_sq, theta_sq, k_scale, LAMB: tl.constexpr, FP64: tl.constexpr):
    """Per-tensor k from Σu² (and Σθ²):
    scale-aware Adam k = α0·‖ε0‖·s(t)/‖u‖ (0 when ‖u‖ = 0);
    LAMB k = η·‖θ‖/‖u‖ (η when either norm is 0)."""
    u_norm = ieee_sqrt(u_sq, FP64)
    safe_u_norm = tl.where(u_norm > 0, u_norm, 1.0)
    if LAMB:
        theta_norm = ieee_sqrt(theta_sq, FP64)
        ratio = tl.where((u_norm > 0) & (theta_norm > 0), ieee_div(theta_norm, safe_u_norm, FP64), 1.0)
        k = k_scale * ratio
    else:
        k = tl.where(u_norm > 0, ieee_div(k_scale, safe_u_norm, FP64), 0.0)
    return k


@triton.jit
def scaled_update(p, u, k, rho):
    return p - (k * u + rho * p)   # θ ← θ − (k·u + ρ·θ)
