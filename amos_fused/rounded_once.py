"""a·b + c rounded once, as the fused kernels round it (``af_fma``, a fused
multiply-add) and as torch's vectorized CPU kernels round torch.lerp, addcmul and
add(alpha=…): the reference backend's three multiply-adds (amos_fused/reference.py).

torch's baseline CPU kernels (``ATEN_CPU_CAPABILITY=default``, or a CPU without
AVX2) round those ops twice, so there the reference computes float32 values
itself: the product of two float32 numbers is exact in float64, the sum is
rounded to odd in float64 (rounded to nearest, then moved one unit towards the
exact sum when that was inexact and the last bit is even; the exact rest from
Knuth's TwoSum), and a value rounded to odd with at least two more bits rounds to
float32 as the exact value would (Boldo & Melquiond, "Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008).
float64 values keep torch's ops: no wider type holds their products.
"""
from __future__ import annotations

import functools
from typing import Union

import torch
from torch import Tensor

Number = Union[float, Tensor]


def _as_float32(x: Number) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float32, device="cpu")


def fma32(a: Number, b: Tensor, c: Tensor) -> Tensor:
    """RN(a·b + c) of float32 values (a number is taken as float32 first, as the
    kernels take their coefficients), computed in float64 with the sum rounded to
    odd.  Non-finite inputs give what a fused multiply-add gives."""
    product = _as_float32(a).double() * b.double()  # exact: 24 + 24 bits
    addend = c.double()
    total = product + addend
    back = total - product
    rest = (product - (total - back)) + (addend - back)  # TwoSum: product + addend = total + rest
    inexact = (rest != 0) & torch.isfinite(total) & ((total.view(torch.int64) & 1) == 0)
    towards = torch.where(rest > 0, torch.full_like(total, float("inf")), torch.full_like(total, float("-inf")))
    return torch.where(inexact, torch.nextafter(total, towards), total).to(torch.float32)


@functools.lru_cache(maxsize=None)
def torch_rounds_once() -> bool:
    """Whether torch's CPU lerp, addcmul and add(alpha=…) round float32 a·b + c once
    (its vectorized kernels, vector lanes and scalar tails: True on AVX2 and AVX-512
    builds), probed on random float32 values against fma32, on real tensors whatever
    the caller's default dtype and dispatch modes (the answer is cached)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        x, y, z = (torch.randn(1003, generator=gen, device="cpu", dtype=torch.float32) for _ in range(3))
        w = 0.1
        return bool(torch.equal(torch.lerp(x, y, w), fma32(w, y - x, x))
                    and torch.equal(torch.addcmul(z, x, y, value=0.3), fma32(x * 0.3, y, z))
                    and torch.equal(torch.add(z, x, alpha=0.7), fma32(0.7, x, z)))


def _emulated(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and not torch_rounds_once()


def lerp(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """torch.lerp(start, end, weight) as torch's vectorized CPU kernel rounds it:
    start + w·(end − start) for |w| < ½, else end + (w − 1)·(end − start), each one
    fused multiply-add, w − 1 taken in the values' dtype (exact there, Sterbenz).
    torch's scalar loop, which steps the last elements of a tensor, writes the second
    form as end − (end − start)·(1 − w): the same value, except that with w = 1
    (β1 = 0) an end of −0 gives +0 there and −0 in the vector lanes and here.  torch
    picks the form from w as the math type holds it: float32 but for float64 values
    (a w just below ½ rounds to ½ there)."""
    small = abs(weight if start.dtype == torch.float64 else float(_as_float32(weight))) < 0.5
    if not _emulated(start):
        if small:
            return torch.lerp(start, end, weight)
        return torch.add(end, end - start, alpha=(torch.tensor(weight, dtype=start.dtype, device="cpu") - 1).item())
    if small:
        return fma32(weight, end - start, start)
    return fma32(_as_float32(weight) - 1, end - start, end)


def addcmul(start: Tensor, t1: Tensor, t2: Tensor, value: float) -> Tensor:
    """torch.addcmul(start, t1, t2, value=value) as torch's vectorized CPU kernel
    rounds it: (value·t1)·t2 + start, the product value·t1 rounded, then one fused
    multiply-add."""
    if not _emulated(start):
        return torch.addcmul(start, t1, t2, value=value)
    return fma32(t1 * value, t2, start)


def add_scaled(start: Tensor, other: Tensor, alpha: float) -> Tensor:
    """torch.add(start, other, alpha=alpha) as torch's vectorized CPU kernel rounds
    it: alpha·other + start, one fused multiply-add."""
    if not _emulated(start):
        return torch.add(start, other, alpha=alpha)
    return fma32(alpha, other, start)
