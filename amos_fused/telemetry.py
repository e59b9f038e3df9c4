"""Weight and update RMS of every param, measured by the step itself.

With ``track_rms=True`` (a group flag of every optimizer) each step also sums, per
param, Σθ² of the param after the step and Σ(Δθ)² of the step's update, both of
the values as stored.  The fused kernels take the sums while the data is in
registers (no extra pass over memory), cutting each tensor into fixed blocks from
its own start and adding the blocks in order, so they are bitwise the same for any
thread count; the reference backend computes them in float64 from a copy of the
params taken before the step.  ``optimizer.rms()`` turns them into

- weight RMS = sqrt(Σθ²/n), and
- update RMS = sqrt(Σ(Δθ)²/n) / lr, the update per unit of learning rate,

to set beside the equilibrium predictions of Su Jianlin's 《AdamW的Weight RMS的渐近估计(上)》
("Asymptotic estimation of AdamW's weight RMS, part 1", kexue.fm) in ``amos_fused.theory``: for AdamW the update RMS tends to
sqrt((1−β1)/(1+β1)) under noise-dominated gradients and the weight RMS to
sqrt(η/(2λ)).  n counts real numbers (a complex param counts two per element);
a DTensor param's sums are all-reduced over the mesh dims that shard it (so
``rms()`` is then a collective: call it on every rank)."""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .deterministic_sums import local_sum_of_squares
from .sharding import local, shard_groups, sum_over_shards


class RMS(NamedTuple):
    """One param's RMS at its latest step."""

    weight: float  # sqrt(Σθ²/n) after the step; nan when GradScaler skipped it
    update: float  # sqrt(Σ(Δθ)²/n) / lr; 0 when skipped, nan when lr is 0


def new_table(count: int, device: torch.device) -> Tensor:
    """The [count, 2] float64 table a step writes (Σθ², Σ(Δθ)²) into: nan until
    written (a skipped step leaves Σθ² unmeasured and writes Σ(Δθ)² = 0)."""
    return torch.full((count, 2), math.nan, dtype=torch.float64, device=device)


def snapshot(params: Sequence[Tensor]) -> List[Tensor]:
    """Copies of the params before a step that computes its telemetry in Python."""
    return [p.detach().clone() for p in params]


def measured_sums(params: Sequence[Tensor], before: Optional[Sequence[Tensor]], table: Tensor) -> None:
    """Fills ``table`` in float64 from the params after a step and their copies
    ``before`` it (None: the step was skipped), each sum taken in a fixed order
    (deterministic_sums: the same bits at any thread count)."""
    if before is None:
        table[:, 1] = 0.0
        return
    for row, (p, b) in enumerate(zip(params, before)):
        after = p.detach().double()
        table[row, 0] = local_sum_of_squares(after)
        table[row, 1] = local_sum_of_squares(after - b.double())


class _Record(NamedTuple):
    table: Tensor     # [count, 2] of the bucket the param was stepped in
    row: int
    count: int        # elements of what the step saw (a local shard, a real view; not the tensor, which a
    lr: float         # record would keep alive after its param's state is gone)


class Recorder:
    """The latest telemetry of every tracked param of an optimizer.  A step only
    files where its sums are; what they are sums over is worked out by ``rms()``."""

    def __init__(self):
        self._records: Dict[Tensor, _Record] = {}

    def record(self, owners: Sequence[Tensor], params: Sequence[Tensor], table: Tensor, lr: float) -> None:
        """``owners``: the params as the user holds them; ``params``: what was
        stepped (local shards, real views), row by row of ``table``."""
        for row, (owner, stepped) in enumerate(zip(owners, params)):
            self._records[owner] = _Record(table, row, stepped.numel(), lr)

    def keep(self, ids) -> None:
        """Drops the records of params whose id is not in ``ids``."""
        self._records = {owner: record for owner, record in self._records.items() if id(owner) in ids}

    def forget(self, owners: Sequence[Tensor]) -> None:
        """Drops the records of params stepped without telemetry (their group's
        track_rms was switched off): what they hold is no longer their latest step."""
        for owner in owners:
            self._records.pop(owner, None)

    def rms(self, current: Sequence[Tensor]) -> Dict[Tensor, RMS]:
        """The RMS of the params of ``current`` (the optimizer's params now) that have
        a record; records of params no longer in the optimizer are dropped."""
        self.keep({id(p) for p in current})
        # in the optimizer's param order, the same on every rank, and every sharded param whether
        # this rank has its record or not (a rank that did not step it adds NaN: not known), so
        # that the ranks' all-reduces pair the same params
        records, groups, seen = [], [], set()
        for owner in current:
            record = self._records.get(owner)
            sharded = shard_groups(owner)
            if id(owner) not in seen and (record is not None or sharded):
                seen.add(id(owner))
                records.append((owner, record))
                groups.append(sharded)
        rows = [record.table[record.row] if record is not None else
                torch.full((2,), math.nan, dtype=torch.float64, device=local(owner).device)
                for owner, record in records]
        rows = sum_over_shards(rows, groups)
        values = torch.stack(rows).cpu().tolist() if rows else []
        out: Dict[Tensor, RMS] = {}
        for (owner, record), sharded, (weight_sq, update_sq) in zip(records, groups, values):
            if record is None:
                continue
            # real numbers in the whole param (every shard; two per complex element)
            n = owner.numel() * (2 if owner.is_complex() else 1) if sharded else record.count
            n = max(n, 1)
            update = math.sqrt(update_sq / n)
            out[owner] = RMS(math.sqrt(weight_sq / n), update / record.lr if record.lr != 0 else math.nan)
        return out
