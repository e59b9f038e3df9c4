// Per-element optimizer math: the ONE copy of each algorithm's update in C++.
//
// Every function here is a template over the value type T, which is a scalar
// (float, double) or, on the CPU, a SIMD vector (at::vec::Vectorized<float>
// or <double>; overloads of af_sqrt / af_max / af_sign / af_fma for those live
// in csrc/cpu/vec_ops.h and must be declared before this header is included).
// The CUDA kernels call the same functions with T = float.
//
// Coefficient structs hold per-step, per-tensor scalars. They are computed once
// per step on the host in double (csrc/step_coefficients.h) and converted to T
// with `map`, so the inner loops contain no pow/sqrt of scalars.
//
// Operation order follows torch.optim's single-tensor implementation
// (mul_, lerp_, addcmul_, addcdiv_) so float32 results agree to a few ULP.
// Where torch's CPU kernels round a·b + c once (lerp, addcmul, add with alpha)
// the math says so with af_fma; everything else is rounded op by op (the C++
// build uses -ffp-contract=off, so SIMD body and scalar tail agree bitwise).
// Sources: Adam / AdamW (Kingma & Ba, arXiv:1412.6980; Loshchilov & Hutter,
// arXiv:1711.05101), RAdam (Liu et al., arXiv:1908.03265), Lion (Chen et al.,
// arXiv:2302.06675), Amos (Tian & Parikh, arXiv:2210.11693;
// google-research/jestimator's amos.py), scale-aware Adam (Su Jianlin, kexue.fm,
// 2022-11-22) and LAMB (You et al., arXiv:1904.00962).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AF_HD __host__ __device__ __forceinline__
#else
#define AF_HD inline
#endif

namespace amos_fused {

// ---- scalar helpers (vector overloads: csrc/cpu/vec_ops.h) -----------------
AF_HD float af_sqrt(float x) { return ::sqrtf(x); }
AF_HD double af_sqrt(double x) { return ::sqrt(x); }

// torch.maximum semantics: NaN in either operand propagates.
template <typename S>
AF_HD S af_max(S a, S b) { return (a > b || a != a) ? a : b; }

// torch.clamp semantics: NaN stays NaN.
template <typename S>
AF_HD S af_clamp(S x, S lo, S hi) { return x < lo ? lo : (x > hi ? hi : x); }

// torch.sign semantics: (x > 0) − (x < 0), so sign(±0) = sign(NaN) = +0.
template <typename S>
AF_HD S af_sign(S x) { return S(x > S(0) ? 1 : 0) - S(x < S(0) ? 1 : 0); }

// a·b + c rounded once.
AF_HD float af_fma(float a, float b, float c) { return ::fmaf(a, b, c); }
AF_HD double af_fma(double a, double b, double c) { return ::fma(a, b, c); }

// torch.lerp(a, b, w) as torch's kernels round it: a + w·(b−a) when |w| < ½,
// else b + (w−1)·(b−a), each one fma.  `small` (|w| < ½) is chosen per tensor on
// the host; w − 1 is exact in T for ½ ≤ w ≤ 2 (Sterbenz), as in torch.
template <typename T>
AF_HD T af_lerp(T a, T b, T w, bool small) {
  return small ? af_fma(w, b - a, a) : af_fma(w - T(1), b - a, b);
}

// A coefficient that divides square roots (sqrt(1 − β2^t)): the field's type is
// AfRootDivisor<T>, and x / d is only ever taken of an x = af_sqrt(·).  It
// rounds as any division does; scalar types keep d as it is, the CPU's float
// vectors keep its reciprocal too and divide without a divide instruction
// (csrc/cpu/vec_ops.h).
template <typename T>
struct AfRootDivisorOf {
  using type = T;
};
template <typename T>
using AfRootDivisor = typename AfRootDivisorOf<T>::type;

// ---- coefficient structs ------------------------------------------------------
// Each struct's fields are listed ONCE, in an X-macro of (type, name): the
// struct, its `map` (conversion to another value type) and the columns of the
// table that other backends read (csrc/step_coefficients.h) all expand it.
// Value fields have type T; per-tensor flags are bool and are never converted.
template <typename F>
inline bool af_map_field(const F&, bool x) { return x; }
template <typename F, typename S>
inline auto af_map_field(const F& f, const S& x) { return f(x); }

// from_columns reads one row of that table (double, flags as 0 / 1) into the
// struct, each value converted to T as map() converts it: the capturable steps
// of the CUDA backend compute the table on the device and read it there.
#define AF_COEF_FIELD(type, name) type name;
#define AF_COEF_MAP(type, name) af_map_field(f, name),
#define AF_COEF_COUNT(type, name) +1
#define AF_COEF_LOAD(type, name) c.name = static_cast<type>(row[i++]);
#define AF_COEF_STRUCT(Name, FIELDS)                 \
  template <typename T>                              \
  struct Name {                                      \
    FIELDS(AF_COEF_FIELD)                            \
    static constexpr int kColumns = 0 FIELDS(AF_COEF_COUNT); \
    template <typename U, typename F>                \
    Name<U> map(F f) const {                         \
      return {FIELDS(AF_COEF_MAP)};                  \
    }                                                \
    AF_HD static Name from_columns(const double* row) { \
      Name c;                                        \
      int i = 0;                                     \
      FIELDS(AF_COEF_LOAD)                           \
      return c;                                      \
    }                                                \
  };

// ---- Adam / AdamW -----------------------------------------------------------
#define AF_ADAM_COEF(X) \
  X(T, beta1_complement) /* 1 − β1 (lerp weight) */                      \
  X(T, beta2)            /* β2 */                                        \
  X(T, beta2_complement) /* 1 − β2 */                                    \
  X(T, param_decay)      /* 1 − ηλ when decoupled, else 1 */             \
  X(T, l2)               /* λ when coupled (L2), else 0 */               \
  X(T, eps)              /* ε */                                         \
  X(AfRootDivisor<T>, bc2_sqrt) /* sqrt(1 − β2^t), 1 without bias correction */ \
  X(T, neg_step_size)    /* −η/(1 − β1^t), −η without */                 \
  X(T, grad_unscale)     /* 1 / GradScaler scale, or 1 */                \
  X(bool, lerp_small)    /* 1 − β1 < ½: form of af_lerp */
AF_COEF_STRUCT(AdamCoef, AF_ADAM_COEF)

// One Adam(W) element.  vmax is only touched when AMSGRAD.  Returns the root it
// took, sqrt(v) (sqrt(v̂max) with AMSGRAD), which FP8 states store.
template <bool AMSGRAD, bool L2, typename T>
AF_HD T adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamCoef<T>& c) {
  g = g * c.grad_unscale;                          // g ← g · inv_grad_scale
  if (L2) g = af_fma(c.l2, p, g);                  // g ← g + λθ  (grad.add(θ, alpha=λ))
  p = p * c.param_decay;                           // θ ← θ·(1 − ηλ)
  m = af_lerp(m, g, c.beta1_complement, c.lerp_small);  // m ← lerp(m, g, 1−β1)
  v = af_fma(c.beta2_complement * g, g, v * c.beta2);   // v ← β2·v + (1−β2)·g² (addcmul)
  T second = v;
  if (AMSGRAD) {
    vmax = af_max(vmax, v);                        // v̂max ← max(v̂max, v)
    second = vmax;
  }
  const T root = af_sqrt(second);
  T denom = root / c.bc2_sqrt + c.eps;             // sqrt(v/bc2) + ε
  p = p + c.neg_step_size * m / denom;             // θ ← θ − η/bc1 · m/denom
  return root;
}

// ---- RAdam --------------------------------------------------------------------
#define AF_RADAM_COEF(X) \
  X(T, beta1_complement) /* 1 − β1 */                                    \
  X(T, beta2)                                                            \
  X(T, beta2_complement) /* 1 − β2 */                                    \
  X(T, param_decay)      /* 1 − ηλ when decoupled, else 1 */             \
  X(T, l2)               /* λ when coupled, else 0 */                    \
  X(T, eps)                                                              \
  X(T, bc1)              /* 1 − β1^t */                                  \
  X(T, lr)               /* η */                                         \
  X(T, bc2_sqrt)         /* sqrt(1 − β2^t) */                            \
  X(T, rect)             /* r_t, used only when rectified */             \
  X(T, grad_unscale)     /* 1 / GradScaler scale, or 1 */                \
  X(bool, rectified)     /* ρ_t > threshold */                           \
  X(bool, lerp_small)    /* 1 − β1 < ½ (af_lerp) */
AF_COEF_STRUCT(RAdamCoef, AF_RADAM_COEF)

// One RAdam element.  Returns sqrt(v), which FP8 states store.
template <bool L2, typename T>
AF_HD T radam_update(T& p, T g, T& m, T& v, const RAdamCoef<T>& c) {
  g = g * c.grad_unscale;                          // g ← g · inv_grad_scale
  if (L2) g = af_fma(c.l2, p, g);                  // g ← g + λθ  (grad.add(θ, alpha=λ))
  p = p * c.param_decay;                           // θ ← θ·(1 − ηλ)
  m = af_lerp(m, g, c.beta1_complement, c.lerp_small);  // m ← lerp(m, g, 1−β1)
  v = af_fma(c.beta2_complement * g, g, v * c.beta2);   // v ← β2·v + (1−β2)·g² (addcmul)
  const T root = af_sqrt(v);
  T step = (m / c.bc1) * c.lr;                     // η·m̂
  if (c.rectified) {                               // ρ_t > threshold
    // sqrt(bc2)/(sqrt(v)+ε) as torch.optim.RAdam rounds it: a number over a tensor is
    // the tensor's reciprocal times the number (two roundings)
    T adaptive = (T(1) / (root + c.eps)) * c.bc2_sqrt;
    step = step * adaptive * c.rect;               // η·r·m̂·sqrt(bc2)/(sqrt(v)+ε)
  }
  p = p - step;
  return root;
}

// ---- Lion / SignSGDM-W ---------------------------------------------------------
#define AF_LION_COEF(X) \
  X(T, beta1)                                                            \
  X(T, beta1_complement)                                                 \
  X(T, beta2)                                                            \
  X(T, beta2_complement)                                                 \
  X(T, param_decay)      /* 1 − ηλ */                                    \
  X(T, neg_lr)           /* −η */                                        \
  X(T, grad_unscale)     /* 1 / GradScaler scale, or 1 */
AF_COEF_STRUCT(LionCoef, AF_LION_COEF)

template <typename T>
AF_HD void lion_update(T& p, T g, T& m, const LionCoef<T>& c) {
  g = g * c.grad_unscale;                                      // g ← g · inv_grad_scale
  T direction = af_sign(m * c.beta1 + g * c.beta1_complement);  // sign(β1·m + (1−β1)·g)
  p = p * c.param_decay + c.neg_lr * direction;                // θ ← θ(1−ηλ) − η·sign(c)
  m = m * c.beta2 + g * c.beta2_complement;                    // m ← β2·m + (1−β2)·g
}

// ---- Adam moments and direction, shared by the two-phase rules ----------------------
#define AF_MOMENT_COEF(X) \
  X(T, beta1_complement)                                                 \
  X(T, beta2)                                                            \
  X(T, beta2_complement)                                                 \
  X(T, eps)                                                              \
  X(T, bc1)              /* 1 − β1^t (1 without bias correction) */      \
  X(AfRootDivisor<T>, bc2_sqrt) /* sqrt(1 − β2^t) */                      \
  X(T, weight_decay)     /* λ added to the direction (LAMB), else 0 */   \
  X(T, grad_unscale)     /* 1 / GradScaler scale, or 1 */                \
  X(bool, lerp_small)    /* 1 − β1 < ½ (af_lerp) */
AF_COEF_STRUCT(MomentCoef, AF_MOMENT_COEF)

template <typename T>
AF_HD void update_moments(T g, T& m, T& v, const MomentCoef<T>& c) {
  g = g * c.grad_unscale;                        // g ← g · inv_grad_scale
  m = af_lerp(m, g, c.beta1_complement, c.lerp_small);  // m ← lerp(m, g, 1−β1)
  v = af_fma(c.beta2_complement * g, g, v * c.beta2);   // v ← β2·v + (1−β2)·g² (addcmul)
}

// u = m̂/(sqrt(v̂)+ε) (+ λθ for LAMB), with torch's ε placement.
template <bool DECAY, typename T>
AF_HD T adam_direction(T p, T m, T v, const MomentCoef<T>& c) {
  T u = (m / c.bc1) / (af_sqrt(v) / c.bc2_sqrt + c.eps);
  if (DECAY) u = u + c.weight_decay * p;
  return u;
}

// Phase 2 of the norm-scaled rules: θ ← θ − (k·u + ρ·θ), with per-tensor k, ρ:
//   scale-aware Adam: k = α0·‖ε0‖·s(t)/‖u‖, ρ = α0²/(2q)·s(t)
//   LAMB:             k = η·‖θ‖/‖u‖ (η when a norm is 0), ρ = 0
template <typename T>
AF_HD void scaled_update(T& p, T u, T k, T rho) {
  p = p - (k * u + rho * p);
}

// ---- Amos -------------------------------------------------------------------------
#define AF_AMOS_COEF(X) \
  X(T, beta)                /* β */                                         \
  X(T, beta_complement)     /* 1 − β */                                     \
  X(T, bias_correction)     /* 1 − β^t */                                   \
  X(T, epsilon)             /* floor of v */                                \
  X(T, c_scale)             /* c_coef·sqrt(ξ) */                            \
  X(T, lr_sq)               /* ξ² */                                        \
  X(T, alpha)               /* α = ξ·η */                                   \
  X(T, d_scale)             /* d_coef·sqrt(α) */                            \
  X(T, extra_l2)                                                            \
  X(T, clip)                /* clip_value (used only when clipping) */      \
  X(T, momentum)                                                            \
  X(T, momentum_complement) /* 1 − momentum */                              \
  X(T, grad_unscale)        /* 1 / GradScaler scale, or 1 */
AF_COEF_STRUCT(AmosCoef, AF_AMOS_COEF)

template <bool CLIP, typename T>
AF_HD T amos_clip(T g, const AmosCoef<T>& c) {
  g = g * c.grad_unscale;                                 // g ← g · inv_grad_scale
  return CLIP ? af_clamp(g, T(0) - c.clip, c.clip) : g;  // g ← clamp(g, −clip, clip)
}

// One slot: g2 = mean of g² over the slot's elements.  Updates v and b and
// returns the slot's update as Δ = w·θ − a·g for each of its elements.
template <typename T>
AF_HD void amos_slot(T& v, T& b, T g2, T& w, T& a, const AmosCoef<T>& c) {
  v = c.beta * v + c.beta_complement * g2;                // v ← β·v + (1−β)·g2
  T r = c.bias_correction / af_max(v, c.epsilon);         // r = (1−β^t)/max(v, ε)
  T decay_c = T(1) / af_sqrt(T(1) + c.c_scale * b);       // c = 1/sqrt(1 + c_coef·sqrt(ξ)·b)  (old b)
  T gamma = decay_c * c.lr_sq * r * g2;                   // γ = c·ξ²·r·g2
  T d = T(1) / (T(1) + c.d_scale * b);                    // d = 1/(1 + d_coef·sqrt(α)·b)  (old b)
  w = d * (T(-0.5) * gamma - c.extra_l2);                 // Δ = d·((−½γ − l2)·θ − α·sqrt(r)·g)
  a = d * c.alpha * af_sqrt(r);
  b = b + gamma * (T(1) + b);                             // b ← b + γ·(1+b)  (last)
}

// One element given its slot's (w, a): Δ = w·θ − a·g, optional un-debiased EMA, θ ← θ + Δ.
template <bool MOMENTUM, typename T>
AF_HD void amos_element(T& p, T g, T& mu, T w, T a, const AmosCoef<T>& c) {
  T delta = w * p - a * g;
  if (MOMENTUM) {
    mu = c.momentum * mu + c.momentum_complement * delta;  // mu ← m·mu + (1−m)·Δ;  Δ ← mu
    delta = mu;
  }
  p = p + delta;
}

}  // namespace amos_fused
