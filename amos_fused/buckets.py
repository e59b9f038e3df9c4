"""Buckets (one kernel call each): the params of one param group that share a
device and a dtype, with their grads and state tensors gathered into parallel
lists.  A ``GroupPlan`` caches how a group splits into buckets; it is checked
against ``group['params']`` at every step (identities) and rebuilt when they
differ.  The lists of a bucket are gathered anew at every step from the params'
``.grad`` and ``optimizer.state``: the plan is never the source of truth."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .checks import REAL_OF_COMPLEX
from .master_weights import has_master
from .sharding import is_dtensor


@dataclass
class BucketSpec:
    """Which params of a group (positions in ``group['params']``) form a bucket."""

    device: torch.device
    dtype: torch.dtype  # the dtype the kernels see (the real dtype of complex params)
    positions: List[int]
    complex_positions: frozenset = frozenset()
    dtensor_positions: frozenset = frozenset()
    fp8: bool = False  # its states are block-scaled FP8 (amos_fused/fp8_states.py)
    # The params' dtype when the kernels step their float32 masters (dtype is then
    # float32; amos_fused/master_weights.py), else None.
    master_of: Optional[torch.dtype] = None


@dataclass
class Bucket:
    """One bucket of one step: only params with a grad."""

    device: torch.device
    dtype: torch.dtype
    backend: str              # 'reference' or the fused backend that steps it
    owners: List[Tensor]      # the params as the user holds them
    positions: List[int]      # their positions in group['params']
    params: List[Tensor]      # what the kernels step (real views of complex params)
    grads: List[Tensor]
    # Parallel lists by state key ('step' too), as the kernels see them.
    state: Dict[str, List[Tensor]] = field(default_factory=dict)
    # Per-param hyper-parameters (e.g. Amos's eta), by group key, in bucket order.
    per_param: Dict[str, List[float]] = field(default_factory=dict)
    fp8: bool = False  # its states are block-scaled FP8 (amos_fused/fp8_states.py)
    # With master weights: the low-precision params (aligned with ``params``, the
    # masters), written from the masters after the step.  Else empty.
    shadows: List[Tensor] = field(default_factory=list)
    shadows_in_kernel: bool = False  # the step op writes them (its low_params), else a copy after
    # The grads as the params hold them (local shards), which the step only reads
    # (``grads`` may be copies of them): checked not to share memory with what it writes.
    held_grads: List[Tensor] = field(default_factory=list)
    sharded: bool = False  # some params are DTensors (the kernels step their local shards)

    def each(self):
        """(param, grad, state) per param, the state a dict of kernel views by key."""
        for i, (p, g) in enumerate(zip(self.params, self.grads)):
            yield p, g, {key: values[i] for key, values in self.state.items()}


def memory_order(t: Tensor) -> List[int]:
    """t's dims from the outermost in memory to the innermost (stable for ties):
    ``t.permute(memory_order(t))`` is contiguous when t is dense."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def kernel_dtype(p: Tensor) -> torch.dtype:
    return REAL_OF_COMPLEX.get(p.dtype, p.dtype)


@dataclass
class GroupPlan:
    """How one param group splits into buckets (first-seen order of (device, dtype,
    whether the states are FP8, whether float32 masters are stepped))."""

    params: List[Tensor]  # a copy of group['params'] when the plan was made
    specs: List[BucketSpec]
    master_weights: bool  # the group's master_weights when the plan was made
    # What a class works out for the group while the plan lasts, by name, with the
    # group value it came from (Amos: the params' slot shapes for its reduce_axes;
    # ("checked", key): the per-param values last checked).
    cache: Dict[object, object] = field(default_factory=dict)
    # The group's per-param values (by key) when the plan was made, in ``params`` order.
    group_values: Dict[str, object] = field(default_factory=dict)
    # The group (dict) the plan was made for: plans are kept by group index, and
    # groups may be reordered or removed between steps.
    group: Optional[dict] = None
    # The params' dtypes when the plan was made (filled by build).
    dtypes: List[torch.dtype] = field(default_factory=list)

    @classmethod
    def build(cls, params: Sequence[Tensor], keeps_fp8: Callable[[Tensor], bool] = lambda p: False,
              master_weights: bool = False) -> "GroupPlan":
        by_kind: Dict[tuple, BucketSpec] = {}
        for i, p in enumerate(params):
            master = has_master(p, master_weights)
            kind = (p.device, kernel_dtype(p), keeps_fp8(p), master)
            if kind not in by_kind:
                by_kind[kind] = BucketSpec(device=p.device, dtype=torch.float32 if master else kind[1], positions=[],
                                           fp8=kind[2], master_of=p.dtype if master else None)
            by_kind[kind].positions.append(i)
        for spec in by_kind.values():
            spec.complex_positions = frozenset(i for i in spec.positions if params[i].is_complex())
            spec.dtensor_positions = frozenset(i for i in spec.positions if is_dtensor(params[i]))
        return cls(list(params), list(by_kind.values()), bool(master_weights), dtypes=[p.dtype for p in params])

    @property
    def has_dtensors(self) -> bool:
        return any(spec.dtensor_positions for spec in self.specs)

    def matches(self, params: Sequence[Tensor], master_weights: bool = False) -> bool:
        """True while ``params`` holds the same tensors, in the same order, of the same
        dtypes (``p.data`` may be set to another dtype between steps), and the group's
        master_weights is unchanged."""
        mine = self.params
        return (bool(master_weights) == self.master_weights and len(params) == len(mine)
                and all(a is b and a.dtype == d for a, b, d in zip(params, mine, self.dtypes)))
