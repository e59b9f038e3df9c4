"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): a step works on
each param's local shard.  States of a DTensor param are DTensors with the
param's mesh and placements (so ``torch.distributed.checkpoint`` saves and
reshards them); the kernels see the local tensors.  An elementwise update needs
no communication.  A per-tensor norm over a sharded tensor (ScaledAdamW, LAMB)
sums the local partial sums of a bucket over the mesh dims that shard it, in one
all-reduce per bucket (``sum_over_shards``).  Amos slots reduced over a sharded
dim are refused clearly."""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    dist = DTensor = Shard = None


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


def shard_groups(t: Tensor) -> Tuple:
    """The process groups of the mesh dims that shard t (empty for a plain or
    replicated tensor): summing a partial sum over them gives the whole tensor's."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(t.placements) if isinstance(p, Shard))


def sum_over_shards(partials: Tensor, owners: Sequence[Tensor]) -> Tensor:
    """``partials[i]``: the local partial sums of ``owners[i]`` (one row per tensor).
    Returns the sums over the whole tensors: rows of sharded tensors are summed over
    the ranks that hold their shards, with one all-reduce per distinct set of process
    groups (one for a bucket of one FSDP2 mesh)."""
    by_groups: Dict[Tuple, List[int]] = {}
    for i, owner in enumerate(owners):
        groups = shard_groups(owner)
        if groups:
            by_groups.setdefault(groups, []).append(i)
    out = partials.clone()
    for groups, rows in by_groups.items():
        block = out[rows].contiguous()
        for group in groups:
            dist.all_reduce(block, op=dist.ReduceOp.SUM, group=group)
        out[rows] = block
    return out
