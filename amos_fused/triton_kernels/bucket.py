"""Per-bucket metadata of the Triton kernels, built once and cached.

A bucket's kernels find everything through small device tables:
  * addresses — the element address of every tensor of every stream (param and
    state lists), int64, stream-major: ``addresses[s * n + t]``;
  * numels    — elements per tensor, int64;
  * blocks    — the block→tensor map: for program i, ``blocks[2i]`` is its tensor
    and ``blocks[2i + 1]`` the index of its block (or row) within that tensor,
    so ONE launch covers the whole bucket whatever the number of tensors.
Grads get a table of their own (``GradAddresses``): autograd may hand over new
grad tensors every step, and only that small table is re-uploaded then.

The cache key is made of the tensors' ``data_ptr()``s and sizes (never ``id()``),
so a table is rebuilt exactly when an address or a shape changes."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, List, Sequence, Tuple, Type

import torch
from torch import Tensor

# Vector loads need 16-byte aligned tensors (torch's allocations are; views may not be).
VECTOR_BYTES = 16
MAX_CACHED_BUCKETS = 64

_cache: "OrderedDict[Hashable, object]" = OrderedDict()


def cached(key: Hashable, build: Callable[[], object]):
    """The metadata stored under ``key``, built on a miss (least recently used evicted)."""
    meta = _cache.get(key)
    if meta is None:
        meta = build()
        meta.cache_key = key
        _cache[key] = meta
        if len(_cache) > MAX_CACHED_BUCKETS:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return meta


def forget(key: Hashable) -> None:
    """Drops a cache entry (after a failed launch, whose scratch state is unknown)."""
    _cache.pop(key, None)


def clear_cache() -> None:
    _cache.clear()


def addresses_of(streams: Sequence[Sequence[Tensor]]) -> Tuple[int, ...]:
    return tuple(t.data_ptr() for stream in streams for t in stream)


def all_aligned(addresses: Sequence[int]) -> bool:
    return all(a % VECTOR_BYTES == 0 for a in addresses)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math dtype for a storage dtype: fp32, fp64 for fp64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def int64_table(values, device: torch.device) -> Tensor:
    return torch.as_tensor(values, dtype=torch.int64).to(device)


def program_map(programs: Tensor) -> Tensor:
    """Interleaved (tensor, index) pairs: ``programs[t]`` programs for tensor t,
    numbered 0, 1, … within it."""
    programs = programs.to(torch.int64)
    total = int(programs.sum())
    tensor = torch.repeat_interleave(torch.arange(len(programs)), programs)
    first = torch.cumsum(programs, 0) - programs
    index = torch.arange(total) - torch.repeat_interleave(first, programs)
    return torch.stack([tensor, index], 1).reshape(-1)


def block_map(counts: Tensor, block: int) -> Tensor:
    """program_map covering ``counts[t]`` elements of each tensor in blocks of ``block``."""
    counts = counts.to(torch.int64)
    return program_map((counts + block - 1) // block)


class GradAddresses:
    """The grad address table of one bucket, re-uploaded only when a grad moved."""

    def __init__(self, device: torch.device):
        self.device = device
        self.key: Tuple[int, ...] = ()
        self.table: Tensor = torch.empty(0, dtype=torch.int64, device=device)
        self.aligned = True

    def get(self, grads: Sequence[Tensor]) -> Tuple[Tensor, bool]:
        key = tuple(g.data_ptr() for g in grads)
        if key != self.key:
            self.table = int64_table(key, self.device)
            self.aligned = all_aligned(key)
            self.key = key
        return self.table, self.aligned


class BucketMeta:
    """Device tables of one bucket walked elementwise in blocks of ``block``."""

    def __init__(self, streams: Sequence[Sequence[Tensor]], block: int):
        params = streams[0]
        self.device = params[0].device
        self.n = len(params)
        addresses = addresses_of(streams)
        self.addresses = int64_table(addresses, self.device)
        self.aligned = all_aligned(addresses)
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        self.numels = numels.to(self.device)
        blocks = block_map(numels, block)
        self.num_blocks = len(blocks) // 2
        self.blocks = blocks.to(self.device)
        self.grad_addresses = GradAddresses(self.device)


def elementwise_key(tag: str, streams: Sequence[Sequence[Tensor]], block: int) -> tuple:
    params = streams[0]
    return (tag, params[0].dtype, params[0].device, block, addresses_of(streams),
            tuple(p.numel() for p in params))


def elementwise_meta(tag: str, streams: List[Sequence[Tensor]], block: int,
                     kind: Type[BucketMeta] = BucketMeta) -> BucketMeta:
    """The cached metadata (of class ``kind``) of a bucket whose streams (params
    first) are walked elementwise."""
    return cached(elementwise_key(tag, streams, block), lambda: kind(streams, block))
