"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): a step works on
each param's local shard.  States of a DTensor param are DTensors with the
param's mesh and placements (so ``torch.distributed.checkpoint`` saves and
reshards them); the kernels see the local tensors.  An elementwise update needs
no communication.  A reduction over a sharded dim — the per-tensor norms of
ScaledAdamW and LAMB, Amos slots averaged over a sharded dim — sums the local
partial sums of a bucket over the mesh dims that shard it, in one all-reduce per
bucket (``sum_over_shards``); such slots are replicated over those mesh dims."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    dist = DTensor = Replicate = Shard = None
try:  # FSDP2 over tensor parallelism shards a dim twice, the outer mesh dim's shards strided
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = None
# What shards a dim: torch's _StridedShard is no Shard (nor is_shard()), yet splits its dim the same way.
_SHARDS = tuple(kind for kind in (Shard, _StridedShard) if kind is not None)


def _shards(placement) -> bool:
    return isinstance(placement, _SHARDS)


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


_PLAIN = frozenset({Tensor, torch.nn.Parameter})  # (no DTensor: an isinstance check spared)


def dtensor_positions(tensors: Sequence) -> List[int]:
    """The positions of the DTensors among ``tensors`` (one pass, no call per item)."""
    if DTensor is None:
        return []
    return [i for i, t in enumerate(tensors) if type(t) not in _PLAIN and isinstance(t, DTensor)]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise); in-place updates
    of it are updates of the DTensor."""
    return t._local_tensor if is_dtensor(t) else t


def placed_like(param: Tensor, grad: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor param's DTensor grad on the param's mesh and placements, as the
    step reads it (a Partial or otherwise placed grad redistributed, as torch's ops
    on DTensors would do: a collective, taken alike on every rank); any other
    grad as it is (the step's checks name a mismatch)."""
    if (grad is None or not is_dtensor(param) or not is_dtensor(grad)
            or (grad.device_mesh == param.device_mesh and tuple(grad.placements) == tuple(param.placements))):
        return grad
    return grad.redistribute(param.device_mesh, param.placements)


def placed_as(whole: Tensor, like: Tensor) -> Tensor:
    """``whole``, the same full tensor on every rank, as a DTensor on ``like``'s
    mesh and placements: each rank keeps its own shard (no communication where
    torch allows it)."""
    from torch.distributed.tensor import distribute_tensor
    try:
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # pragma: no cover (torch before src_data_rank: rank 0's copy is scattered)
        return distribute_tensor(whole, like.device_mesh, like.placements)


def shard_offset(t: Tensor) -> int:
    """The flat (row-major) index, in the whole tensor, of the first element of
    this rank's shard of a DTensor (0 for a plain tensor, a replica of the whole,
    or an empty shard)."""
    if not is_dtensor(t) or t.numel() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if 0 in local_shape:
        return 0
    flat, stride = 0, 1
    for size, offset in zip(reversed(t.shape), reversed(offsets)):
        flat += offset * stride
        stride *= size
    return flat


def sharded_dims(t: Tensor) -> Set[int]:
    """The dims of t that some mesh dim shards (empty for a plain tensor)."""
    if not is_dtensor(t):
        return set()
    return {p.dim % max(t.dim(), 1) for p in t.placements if _shards(p)}


def slot_zeros(param: Tensor, slot_shape: Sequence[int], reduced: Iterable[int], make) -> Tensor:
    """Zeros of ``slot_shape`` (param's dims, the ``reduced`` ones of size 1, or ()
    for one slot) for a DTensor param: a DTensor on the param's mesh, sharded like
    the param on its kept dims and replicated over the mesh dims that shard a
    reduced dim (every rank then holds, and updates alike, the slots its shard
    shares); the local tensor has the local param's sizes on the kept dims (none on
    an empty shard, also of a kept dim of size 1) and 1 on the reduced ones
    (``make(like, shape)`` allocates it)."""
    shard = local(param)
    ndim = max(param.dim(), 1)
    reduced = {d % ndim for d in reduced} if slot_shape else set(range(param.dim()))
    local_shape = [1 if d in reduced else shard.size(d) for d in range(len(slot_shape))]
    zeros = make(shard, local_shape)
    stride = torch.empty(tuple(slot_shape), device="meta").stride()
    return DTensor.from_local(zeros, param.device_mesh, slot_placements(param, slot_shape, reduced),
                              run_check=False, shape=torch.Size(slot_shape), stride=stride)


def slot_placements(param: Tensor, slot_shape: Sequence[int], reduced: Iterable[int]) -> list:
    """The placements of a DTensor param's slots (slot_zeros): the param's, with
    Replicate() for each mesh dim that shards a reduced dim."""
    ndim = max(param.dim(), 1)
    reduced = {d % ndim for d in reduced} if slot_shape else set(range(param.dim()))
    return [Replicate() if _shards(p) and p.dim % ndim in reduced else p for p in param.placements]


def shard_groups(t: Tensor, dims: Optional[Iterable[int]] = None) -> Tuple:
    """The process groups of the mesh dims that shard t (only those sharding one of
    ``dims`` when given): summing a partial sum over them gives the sum over the
    whole tensor (over those dims).  Empty for a plain or replicated tensor."""
    if not is_dtensor(t):
        return ()
    wanted = None if dims is None else {d % max(t.dim(), 1) for d in dims}
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(t.placements)
                 if _shards(p) and (wanted is None or p.dim % max(t.dim(), 1) in wanted))


def mesh_groups(t: Tensor) -> Tuple:
    """The process groups of every dim of t's mesh (empty for a plain tensor)."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i in range(mesh.ndim))


def wait_for_every_shard(groups: Sequence[Tuple[object, torch.device]], found_inf: Optional[Tensor] = None,
                         name: str = "amos_fused", summed: Sequence[Tuple[str, Tuple, bool]] = (),
                         refused: bool = False) -> None:
    """One all-reduce over each of ``groups``, in order: returns once every rank of
    each group has reached it.  Every rank must pass the same groups in the same
    order, and every rank of a group the same params of ``summed`` on meshes with
    that group (what a DTensor's mesh holds on each of its ranks).

    With GradScaler's ``found_inf``, the ranks also learn whether any of them skips
    the step and whether any steps (a maximum over each group in turn: over every
    dim of the params' mesh, the same answer on every rank): when some skip and
    others do not (a GradScaler whose found_inf is not reduced over the ranks, or
    set on some ranks only), every rank raises here, before any writes, where the
    steps summing over the shards would wait on each other forever or the replicas
    would part.

    ``summed``: (name, mesh groups, whether this rank takes its sum) of every param
    whose step sums over its shards, with a grad on this rank or not.  Each group
    compares which of its params the ranks take; a param taken on some ranks only
    (a grad on some ranks only) makes every rank raise here too, where the sums
    would wait forever or add up unlike buffers (the finding travels on with the
    skip flags to the later groups, then once more over all but the last group:
    over a whole mesh and its submeshes, every rank learns it).

    ``refused``: this rank's checks raised (its caller raises that error once this
    returns); the other ranks raise a RuntimeError here, with nothing written,
    instead of waiting for this rank until the process group's timeout."""
    carried = None  # (whether this rank skips, negated, whether a rank found takes that differ, any refused)
    skipping = False
    differing: List[str] = []
    for group, device in groups:
        if carried is None:
            skipped = torch.zeros((), dtype=torch.float64, device=device) if found_inf is None else \
                (found_inf.detach().to(device=device, dtype=torch.float64).reshape(()) != 0).double()
            skipping = found_inf is not None and bool(skipped)
            carried = torch.stack([skipped, -skipped, torch.zeros_like(skipped), torch.full_like(skipped, refused)])
        mine = [(where, takes) for where, mesh, takes in summed if any(g is group for g in mesh)]
        takes = torch.tensor([float(t) for _, t in mine], dtype=torch.float64, device=device)
        # maxima over the group: (any skips, −(all skip), any differed, any refused, any takes each,
        # −(all take each))
        flags = torch.cat([carried.to(device), takes, -takes])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        values = flags.tolist()
        anyone, everyone = values[4:4 + len(mine)], [-x for x in values[4 + len(mine):]]
        differing += [where for (where, _), a, e in zip(mine, anyone, everyone) if a != e and where not in differing]
        carried = flags[:4].clone()
        if differing:
            carried[2] = 1.0
    if carried is None:
        return
    # a difference found in a group after the first reached the ranks of the groups after it
    # only: one more maximum over the groups before the last one tells every rank of the mesh
    for group, device in list(groups)[:-1]:
        carried = carried.to(device)
        dist.all_reduce(carried, op=dist.ReduceOp.MAX, group=group)
    any_skips, not_all_skip, any_differed, any_refused = carried.tolist()
    if any_refused == 1.0:
        if refused:
            return
        raise RuntimeError(
            f"{name}: the step raised on another rank that holds these params (that rank's error names the "
            "cause), and their step sums over the shards: no rank wrote anything")
    all_skip = not_all_skip == -1.0  # (this rank too when its found_inf is None: it steps where others skip)
    if any_differed == 1.0 and not all_skip:
        which = (f"{', '.join(differing)} {'has' if len(differing) == 1 else 'have'}" if differing
                 else "a param on other ranks has")
        raise ValueError(
            f"{name}: {which} a grad on some of the ranks that hold it and not on others, and its step sums "
            "over its shards: every rank must take that sum or none (give the param zero grads on the ranks "
            "that did not use it)")
    if any_skips == 1.0 and not all_skip:
        raise ValueError(
            f"{name}: GradScaler's found_inf skips the step on some of the ranks that hold these params "
            f"and not on others (on this rank it {'does' if skipping else 'does not'}), and their step sums "
            "over the shards: every rank must skip or step together (reduce found_inf over the ranks "
            "first, as torch's ShardedGradScaler does)")


def sum_over_shards(parts: Sequence[Tensor], groups: Sequence[Tuple]) -> List[Tensor]:
    """``parts[i]``: local partial sums, to be summed over the process groups
    ``groups[i]`` (empty: nothing to sum).  Returns the sums, with one all-reduce
    per distinct set of groups (one for a bucket of one FSDP2 mesh) over the parts
    concatenated."""
    out = list(parts)
    by_groups: Dict[Tuple, List[int]] = {}
    for i, g in enumerate(groups):
        if g:
            by_groups.setdefault(g, []).append(i)
    for group_set, members in by_groups.items():
        flat = torch.cat([parts[i].reshape(-1) for i in members])
        for group in group_set:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, piece in zip(members, flat.split([parts[i].numel() for i in members])):
            out[i] = piece.view(parts[i].shape)
    return out
