"""Stochastic rounding of bfloat16 params (``bf16_stochastic_round=True``), the
reference copy of the hash the kernels use (csrc/stochastic_round.h; Triton:
triton_kernels/common.py).

A float32 result x becomes the bfloat16 value whose bit pattern is
``(bits(x) + r) & 0xffff0000`` with r a random integer in [0, 2^16): rounded up
with probability equal to the dropped fraction, so E[rounded] = x and updates
smaller than half a bfloat16 ulp are not lost on average (as torchao's
``bf16_stochastic_round``).  r is half of a counter-based hash of (the param's
key, its step count, the element's index in memory order), one 32-bit hash word
serving the two elements of a pair::

    key  = seed << 32 | the param's index in the optimizer
           (a shard of a sharded param: its index ^ h(offset_lo ^ h(offset_hi)))
    pair = index >> 1
    base = h(key_lo ^ h(key_hi ^ h(step ^ h(pair >> 32))))
    word = h(base ^ (pair & 0xffffffff))
    r    = word & 0xffff (an even index) or word >> 16 (an odd one)

with h = lowbias32 (C. Wellons' 32-bit integer hash).  No generator state: the
same bits on every backend, for any thread count, run after run.  NaN is kept."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .checks import is_dense

MASK32 = 0xFFFFFFFF
IntOrTensor = Union[int, Tensor]


def round_key(seed: int, index: int, shard_offset: int = 0) -> int:
    """The key of the param at ``index`` (its position in the optimizer's params).
    A shard of a sharded param (DTensor) whose first element is at flat
    ``shard_offset`` > 0 of the whole param mixes that offset into the index
    half, so its shards draw their own bits (replicas of one shard the same);
    the element index stays the one within the shard."""
    if shard_offset:
        index ^= lowbias32((shard_offset & MASK32) ^ lowbias32(shard_offset >> 32))
    return (seed << 32) | (index & MASK32)


def lowbias32(x: IntOrTensor) -> IntOrTensor:
    """h on uint32 values held in Python ints or int64 tensors (products wrap mod
    2^64 in int64; their low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def round_base(key: int, step: int, pair_hi: IntOrTensor) -> IntOrTensor:
    return lowbias32((key & MASK32) ^ lowbias32(((key >> 32) & MASK32) ^ lowbias32((step & MASK32) ^ lowbias32(pair_hi))))


def element_bits(key: int, step: int, index: IntOrTensor) -> IntOrTensor:
    """r of the elements at ``index`` (int64 memory indices): their halves of their
    pairs' hash words."""
    pair = index >> 1
    word = lowbias32(round_base(key, step, pair >> 32) ^ (pair & MASK32))
    return (word >> ((index & 1) * 16)) & 0xFFFF


def memory_indices(t: Tensor) -> Tensor:
    """Each element's index in t's memory order (int64, t's shape): its offset from
    t's first element for a dense tensor; for a non-dense view (a strided slice,
    which the reference steps), its rank among t's elements sorted by address, so
    that it draws the bits of the same element of a dense copy."""
    index = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[dim] = size
        index = index + (torch.arange(size, dtype=torch.int64, device=t.device) * stride).view(shape)
    if not is_dense(t):
        flat = index.reshape(-1)
        rank = torch.empty_like(flat)
        rank[torch.argsort(flat)] = torch.arange(flat.numel(), dtype=torch.int64, device=t.device)
        index = rank.view(t.shape)
    return index


def round_to_bfloat16(value: Tensor, key: int, step: int, like: Tensor) -> Tensor:
    """``value`` (float32, shaped like the bfloat16 param ``like``) stochastically
    rounded to bfloat16, with the bits of ``like``'s elements at this step."""
    bits = element_bits(key, step, memory_indices(like))
    pattern = value.float().contiguous().view(torch.int32).to(torch.int64) & MASK32
    rounded = (pattern + bits) & 0xFFFF0000
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    return torch.where(value.isnan(), value.float(), rounded).to(torch.bfloat16)  # exact: low bits are 0
