"""Scalar helpers shared by the Triton math modules (the counterparts of the
af_* helpers of csrc/step_math.h).

fp32 ``/`` and ``tl.sqrt`` lower to approximate instructions on NVIDIA GPUs;
the C++ kernels use IEEE-rounded ones, so fp32 math here goes through
``div_rn`` / ``sqrt_rn``.  FP64 selects plain (IEEE) fp64 operations."""
import triton
import triton.language as tl


@triton.jit
def sqrt_(x, FP64: tl.constexpr):
    if FP64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def div_(a, b, FP64: tl.constexpr):
    if FP64:
        y = a / b
    else:
        y = tl.math.div_rn(a, b)
    return y


@triton.jit
def maximum_(a, b):
    """torch.maximum: a NaN in either operand propagates."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def clamp_(x, lo, hi):
    """torch.clamp: NaN stays NaN."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def sign_(x):
    """torch.sign's (x > 0) − (x < 0): sign(±0) = sign(NaN) = +0."""
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def lerp_(a, b, w, small):
    """torch.lerp(a, b, w) as torch rounds it (af_lerp): a + w·(b−a) when |w| < ½
    (``small`` ≠ 0, chosen per tensor on the host), else b + (w−1)·(b−a), each one
    fma; w − 1 is exact for ½ ≤ w ≤ 2."""
    return tl.where(small != 0, tl.fma(w, b - a, a), tl.fma(w - 1.0, b - a, b))
