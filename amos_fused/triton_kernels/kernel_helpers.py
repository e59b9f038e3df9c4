"""How the Triton kernels walk a bucket: which tensor and block a
program owns, the address of a tensor's stream, and loads / stores in the
storage dtype with math in the compute dtype.  Tables: see bucket.py."""
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def program_entry(table):
    """This program's (tensor, index) pair of a program map."""
    pid = tl.program_id(0).to(tl.int64)
    return tl.load(table + 2 * pid), tl.load(table + 2 * pid + 1)


# True when triton.jit made interpreted functions (TRITON_INTERPRET=1 at import):
# the kernels then step CPU tensors.  The interpreter converts fp32 → bf16 by
# truncation where GPUs round to nearest even, so its stores round explicitly
# and CPU tests see the GPU's rounding.
INTERPRETED = tl.constexpr(isinstance(program_entry, InterpretedFunction))


@triton.jit
def stream(addresses, s, n, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the first element of tensor t of stream s (addresses[s·n + t])."""
    ptr = tl.load(addresses + s * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # lets full blocks use 16-byte vector accesses
    return ptr


@triton.jit
def load_(ptrs, mask, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(COMPUTE)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """x (compute dtype) rounded to nearest even in the storage dtype."""
    y = x.to(DTYPE)
    if INTERPRETED:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            y = tl.where(x != x, y, rounded)  # NaN stays NaN
    return y


@triton.jit
def store_(ptrs, x, mask, MASKED: tl.constexpr):
    y = to_storage(x, ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, y, mask=mask)
    else:
        tl.store(ptrs, y)
