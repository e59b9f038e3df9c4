"""Buckets (DESIGN §3): the tensors of one param group that share a device and a
dtype, with their state tensors gathered into parallel lists, so one kernel call
steps the whole bucket.  A group's buckets are built once (a ``GroupPlan``) and
reused every step while the group keeps the same params and all of them have
state; the per-step work is then one list of grads, sliced per bucket."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import Tensor


@dataclass
class Bucket:
    device: torch.device
    dtype: torch.dtype
    params: List[Tensor]
    # Parallel lists of state tensors, one entry per param, by state key ('step' too).
    state: Dict[str, List[Tensor]] = field(default_factory=dict)
    # Where this bucket's params sit in the plan's param order (to slice grads).
    start: int = 0
    stop: int = 0
    # Per-param hyper-parameter lists in bucket order, by group key (see
    # FusedOptimizer._per_param), with the group value they were read from.
    cache: Dict[str, tuple] = field(default_factory=dict)


def make_buckets(params: Sequence[Tensor], state: Dict[Tensor, dict], keys: Sequence[str]) -> List[Bucket]:
    """Groups params by (device, dtype) in first-seen order and gathers the state
    lists named by ``keys`` (a missing key gives no list).  Every param must
    already have its state."""
    by_kind: Dict[tuple, Bucket] = {}
    for p in params:
        kind = (p.device, p.dtype)
        if kind not in by_kind:
            by_kind[kind] = Bucket(device=p.device, dtype=p.dtype, params=[])
        by_kind[kind].params.append(p)
    buckets = list(by_kind.values())
    start = 0
    for bucket in buckets:
        bucket.start, bucket.stop = start, start + len(bucket.params)
        start = bucket.stop
        for key in keys:
            values = [state[p].get(key) for p in bucket.params]
            if all(v is not None for v in values):
                bucket.state[key] = values
    return buckets


@dataclass
class GroupPlan:
    """The cached buckets of one param group."""

    params_list: list  # the group's own 'params' list object (identity checked)
    length: int
    order: List[Tensor]  # params in bucket order: grads are gathered in this order
    buckets: List[Bucket]
    # The group's 'backend' value its buckets were last checked against.
    checked_backend: object = field(default=object())

    @classmethod
    def build(cls, group_params: list, state: Dict[Tensor, dict], keys: Sequence[str]) -> "GroupPlan":
        buckets = make_buckets(group_params, state, keys)
        order = [p for b in buckets for p in b.params]
        return cls(group_params, len(group_params), order, buckets)

    def matches(self, group_params: list) -> bool:
        return group_params is self.params_list and len(group_params) == self.length
