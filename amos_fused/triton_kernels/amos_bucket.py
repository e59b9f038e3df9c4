"""Cached metadata of an Amos bucket: the bucket tables of
common.py plus, per tensor, its slot layout (amos_layout.py) as one int64 row of
``info``:

    numel, kind, row_len, slot_base, num_slots, sizes[ndim], slot_strides[ndim]

(merged dims padded in front with size 1 / stride 0), and three program maps:
  * main  — ELEMENTWISE / phased tensors in blocks of ``block`` elements, ROWS one
            program per row: the launch that writes θ (and v, b of the first two);
  * sums  — phased tensors: (tensor, first element) pairs; a LONG_ROWS piece never
            crosses a row, so it adds one block sum to its slot;
  * slots — phased tensors' slots in blocks of ``block``.
Phased tensors share two scratch buffers indexed by slot_base + slot: the Σg²
accumulators (zeroed again by the slot launch after reading) and (w, a)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .amos_layout import GENERAL, LONG_ROWS, ROWS, SlotLayout, describe_slots
from .common import (GradAddresses, addresses_of, all_aligned, cached, compute_dtype,
                     int64_table, program_map)

INFO_FIXED = 5  # numel, kind, row_len, slot_base, num_slots


class AmosMeta:
    """Device tables and scratch buffers of one Amos bucket (see the module docstring)."""

    def __init__(self, streams: Sequence[Sequence[Tensor]], layouts: Sequence[SlotLayout],
                 block: int):
        params = streams[0]
        self.device = params[0].device
        self.n = len(params)
        addresses = addresses_of(streams)
        self.addresses = int64_table(addresses, self.device)
        self.aligned = all_aligned(addresses)
        self.grad_addresses = GradAddresses(self.device)
        numels = [p.numel() for p in params]
        phased = [layout.phased and numel > 0 for layout, numel in zip(layouts, numels)]
        self.ndim = max([len(l.sizes) for l, ph in zip(layouts, phased) if ph] + [1])
        self.kinds = {l.kind for l, numel in zip(layouts, numels) if numel > 0}
        # ROWS chunks may start on 16-byte boundaries (with an aligned bucket).
        self.rows_aligned = all(l.row_len % 8 == 0 for l in layouts if l.kind == ROWS)

        info: List[List[int]] = []
        main_programs, slot_programs = [], []
        sums_tensor: List[Tensor] = []
        sums_start: List[Tensor] = []
        slot_base = 0
        for t, (layout, numel, is_phased) in enumerate(zip(layouts, numels, phased)):
            pad = self.ndim - len(layout.sizes)
            info.append([numel, layout.kind, layout.row_len, slot_base, layout.num_slots]
                        + [1] * pad + list(layout.sizes) + [0] * pad + list(layout.slot_strides))
            if layout.kind == ROWS:
                main_programs.append(numel // layout.row_len)
            else:
                main_programs.append(-(-numel // block))
            slot_programs.append(-(-layout.num_slots // block) if is_phased else 0)
            if is_phased:
                starts = self._sum_starts(layout, numel, block)
                sums_tensor.append(torch.full_like(starts, t))
                sums_start.append(starts)
                slot_base += layout.num_slots
        self.info = int64_table(info, self.device)
        self.main_blocks = program_map(torch.tensor(main_programs)).to(self.device)
        self.num_main = len(self.main_blocks) // 2
        self.slot_blocks = program_map(torch.tensor(slot_programs)).to(self.device)
        self.num_slot_blocks = len(self.slot_blocks) // 2
        if sums_start:
            pairs = torch.stack([torch.cat(sums_tensor), torch.cat(sums_start)], 1).reshape(-1)
        else:
            pairs = torch.empty(0, dtype=torch.int64)
        self.sum_blocks = pairs.to(self.device)
        self.num_sum_blocks = len(pairs) // 2
        self.total_slots = slot_base
        scratch = dict(dtype=compute_dtype(params[0].dtype), device=self.device)
        self.slot_sums = torch.zeros(max(slot_base, 1), **scratch)
        self.slot_updates = torch.empty(2 * max(slot_base, 1), **scratch)  # (w, a) per slot

    @staticmethod
    def _sum_starts(layout: SlotLayout, numel: int, block: int) -> Tensor:
        if layout.kind == LONG_ROWS:  # pieces of ≤ block elements inside each row
            row = layout.row_len
            rows = torch.arange(numel // row) * row
            pieces = torch.arange(-(-row // block)) * block
            return (rows[:, None] + pieces[None, :]).reshape(-1)
        assert layout.kind == GENERAL
        return torch.arange(-(-numel // block)) * block


def amos_meta(op: str, params: Sequence[Tensor], vs: Sequence[Tensor], bs: Sequence[Tensor],
              mus: Optional[Sequence[Tensor]], block: int, max_row: int) -> AmosMeta:
    """The cached metadata of an Amos bucket; describing the layouts checks the
    slot shapes (ValueError) before anything is written."""
    streams = [params, vs, bs] + ([mus] if mus is not None else [])
    param_shapes = tuple(tuple(p.shape) for p in params)
    slot_shapes = tuple(tuple(v.shape) for v in vs)
    key = ("amos", params[0].dtype, params[0].device, block, max_row, addresses_of(streams),
           param_shapes, slot_shapes)

    def build() -> AmosMeta:
        layouts = [describe_slots(op, p, v, i, max_row)
                   for i, (p, v) in enumerate(zip(param_shapes, slot_shapes))]
        return AmosMeta(streams, layouts, block)

    return cached(key, build)

