"""What a step checks before anything is written, on the Python side: the
problem codes of the C++ ``check_step`` op (csrc/checks.h) turned into errors
that name the param, and the memory-overlap check of a set of params."""
from __future__ import annotations

import enum
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import _C  # (registers torch.ops.amos_fused; its own functions: csrc/host_checks_python.cpp)


class CountNotATensorError(ValueError, RuntimeError):
    """A step count that is no tensor (a Python number): a ValueError, as every
    refused state is, and the RuntimeError torch.optim's step raises for it."""


class Problem(enum.IntEnum):
    """amos_fused::Problem (csrc/checks.h)."""

    NONE = 0
    GRAD_SPARSE = 1
    GRAD_DTYPE = 2
    GRAD_DEVICE = 3
    GRAD_SHAPE = 4
    GRAD_LAYOUT = 5
    PARAM_DTYPE = 6
    PARAM_MIXED = 7
    PARAM_LAYOUT = 8
    STATE = 9
    SLOT = 10
    STEP = 11
    OVERLAP = 12
    STATE_SHARED = 13
    STEP_SHARED = 14
    SLOT_SHARED = 15
    STEP_ALIASED = 16
    INFERENCE = 17
    LAZY = 18


class Walk(enum.IntEnum):
    """amos_fused::Walk: how the kernels walk a param's memory."""

    ANY = 0          # the reference: any strides
    DENSE = 1        # one block of memory, any dim order
    CONTIGUOUS = 2   # row-major


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Complex params are stepped as their real views (torch.view_as_real), like torch.optim.
REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def check_step(params: List[Tensor], grads: List[Tensor], states: List[List[Tensor]],
               slots: List[List[Tensor]], steps: List[Tensor], walk: Walk) -> Tuple[int, Problem, int]:
    """One C++ pass over a bucket: (index of the first bad param or -1, Problem,
    index of the state / slot list at fault).  The ``check_step`` op's check,
    called as a plain function of ``_C`` (the lists unpacked from Python, not
    through the dispatcher: its per-tensor cost counts in a step over many params)."""
    index, problem, which = _C.check_step(
        params, grads, [t for ts in states for t in ts], [t for ts in slots for t in ts], steps, int(walk))
    return index, Problem(problem), which


def _describe(t: Tensor) -> str:
    return f"{t.dtype}, shape {tuple(t.shape)}, strides {t.stride()}, on {t.device}"


def lazy_kind(tensor: Tensor) -> str:
    """What makes ``tensor``'s memory not hold its values as they read (csrc/checks.h:
    lazy_view), in words, or "" for a plain tensor."""
    if tensor._is_zerotensor():
        return "a ZeroTensor (no memory of its own)"
    if tensor.is_neg():
        return "a lazily negated view (tensor.is_neg(), as x.conj().imag makes)"
    return "a lazily conjugated view (tensor.is_conj())" if tensor.is_conj() else ""


def shared_state_text(name: str, tensor: Tensor) -> str:
    """Why state[name] (``tensor``) is refused when it shares memory with its param or
    another of its states."""
    return (f"state[{name!r}] ({_describe(tensor)}) shares memory with its param or with another of its states; "
            "each state needs memory of its own (it is written in place)")


def step_error(where: str, problem: Problem, param: Tensor, grad: Optional[Tensor] = None,
               tensor: Optional[Tensor] = None, name: str = "", backend: str = "",
               walk: Walk = Walk.DENSE, master: Optional[Tensor] = None) -> Exception:
    """The exception for ``problem`` of ``param`` (described by ``where``);
    ``tensor``/``name``: the state tensor at fault; ``backend``/``walk``: the
    fused backend and the layout it needs; ``master``: the float32 master the
    step updates in the param's place (its states are like it)."""
    if problem == Problem.GRAD_SPARSE:
        return RuntimeError(f"{where}: sparse gradients are not supported (grad layout {grad.layout})")
    if problem == Problem.GRAD_DTYPE:
        return TypeError(f"{where}: grad has dtype {grad.dtype}, expected {param.dtype}")
    if problem == Problem.GRAD_DEVICE:
        return ValueError(f"{where}: grad is on {grad.device}, expected {param.device}")
    if problem in (Problem.GRAD_SHAPE, Problem.GRAD_LAYOUT):
        return ValueError(f"{where}: grad has shape {tuple(grad.shape)}, expected {tuple(param.shape)}")
    if problem == Problem.PARAM_DTYPE:
        return TypeError(f"{where}: params of dtype {param.dtype} are not supported "
                         "(float32, float64, bfloat16, float16, and complex64/complex128 for "
                         "the elementwise optimizers)")
    if problem == Problem.PARAM_MIXED:
        return ValueError(f"{where}: the param changed dtype or device since the step before")
    if problem == Problem.PARAM_LAYOUT:
        return ValueError(f"{where}: the fused {backend!r} backend needs params that are "
                          + ("contiguous" if walk == Walk.CONTIGUOUS else "dense in memory (not a strided view)")
                          + "; use backend='reference'")
    if problem in (Problem.STATE, Problem.SLOT):
        whose = "the param's" if master is None else "the param's float32 master's"
        need = (f"a contiguous tensor of {whose} dtype and device" if problem == Problem.SLOT
                else f"a tensor with {whose} dtype, device, shape and strides")
        if problem == Problem.STATE:
            need += f" ({_describe(param if master is None else master)})"
        elif master is not None:
            need += f" ({master.dtype}, on {master.device})"
        return ValueError(f"{where}: state[{name!r}] ({_describe(tensor)}) must be {need}")
    if problem == Problem.STEP:
        if isinstance(tensor, Tensor) and tensor.numel() == 1 and tensor.dtype == torch.float32 \
                and tensor.device.type == "cpu" and tensor.layout == torch.strided:
            return ValueError(f"{where}: state['step'] must be a finite count >= 0, got {float(tensor)}")
        kind = ValueError if isinstance(tensor, Tensor) else CountNotATensorError
        return kind(f"{where}: state['step'] must be a float32 CPU scalar tensor, got "
                    + (_describe(tensor) + f" ({tensor.layout})" if isinstance(tensor, Tensor) else repr(tensor)))
    if problem in (Problem.STATE_SHARED, Problem.SLOT_SHARED):
        return ValueError(f"{where}: {shared_state_text(name, tensor)}")
    if problem == Problem.STEP_SHARED:
        return ValueError(f"{where}: state['step'] is also another param's state['step'] (one tensor); each "
                          "param needs a step counter of its own (torch.optim would advance a shared one once "
                          "per param, so each param would see another count)")
    if problem == Problem.STEP_ALIASED:
        return ValueError(f"{where}: state['step'] shares memory with its param, its grad or one of its states; "
                          "the step counter needs memory of its own (it is written in place)")
    if problem == Problem.INFERENCE:
        what = "the param" if not name else f"state[{name!r}]"
        return RuntimeError(f"{where}: {what} is an inference tensor (made under torch.inference_mode()), which "
                            "cannot be updated in place outside inference mode; clone it outside inference "
                            "mode (or step inside torch.inference_mode())")
    if problem == Problem.LAZY:
        what = "the param" if not name else f"state[{name!r}]"
        fix = ("replace it by a plain tensor" if tensor._is_zerotensor() else
               f"resolve it first (tensor.resolve_{'neg' if tensor.is_neg() else 'conj'}())")
        return ValueError(f"{where}: {what} is {lazy_kind(tensor)}, which the step cannot write in place; {fix}")
    if problem == Problem.OVERLAP:
        return ValueError(f"{where}: shares memory with another param of the optimizer; "
                          "overlapping params cannot be stepped")
    return RuntimeError(f"{where}: unexpected problem {problem!r}")  # pragma: no cover


def is_foreign_step(step: Tensor) -> bool:
    """True for a one-element step counter of another real dtype or device than
    the float32 CPU scalar the steps keep (``torch.tensor(10)``, a float64 or CUDA
    count): torch.optim steps from it, so the step converts it."""
    if step.dtype == torch.float32 and step.is_cpu:  # the steps' own kind (the common case)
        return False
    return (step.numel() == 1 and step.device.type != "meta"
            and not step.dtype.is_complex and step.dtype != torch.bool)  # a real count


def _byte_span(t: Tensor) -> Tuple[int, int]:
    """[first, last) byte address spanned by t (strides are non-negative in torch)."""
    start = t.data_ptr()
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def is_dense(t: Tensor) -> bool:
    """t's elements fill one block of memory without gaps or overlap, in any dim
    order (amos_fused::is_dense of csrc/checks.cpp; here for construction-time checks)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _element_offsets(t: Tensor, origin: int, unit: int) -> Tensor:
    """The offsets from ``origin``, in units of ``unit`` bytes (t's element size or
    1), of every unit of t's elements (int64, flat)."""
    offsets = torch.zeros((), dtype=torch.int64, device="cpu")
    for n, s in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64, device="cpu") * s
    per_element = t.element_size() // unit
    starts = offsets.reshape(-1) * per_element + (t.data_ptr() - origin) // unit
    return (starts.unsqueeze(-1) + torch.arange(per_element, dtype=torch.int64, device="cpu")).reshape(-1)


def _first_shared_byte(members: List[Tuple[int, Tensor]]) -> Optional[Tuple[int, int]]:
    """(i, j), i < j, of two of ``members`` ((index, tensor) of one device whose
    byte spans chain into one range) that share a byte, or None: every byte each
    one occupies (every element, when they all have one element size and
    alignment), sorted once, a repeated one naming its two owners."""
    origin = min(_byte_span(t)[0] for _, t in members)
    unit = members[0][1].element_size()
    if any(t.element_size() != unit or (t.data_ptr() - origin) % unit for _, t in members):
        unit = 1
    units = [_element_offsets(t, origin, unit) for _, t in members]
    owners = torch.cat([torch.full((len(u),), k, dtype=torch.int64, device="cpu") for k, u in enumerate(units)])
    ordered, order = torch.sort(torch.cat(units), stable=True)
    owned = owners[order]
    # (a unit repeated by one owner alone is an expanded view's own sharing, not an overlap
    # with another param; a run of one unit with two owners has two of them side by side)
    shared = ((ordered[1:] == ordered[:-1]) & (owned[1:] != owned[:-1])).nonzero()
    if len(shared) == 0:
        return None
    at = int(shared[0])
    a, b = members[int(owned[at])][0], members[int(owned[at + 1])][0]
    return (min(a, b), max(a, b))


def first_overlap(params: Sequence[Tensor]) -> Optional[Tuple[int, int]]:
    """Indices (i, j) of two params that share memory, or None.  Params on the
    meta device and FakeTensors (no memory) and empty ones never overlap.  Dense params overlap
    where their byte spans do; params that are not dense (strided views, which may
    interleave) are compared byte by byte with the params whose spans chain with
    theirs, all at once (linear in their bytes, whatever their number)."""
    spans: List[Tuple[str, int, int, int]] = []
    for i, p in enumerate(params):
        if p.numel() == 0 or p.device.type == "meta" or is_fake(p):
            continue
        start, end = _byte_span(p)
        spans.append((str(p.device), start, end, i))
    spans.sort()
    cluster: List[Tuple[int, int, int]] = []  # (start, end, index) of spans chained into one range
    reach, device = -1, None
    for where, start, end, i in spans + [("", 0, 0, -1)]:
        if cluster and (where != device or start >= reach):  # the cluster is complete
            found = _cluster_overlap(params, cluster)
            if found is not None:
                return found
            cluster = []
        if i < 0:
            break
        if not cluster:
            reach, device = end, where
        cluster.append((start, end, i))
        reach = max(reach, end)
    return None


def _cluster_overlap(params: Sequence[Tensor], cluster: List[Tuple[int, int, int]]) -> Optional[Tuple[int, int]]:
    if len(cluster) < 2:
        return None
    if all(is_dense(params[i]) for _, _, i in cluster):  # two spans of dense params that meet share memory
        open_spans: List[Tuple[int, int]] = []
        for start, end, i in cluster:
            open_spans = [(e, j) for e, j in open_spans if e > start]
            if open_spans:
                j = open_spans[0][1]
                return (j, i) if j < i else (i, j)
            open_spans.append((end, i))
        return None
    return _first_shared_byte([(i, params[i]) for _, _, i in cluster])
