"""Block-scaled FP8 optimizer states, the format of the 8-bit optimizers
(``AdamW8bit``, ``Adam8bit``, ``RAdam8bit``, ``Lion8bit``, ``Amos8bit``): the Python copy of
csrc/fp8_states.h, written with torch's own ``float8_e4m3fn`` conversion so that
it checks the kernels' bit-level encoder independently.

A state of n elements is cut into blocks of 256 consecutive elements in the
param's memory order (the last one partial).  Each block keeps one float32
``absmax`` and one uint8 code per element: the E4M3 float (torch.float8_e4m3fn's
bits) of the value scaled so the block's absmax maps to 448, rounded to nearest
even::

    code = e4m3(clamp(x · (448/absmax), −448, 448)),   x = e4m3_value(code) · (absmax/448)

``exp_avg`` stores m; ``exp_avg_sq`` stores sqrt(v) (its absmax is max sqrt(v)),
so one block spans 2^34 in v.  The same scheme as torchao's ``AdamWFp8``
(block-wise absmax scaling to E4M3), with the square root for v; bitsandbytes'
8-bit optimizers (Dettmers et al., arXiv:2110.02861) use block-wise absmax with a
dynamic code map instead.  A block whose absmax is below 2^-96 is stored as
zeros; a block holding NaN or ±Inf stores absmax = NaN and codes 0, so it
decodes as NaN (a non-finite value never turns finite, and never leaves its
block).  An absmax no encode stores (negative or +Inf: a corrupted state)
decodes as NaN too, and a checkpoint holding one is refused on load.  Params
with fewer than 4096 elements, float64 and complex params keep full-precision
states.

Sharded params (DTensor: FSDP2's ``fully_shard``, tensor parallelism) keep FP8
states when no block can straddle a shard: params sharded on dim 0 only, whose
dim-0 rows hold whole blocks (numel/size(0) a multiple of 256) and whose local
shard is contiguous, and params that are not sharded at all.  Their codes are
DTensors placed like the param; the absmax of a dim-0-sharded param is a
DTensor of shape (size(0), numel/size(0)/256), one row of block maxima per row
of the param, sharded like it, so ``torch.distributed.checkpoint`` reshards it
with the codes.  Every block is then the block of the unsharded param, and the
codes and absmax are the unsharded run's whatever the number of shards.  Other
sharded params (1-D, rows that are not whole blocks, sharded on another dim)
keep full-precision states.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .buckets import memory_order
from .sharding import DTensor, is_dtensor, local, placed_as, sharded_dims

BLOCK = 256
MIN_NUMEL = 4096
FP8_MAX = 448.0
TINY = 2.0**-96
# The states stored as sqrt (the second moments).
ROOT_KEYS = frozenset({"exp_avg_sq"})
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


ABSMAX_SUFFIX = "_absmax"


def absmax_key(key: str) -> str:
    """The state key of a coded state's per-block absmax: ``exp_avg`` → ``exp_avg_absmax``."""
    return key + ABSMAX_SUFFIX


def unpaired(state: Dict[str, object], code_keys: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(the key present, the key missing) of the first coded state in ``state`` whose
    codes are there without their absmax or the reverse (neither can be read alone),
    or None."""
    for key in code_keys:
        if (key in state) != (absmax_key(key) in state):
            return (key, absmax_key(key)) if key in state else (absmax_key(key), key)
    return None


def keeps_fp8(p: Tensor) -> bool:
    """Whether a param's states are kept in FP8 (float32/bfloat16/float16 params of
    at least 4096 elements, bitsandbytes' ``min_8bit_size``, whose blocks stay
    inside their shards when the param is a DTensor: ``blocks_fit_shards``)."""
    return p.dtype in _DTYPES and p.numel() >= MIN_NUMEL and (not is_dtensor(p) or blocks_fit_shards(p))


def blocks_fit_shards(p: Tensor) -> bool:
    """True for a plain tensor, a DTensor no mesh dim shards, and a DTensor sharded
    on dim 0 only whose dim-0 rows hold whole blocks and whose local shard is
    contiguous (its blocks are then rows' blocks, the unsharded param's)."""
    dims = sharded_dims(p)
    if not dims:
        return True
    return (dims == {0} and p.dim() >= 2 and p.size(0) > 0 and (p.numel() // p.size(0)) % BLOCK == 0
            and local(p).is_contiguous())


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _flat(t: Tensor, layout: Tensor) -> Tensor:
    """t's elements in ``layout``'s memory order (a view when t is laid out like it)."""
    return t.permute(memory_order(layout)).reshape(-1)


def _write_flat(t: Tensor, layout: Tensor, values: Tensor) -> None:
    """Writes the 1-D ``values`` into t's elements in ``layout``'s memory order
    (the inverse of _flat; through a permuted view, so whatever t's strides: a
    non-dense t included, where _flat is a copy)."""
    view = t.permute(memory_order(layout))
    view.copy_(values.view(view.shape))


def block_dims(t: Tensor) -> Tuple[int, ...]:
    """The dims of size > 1 of t in its memory order: two tensors of one shape cut
    their elements into the same blocks exactly when these are equal (size-1 dims,
    whatever their strides, do not change the order)."""
    return tuple(d for d in memory_order(t) if t.size(d) > 1)


def loaded_codes(codes: Tensor, param: Tensor) -> Tensor:
    """A copy on param's device of loaded codes shaped like param, with the blocks
    they were saved with: dense, in the saved codes' memory order (convert_loaded
    then relays them into the param's layout, their absmax at hand).  DTensor
    codes are copied into the param's layout element by element (relaying the
    blocks of sharded states is not supported)."""
    if is_dtensor(codes) or is_dtensor(param):
        return torch.empty_like(param, dtype=codes.dtype).copy_(codes)
    order = memory_order(codes)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    dense = codes.permute(order).to(device=param.device, memory_format=torch.contiguous_format, copy=True)
    return dense.permute(inverse)


def loaded_absmax(absmax: Tensor, param: Tensor) -> Tensor:
    """A copy of a DTensor param's loaded absmax placed like the param, as its codes
    are (loaded_codes): a DTensor absmax saved under other placements moved there,
    a gathered plain one (rows, blocks per row) cut there."""
    if is_dtensor(absmax):
        if absmax.device_mesh == param.device_mesh and tuple(absmax.placements) != tuple(param.placements):
            return absmax.redistribute(param.device_mesh, param.placements)
        return absmax.detach().clone()
    copy = absmax.to(device=local(param).device, copy=True).contiguous()
    gathered = absmax.dim() == 2 and param.dim() >= 2 and absmax.size(0) == param.size(0)
    return placed_as(copy, param) if gathered else copy


def encode(values: Tensor, root: bool) -> Tuple[Tensor, Tensor]:
    """(codes, absmax) of a 1-D float32 tensor: uint8 codes, one float32 absmax per
    block; ``root``: sqrt(values) is stored."""
    if root:
        # correctly rounded, like C++'s sqrtf: torch's float32 sqrt is not on every
        # build (MKL's vector sqrt on the CPU is one ulp off for ~15% of inputs); the
        # float64 root rounded to float32 is (53 ≥ 2·24 + 2 bits: no double rounding)
        values = values.double().sqrt().to(torch.float32)
    n = values.numel()
    blocks = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.float32, device=values.device)
    blocks[:n] = values
    blocks = blocks.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates
    absmax = torch.where(torch.isfinite(absmax), absmax, torch.full_like(absmax, float("nan")))
    absmax = torch.where(absmax < TINY, torch.zeros_like(absmax), absmax)
    coded = absmax > 0
    # 448/absmax as a true division (``448 / t`` multiplies by a reciprocal)
    factor = torch.where(coded, torch.full_like(absmax, FP8_MAX).div(absmax), torch.zeros_like(absmax))
    scaled = (blocks * factor[:, None]).clamp(-FP8_MAX, FP8_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(coded[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n].clone(), absmax


def decode(codes: Tensor, absmax: Tensor, root: bool) -> Tensor:
    """The float32 values of 1-D codes and their blocks' absmax; ``root``: the codes
    store sqrt(v) and v is returned."""
    n, absmax = codes.numel(), absmax.reshape(-1)
    padded = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    values = padded.view(torch.float8_e4m3fn).float().view(-1, BLOCK)
    # absmax/448; NaN for an absmax no encode stores (negative, +Inf): the block decodes as NaN
    stored = (absmax >= 0) & (absmax <= torch.finfo(torch.float32).max)
    factor = torch.where(stored, absmax / FP8_MAX, torch.full_like(absmax, float("nan")))
    values = (values * factor[:, None]).reshape(-1)[:n]
    return values * values if root else values


def new_state(p: Tensor) -> Tuple[Tensor, Tensor]:
    """Zero (codes, absmax) of a param: codes with the param's shape and strides,
    as the step's check (csrc/checks.h: find_fp8_problem) asks, a non-dense
    param's (a strided view, stepped by the reference) included (for a DTensor:
    DTensors placed like it, the absmax shaped as the module docstring says)."""
    shard = local(p)
    codes = torch.zeros_like(shard, dtype=torch.uint8, memory_format=torch.preserve_format)
    if not is_dtensor(p) and codes.stride() != shard.stride():  # a non-dense param: zeros_like is dense
        codes = torch.empty_strided(shard.size(), shard.stride(), dtype=torch.uint8, device=shard.device).zero_()
    if not is_dtensor(p):
        return codes, torch.zeros(num_blocks(p.numel()), dtype=torch.float32, device=p.device)
    if sharded_dims(p):  # one row of block maxima per row of the param
        per_row = p.numel() // p.size(0) // BLOCK
        shape, local_shape = (p.size(0), per_row), (shard.size(0), per_row)
    else:
        shape = local_shape = (num_blocks(p.numel()),)
    absmax = torch.zeros(local_shape, dtype=torch.float32, device=shard.device)
    return _like(codes, p, p.shape, p.stride()), _like(absmax, p, shape, torch.empty(shape, device="meta").stride())


def _like(shard: Tensor, p: Tensor, shape, stride) -> Tensor:
    """The DTensor of local tensor ``shard`` on p's mesh with p's placements."""
    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(stride))


def decoded(codes: Tensor, absmax: Tensor, root: bool) -> Tensor:
    """A coded state as a float32 tensor with the codes' shape and layout (dense
    codes; torch.empty_like's dense layout for non-dense ones), its blocks read
    in the codes' own memory order (a DTensor placed like the codes when they
    are one)."""
    if is_dtensor(codes):
        return _like(decoded(local(codes), local(absmax), root), codes, codes.shape, codes.stride())
    out = torch.empty_like(codes, dtype=torch.float32)
    _write_flat(out, codes, decode(_flat(codes, codes), absmax, root))
    return out


def store(value: Tensor, codes: Tensor, absmax: Tensor, root: bool) -> None:
    """Encodes ``value`` (shaped like the codes; a DTensor placed like them when they
    are one) into ``codes`` and ``absmax`` in place."""
    if is_dtensor(codes):
        if not is_dtensor(value) or value.placements != codes.placements or value.shape != codes.shape:
            where = (f"a DTensor placed {value.placements}" if is_dtensor(value) else "a plain tensor")
            raise ValueError(f"amos_fused: cannot encode {where} of shape {tuple(value.shape)} into the FP8 "
                             f"state of a param of shape {tuple(codes.shape)} placed {codes.placements}")
        store(local(value), local(codes), local(absmax), root)
        return
    new_codes, new_absmax = encode(_flat(value, codes).float(), root)
    _write_flat(codes, codes, new_codes)
    absmax.view(-1).copy_(new_absmax)


def quantized(value: Tensor, like: Tensor, root: bool) -> Tuple[Tensor, Tensor]:
    """(codes, absmax) of a full-precision state, in a new state laid out (and, for a
    DTensor, placed) like ``like`` (new_state)."""
    codes, absmax = new_state(like)
    store(value.to(torch.float32), codes, absmax, root)
    return codes, absmax


def relaid(codes: Tensor, absmax: Tensor, like: Tensor, root: bool) -> Tuple[Tensor, Tensor]:
    """A coded state (loaded, or of a param given another memory format since its
    last step) in the layout of ``like``'s new state (new_state(like):
    like's strides): the codes copied as they are when both layouts cut the same
    blocks (block_dims), else decoded in their own memory order and encoded in
    like's, as a full-precision state is quantized on load.  Returned as they are
    when they already fit, or when the absmax does not match the codes (the
    step's check then names the key)."""
    if codes.stride() == like.stride() or absmax.numel() != num_blocks(codes.numel()):
        return codes, absmax
    new_codes, new_absmax = new_state(like)
    if block_dims(codes) == block_dims(new_codes):
        return new_codes.copy_(codes), absmax
    store(decoded(codes, absmax, root), new_codes, new_absmax, root)
    return new_codes, new_absmax


def relaid_into(state: Dict[str, object], like: Tensor) -> Dict[str, Tensor]:
    """The coded states of ``state`` (codes with their absmax) whose layout is not
    ``like``'s, relaid into it (``relaid``, after ``nan_codes_poison_their_blocks``
    as on load): the step's target changed layout (a float32 master made for, or
    dropped from, a non-dense param).  Empty when every code already fits."""
    out: Dict[str, Tensor] = {}
    for key, codes in state.items():
        absmax = state.get(absmax_key(key))
        if (isinstance(codes, Tensor) and codes.dtype == torch.uint8 and isinstance(absmax, Tensor)
                and not is_dtensor(codes) and codes.shape == like.shape and codes.stride() != like.stride()):
            out[key], out[absmax_key(key)] = relaid(*nan_codes_poison_their_blocks(codes, absmax), like,
                                                    key in ROOT_KEYS)
    return out


def switched_precision(param: Tensor, state: Dict[str, object], fp8_keys: Sequence[str], keeps: bool,
                       dtype: torch.dtype) -> Dict[str, Optional[Tensor]]:
    """The state changes (None: a key to remove) that bring a DTensor param's states
    under ``fp8_keys``, moved over from a param placed otherwise (as a reshard
    leaves them), to the precision the param keeps under its own placements
    (``keeps``: keeps_fp8): codes decoded in their own placement (each shard's
    blocks are whole rows' blocks) and the values redistributed like the param,
    in ``dtype``, where it keeps full-precision states (a ``Shard(1)`` param);
    full-precision values redistributed like the param and quantized where it
    keeps FP8 ones.  Empty when every such state is placed like the param; states
    on another mesh, or codes whose absmax is placed otherwise than they are, are
    left for the step's checks to name."""
    changes: Dict[str, Optional[Tensor]] = {}
    for key in fp8_keys:
        value, absmax = state.get(key), state.get(absmax_key(key))
        if (not is_dtensor(value) or value.device_mesh != param.device_mesh
                or tuple(value.placements) == tuple(param.placements)):
            continue
        root = key in ROOT_KEYS
        coded = value.dtype == torch.uint8 and isinstance(absmax, Tensor)
        if coded and not keeps and is_dtensor(absmax) and tuple(absmax.placements) == tuple(value.placements):
            values = decoded(value, absmax, root).redistribute(param.device_mesh, param.placements)
            changes[key], changes[absmax_key(key)] = values.to(dtype), None
        elif not coded and keeps and value.is_floating_point() and value.shape == param.shape:
            changes[key], changes[absmax_key(key)] = quantized(
                value.redistribute(param.device_mesh, param.placements), param, root)
    return changes


def nan_codes_poison_their_blocks(codes: Tensor, absmax: Tensor) -> Tuple[Tensor, Tensor]:
    """Loaded codes holding E4M3's NaN (0x7f or 0xff: the encoder never writes it; an
    edited checkpoint's, or another tool's) as the format stores a block holding NaN:
    absmax NaN and codes 0, so that every backend reads the whole block as NaN, as it
    would after a step (new tensors; the loaded ones are left as they are).  The
    blocks are those the codes were saved with (their own memory order), so this
    comes before any relaying into another layout.  Codes whose absmax does not fit
    them are returned as they are: the step names them; sharded (DTensor) codes too."""
    if (codes.numel() == 0 or absmax.numel() != num_blocks(codes.numel()) or absmax.device != codes.device
            or is_dtensor(codes) or is_dtensor(absmax)):
        return codes, absmax
    flat = _flat(codes, codes)
    nan = (flat & 0x7F) == 0x7F
    if not bool(nan.any()):
        return codes, absmax
    poisoned = torch.zeros(absmax.numel(), dtype=torch.bool, device=codes.device)
    poisoned[nan.nonzero().flatten() // BLOCK] = True
    absmax = absmax.clone()
    absmax.view(-1)[poisoned] = float("nan")
    codes = torch.empty_like(codes)
    _write_flat(codes, codes, flat.masked_fill(poisoned.repeat_interleave(BLOCK)[:flat.numel()], 0))
    return codes, absmax


def _check_loaded_absmax(param: Tensor, key: str, codes: Tensor, absmax, decoding: bool) -> None:
    """Raises when a checkpoint's absmax cannot go with its codes: not a tensor, a
    value no encode stores (negative or +Inf), or, for codes decoded on load, not
    one float32 value per block of 256 of them (the codes kept as FP8 are checked
    at the step, by name)."""
    name = absmax_key(key)
    if not isinstance(absmax, Tensor):
        raise ValueError(f"cannot load state {name!r} of a param of shape {tuple(param.shape)}: it must be a "
                         f"float32 tensor of one value per block of {BLOCK} codes, got {type(absmax).__name__} "
                         f"{absmax!r:.40}")
    values = local(absmax)
    if values.is_floating_point() and values.device.type != "meta":
        bad = ((values < 0) | (values == float("inf"))).reshape(-1).nonzero()
        if bad.numel():
            first = int(bad[0])
            raise ValueError(f"cannot load state {name!r} of a param of shape {tuple(param.shape)}: block {first}'s "
                             f"absmax is {float(values.reshape(-1)[first])!r}, which no encode stores (an absmax "
                             "is ≥ 0, or NaN for a block that held NaN or ±Inf)")
    if decoding and not (is_dtensor(codes) or is_dtensor(absmax)) and (
            absmax.numel() != num_blocks(codes.numel()) or not absmax.is_floating_point()
            or absmax.layout != torch.strided):
        raise ValueError(f"cannot load state {name!r} of a param of shape {tuple(param.shape)}: expected "
                         f"{num_blocks(codes.numel())} float32 values (one per block of {BLOCK} of its "
                         f"{codes.numel()} codes), got {absmax.dtype} of shape {tuple(absmax.shape)}")


def check_saved_codes(name: str, index, saved: Dict[str, object]) -> None:
    """Raises, naming the saved dtype, when a checkpoint's state beside an absmax
    (``<key>_absmax``, the scales of FP8 codes) is a tensor that is not uint8 codes:
    numbers (a trip through torch.optim's load_state_dict, which casts every state to
    its param's dtype) or the codes' bytes under another dtype (int8, float8_e4m3fn)."""
    for key, value in saved.items():
        if (not isinstance(key, str) or key.endswith(ABSMAX_SUFFIX) or absmax_key(key) not in saved
                or not isinstance(value, Tensor) or value.dtype == torch.uint8):
            continue
        if value.is_floating_point() and value.dtype != torch.float8_e4m3fn:
            why = ("codes turned into numbers (torch.optim's load_state_dict casts every state to its param's "
                   "dtype); load the 8-bit checkpoint as it was saved")
        else:
            why = "codes viewed as another dtype are read back with `.view(torch.uint8)`"
        raise ValueError(f"{name}: cannot load the checkpoint's state[{index!r}][{key!r}]: it is {value.dtype} "
                         f"beside {absmax_key(key)!r}, the scales of FP8 codes, which must be uint8: {why}")


def convert_loaded(param: Tensor, state: Dict[str, object], fp8_keys: Sequence[str],
                   like: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Brings a loaded state to this optimizer's precision and layout in place:
    the full-precision states under ``fp8_keys`` are quantized (a checkpoint of
    torch.optim.AdamW loaded into AdamW8bit), coded states under ``fp8_keys`` saved
    from a param of another memory layout are relaid (``relaid``: their blocks
    follow the saved layout), and coded states under any other key are decoded
    (an 8-bit checkpoint loaded into a full-precision optimizer, or a param that
    no longer keeps FP8 states) into ``dtype`` (default the param's: float32 for
    a param with a float32 master) in torch.empty_like(param)'s layout.  ``like``
    (default the param) is the tensor the step writes, whose strides the codes
    take: the param, or its float32 master (master_weights.stepped_like).  The
    absmax of a sharded param, gathered (a full state dict of an FSDP2 run), is
    flattened for a plain param; for a DTensor param that keeps full-precision
    states, the whole is decoded and placed like the param.  A state beside an
    absmax that is not uint8 (codes a trip through torch.optim turned into
    numbers) is refused."""
    like = param if like is None else like
    dtype = param.dtype if dtype is None else dtype
    for key in list(state):
        value = state.get(key)  # an absmax is popped with its codes
        if not isinstance(value, Tensor) or key.endswith("_absmax"):
            continue
        root = key in ROOT_KEYS
        coded = value.dtype == torch.uint8 and absmax_key(key) in state
        if absmax_key(key) in state and not coded:
            raise ValueError(f"cannot load state {key!r} of a param of shape {tuple(param.shape)}: it is "
                             f"{value.dtype} beside {absmax_key(key)!r}, the scales of FP8 codes, which are "
                             "uint8: codes turned into numbers (torch.optim's load_state_dict casts every state "
                             "to its param's dtype); load the 8-bit checkpoint as it was saved")
        if coded:
            _check_loaded_absmax(param, key, value, state[absmax_key(key)], decoding=key not in fp8_keys)
        if key in fp8_keys and not coded and value.is_floating_point() and value.shape == param.shape:
            # (a state of another shape is kept: the step refuses it by name)
            state[key], state[absmax_key(key)] = quantized(value.to(param.device), like, root)
        elif key in fp8_keys and coded and not is_dtensor(param):
            absmax = state[absmax_key(key)]
            if absmax.dim() != 1 and absmax.numel() == num_blocks(param.numel()) and not is_dtensor(absmax):
                absmax = absmax.reshape(-1)  # a sharded run's (rows, blocks per row), gathered
            if not is_dtensor(value) and not is_dtensor(absmax) and value.shape == param.shape:
                value, absmax = relaid(*nan_codes_poison_their_blocks(value, absmax), like, root)
            state[key], state[absmax_key(key)] = value, absmax
        elif key not in fp8_keys and coded:
            absmax = state.pop(absmax_key(key))
            # a DTensor param that keeps full-precision states: its blocks may straddle its shards
            # (Shard(1)), so the whole state is decoded, then placed like the param
            whole = is_dtensor(param) and (is_dtensor(value) or is_dtensor(absmax))
            if whole:
                value = value.full_tensor() if is_dtensor(value) else value
                absmax = absmax.full_tensor() if is_dtensor(absmax) else absmax
            value, absmax = nan_codes_poison_their_blocks(value, absmax.to(value.device))
            values = decoded(value, absmax, root)
            if whole:
                values = placed_as(values, param)
            if is_dtensor(values) or values.shape != param.shape:
                state[key] = values.to(dtype)
            else:
                state[key] = torch.empty_like(param, dtype=dtype).copy_(values)
