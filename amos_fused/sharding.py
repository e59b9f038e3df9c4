"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): a step works on
each param's local shard.  States of a DTensor param are DTensors with the
param's mesh and placements (so ``torch.distributed.checkpoint`` saves and
reshards them); the kernels see the local tensors.  An elementwise update needs
no communication; a reduction over a sharded dim would (Amos slots reduced over
it, the per-tensor norms of ScaledAdamW and LAMB): those are refused clearly."""
from __future__ import annotations

from typing import Sequence, Set

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise); in-place updates
    of it are updates of the DTensor."""
    return t._local_tensor if is_dtensor(t) else t


def sharded_dims(t: Tensor) -> Set[int]:
    """The dims of t that some mesh dim shards (empty for a plain tensor)."""
    if not is_dtensor(t):
        return set()
    return {p.dim % max(t.dim(), 1) for p in t.placements if isinstance(p, Shard)}


def slot_zeros(param: Tensor, slot_shape: Sequence[int], make) -> Tensor:
    """Zeros of ``slot_shape`` (param's dims, reduced ones of size 1) for a DTensor
    param: a DTensor with the param's mesh and placements whose local tensor has
    the local param's sizes on the kept dims (``make(like, shape)`` allocates it)."""
    shard = local(param)
    local_shape = [shard.size(d) if n != 1 else 1 for d, n in enumerate(slot_shape)]
    zeros = make(shard, local_shape)
    stride = torch.empty(tuple(slot_shape), device="meta").stride()
    return DTensor.from_local(zeros, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(slot_shape), stride=stride)
