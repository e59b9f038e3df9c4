"""Sums of squares that are bitwise the same at any torch thread count.

torch's own ``sum`` / ``norm`` / ``mean`` of a large CPU tensor split it between
threads, so their rounding depends on ``torch.set_num_threads``.  Here the
squares are zero-padded to rows of _SUM_CHUNK elements and each row is summed by
one thread (rows are shorter than torch's parallel grain), then the row sums
likewise, until one row is left."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# Elements per row of the fixed-order sum: under torch's parallel grain
# (at::internal::GRAIN_SIZE, 32768), so no thread split ever happens inside a row.
_SUM_CHUNK = 8192
# Rows of _SUM_CHUNK elements squared in float64 at a time by local_sum_of_squares
# (8M elements, 64 MB): a large tensor's squares are never all held at once.
_ROWS_AT_ONCE = 1024


def _row_sums(rows: Tensor) -> Tensor:
    """The sums of a 2-D tensor's rows, in a fixed order: each row cut into pieces
    of _SUM_CHUNK summed one per thread, the pieces' sums likewise, until one is
    left per row."""
    while rows.size(1) > _SUM_CHUNK:
        rows = torch.nn.functional.pad(rows, (0, -rows.size(1) % _SUM_CHUNK))
        rows = rows.view(rows.size(0), -1, _SUM_CHUNK).sum(dim=2)
    return rows.sum(dim=1)


def local_sum_of_squares(t: Tensor) -> Tensor:
    """Σ|x|² over a plain tensor's entries (real and imaginary parts of a complex
    t), a float64 0-d tensor on t's device, in a fixed order."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1)
    if x.numel() <= _SUM_CHUNK:
        x = x.double()
        return _row_sums((x * x).view(1, -1))[0]
    # _row_sums' first round (each row of _SUM_CHUNK squares summed, the last row
    # zero-padded) a slice of rows at a time, then its later rounds on those sums
    step = _SUM_CHUNK * _ROWS_AT_ONCE
    firsts = []
    for start in range(0, x.numel(), step):
        piece = x[start:start + step].double()
        piece = torch.nn.functional.pad(piece * piece, (0, -piece.numel() % _SUM_CHUNK))
        firsts.append(piece.view(-1, _SUM_CHUNK).sum(dim=1))
    return _row_sums(torch.cat(firsts).view(1, -1))[0]


def norm(t: Tensor) -> float:
    """‖t‖₂ from local_sum_of_squares, in float64."""
    return math.sqrt(float(local_sum_of_squares(t)))


def fixed_order_sum(x: Tensor, dims: Sequence[int]) -> Tensor:
    """x's sum over ``dims`` (kept as size-1 dims) in float64, in a fixed order
    (_row_sums of each slot's elements; zeros where the slots are empty)."""
    dims = list(dims)
    kept = [d for d in range(x.dim()) if d not in dims]
    count = math.prod(x.size(d) for d in dims)
    shape = [1 if d in dims else x.size(d) for d in range(x.dim())]
    if count == 0:
        return torch.zeros(shape, dtype=torch.float64, device=x.device)
    rows = x.permute(kept + dims).reshape(-1, count).double()
    return _row_sums(rows).reshape(shape)


def fixed_order_mean(x: Tensor, dims: Sequence[int]) -> Tensor:
    """x's mean over ``dims`` (kept as size-1 dims), summed in float64 in a fixed
    order (fixed_order_sum), returned in x's dtype."""
    count = math.prod(x.size(d) for d in dims)
    return (fixed_order_sum(x, dims) / count).to(x.dtype)
