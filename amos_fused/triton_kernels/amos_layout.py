"""How an Amos tensor's elements map to its v / b slots, read off
the shapes of the param and of its slot tensor, as csrc/cpu/amos_ops.cpp does.

Four ways to walk a tensor:
  ELEMENTWISE — one slot per element (no reduced axis, or ≤ 1 element): one pass;
  ROWS        — the reduced axes are trailing and merge into rows of ≤ max_row
                contiguous elements: one program owns a row, sums its g², updates
                the slot and then the row (one pass over memory);
  LONG_ROWS   — the same layout with longer rows (e.g. 'all' over a big tensor):
                split over many programs, so reduced in phases like GENERAL;
  GENERAL     — any other reduced axes: phases (Σg² per slot, slot update,
                elementwise update), the slot of an element found from the
                merged sizes and slot strides."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

ELEMENTWISE, ROWS, LONG_ROWS, GENERAL = 0, 1, 2, 3


@dataclass(frozen=True)
class SlotLayout:
    kind: int
    num_slots: int
    row_len: int = 1                      # ROWS / LONG_ROWS: elements per slot
    sizes: Tuple[int, ...] = ()           # LONG_ROWS / GENERAL: merged dims (row-major)
    slot_strides: Tuple[int, ...] = ()    # slot stride of each merged dim (0 = reduced)

    @property
    def phased(self) -> bool:
        """True when its slots are reduced and updated in separate launches."""
        return self.kind in (LONG_ROWS, GENERAL)


def describe_slots(op: str, param_shape: Sequence[int], slot_shape: Sequence[int], index: int,
                   max_row: int) -> SlotLayout:
    """The layout of a param with slot tensor v: v is 0-dim (one slot) or has the
    param's dims, each of the param's size or 1 (reduced).  Raises ValueError."""
    param_shape, slot_shape = tuple(param_shape), tuple(slot_shape)
    numel = math.prod(param_shape)
    num_slots = math.prod(slot_shape)
    ndim = len(param_shape)
    bad = ValueError(f"{op}: vs[{index}] has shape {list(slot_shape)}, not a slot shape of its "
                     f"param {list(param_shape)}")
    if len(slot_shape) == 0:
        reduced = [True] * ndim
    else:
        if len(slot_shape) != ndim:
            raise bad
        reduced = []
        for p, v in zip(param_shape, slot_shape):
            if v != p and v != 1:
                raise bad
            reduced.append(v == 1 and p != 1)
    # Merge: drop size-1 dims, join neighbours that are both reduced or both kept.
    sizes, kinds = [], []
    for size, is_reduced in zip(param_shape, reduced):
        if size == 1:
            continue
        if kinds and kinds[-1] == is_reduced:
            sizes[-1] *= size
        else:
            sizes.append(size)
            kinds.append(is_reduced)
    if not any(kinds) or numel <= 1:
        return SlotLayout(ELEMENTWISE, num_slots)
    strides, stride = [0] * len(sizes), 1
    for d in reversed(range(len(sizes))):
        if not kinds[d]:
            strides[d] = stride
            stride *= sizes[d]
    if kinds[-1] and kinds.count(True) == 1:
        row_len = sizes[-1]
        if row_len <= max_row:
            return SlotLayout(ROWS, num_slots, row_len=row_len)
        return SlotLayout(LONG_ROWS, num_slots, row_len, tuple(sizes), tuple(strides))
    return SlotLayout(GENERAL, num_slots, 0, tuple(sizes), tuple(strides))
