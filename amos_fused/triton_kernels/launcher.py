"""Launches the Triton kernels over one bucket: fetches the bucket's cached
metadata (common.py, amos_bucket.py), uploads the per-step coefficient table and
runs ONE launch per phase, whatever the number of tensors.

Inputs are checked by ops.py before anything here runs."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .amos_bucket import AmosMeta, amos_meta
from .amos_kernels import amos_kernel, amos_slots_kernel, amos_sums_kernel
from .amos_layout import ELEMENTWISE, ROWS
from .common import BLOCK, kernel_dtypes, launching, upload_coefficients

AMOS_NUM_WARPS = 8    # the Amos kernels hold more values per element (fewer registers per thread)
AMOS_MAX_ROW = 16384  # Amos rows longer than this are split over programs (LONG_ROWS)


def amos_bucket(op: str, params, vs, bs, mus: Optional[Sequence[Tensor]]) -> AmosMeta:
    """The bucket's Amos metadata (describing its slot layouts checks their shapes)."""
    return amos_meta(op, params, vs, bs, mus, BLOCK, AMOS_MAX_ROW)


def amos(meta: AmosMeta, params, grads, coef: Tensor, momentum: bool, clip: bool) -> None:
    if meta.num_main == 0:
        return
    grad_table, grads_aligned = meta.grad_addresses.get(grads)
    coef = upload_coefficients(coef, params)
    types = kernel_dtypes(params[0].dtype)
    with launching(meta):
        if meta.num_sum_blocks:
            amos_sums_kernel[(meta.num_sum_blocks,)](
                grad_table, meta.info, meta.sum_blocks, coef, meta.slot_sums, meta.n,
                DTYPE=types["DTYPE"], COMPUTE=types["COMPUTE"], CLIP=clip, NDIM=meta.ndim,
                BLOCK=BLOCK, num_warps=AMOS_NUM_WARPS)
            amos_slots_kernel[(meta.num_slot_blocks,)](
                meta.addresses, meta.info, meta.slot_blocks, coef, meta.slot_sums,
                meta.slot_updates, meta.n, **types, NDIM=meta.ndim, BLOCK=BLOCK,
                num_warps=AMOS_NUM_WARPS)
        amos_kernel[(meta.num_main,)](
            meta.addresses, grad_table, meta.info, meta.main_blocks, coef, meta.slot_updates,
            meta.n, **types, MOMENTUM=momentum, CLIP=clip,
            ALIGNED=meta.aligned and grads_aligned,
            ROWS_ALIGNED=meta.aligned and grads_aligned and meta.rows_aligned,
            HAS_ELEMENTWISE=ELEMENTWISE in meta.kinds,
            HAS_ROWS=ROWS in meta.kinds, HAS_PHASED=meta.num_sum_blocks > 0, NDIM=meta.ndim,
            BLOCK=BLOCK, num_warps=AMOS_NUM_WARPS)
