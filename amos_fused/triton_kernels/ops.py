"""The Triton step op: the same signature as ``torch.ops.amos_fused.step`` (see
csrc/ops.cpp), so an optimizer steps a bucket with ``ops.step(...)`` in place of
``torch.ops.amos_fused.step(...)``.

A step checks its inputs (the C++ checks of ``check_step``, plus what only Triton
needs; ``prechecked``, the optimizers' entry, skips the ``check_step`` pass they
ran over the same lists), then runs the C++ prologue shared with the CPU and CUDA ops
(``torch.ops.amos_fused.begin_step``, called as ``_C.begin_step``: the same checks, the GradScaler inputs read
on the host — a non-zero ``found_inf`` skips the whole step, step counters
included — and every tensor's coefficients computed in double from the
algorithm's contract at the next step counts), launches the algorithm's kernels
over the whole bucket (adam.py, amos.py, norm_scaled.py) with that coefficient
table, and only then advances the float32 CPU step counters (the ``advance_steps``
op): a launch that raises leaves them as they were.  ``telemetry`` (optional, a contiguous float64
[len(params), 2] tensor on the params' device, checked by ``begin_step``) gets
row t = (Σθ², Σ(Δθ)²) of param t as stored, taken by the launch that writes θ
and added per tensor in a fixed order (common.py); on a step skipped by
``found_inf``, ``begin_step`` zeroes its column 1 and leaves column 0.  ``round_keys`` (optional, one int key per param, bfloat16 params
only, checked by ``begin_step``): the launch that writes θ stores it with stochastic
rounding, the same bits as the CPU and CUDA kernels (csrc/stochastic_round.h; the
Triton copy of the hash and the per-step rounding table are in common.py); telemetry
then sees the rounded stored values.  Tensors: CUDA, or CPU under TRITON_INTERPRET=1;
float32 / bfloat16 / float16 with fp32 math, float64 with fp64 math.

``step_fp8`` (the signature of ``torch.ops.amos_fused.step_fp8``) steps the
algorithms whose states are block-scaled FP8 codes (fp8.py), the same way: the
C++ prologue ``begin_step_fp8`` (its checks, found_inf, coefficients), one
launch, then the step counters.

``step_capturable`` (``capturable=True``) reads nothing on the host: its counters
are on the params' device, its coefficients computed there (amos_fused/device_coefficients.py;
the checks and counters of amos_fused/capturable.py, shared with the CUDA backend)
and its kernels read found_inf themselves."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..contracts import algorithms as contract_algorithms
from ..contracts import contract
from .. import _C, capturable, device_coefficients
from . import adam, amos, amos_fp8, fp8, norm_scaled
from .common import check_bucket, round_table

# Each algorithm's launch is ``launch_<algorithm>(params, grads, states by key, hyper by
# name, coefficient table, prepared, telemetry=None, rounding=None)`` in one of these
# modules (rounding: common.py's rounding table).
_MODULES = (adam, amos, norm_scaled)
_LAUNCH = {name[len("launch_"):]: getattr(module, name)
           for module in _MODULES for name in dir(module) if name.startswith("launch_")}


def algorithms() -> List[str]:
    """The algorithms of the compiled step op that the Triton kernels launch."""
    return [name for name in contract_algorithms() if name in _LAUNCH]


def _state_lists(op: str, algorithm: str, n: int, states: Sequence[Tensor],
                 hyper: Sequence[float]) -> Dict[str, List[Tensor]]:
    """The enabled state lists of a call, by key (the contract's order, n tensors each)."""
    c = contract(algorithm)
    if len(hyper) != len(c.hyper):
        raise ValueError(f"{op}: expected {len(c.hyper)} hyper-parameters ({', '.join(c.hyper)}), "
                         f"got {len(hyper)}")
    values = dict(zip(c.hyper, hyper))
    keys = [key for key, flag in zip(c.states, c.enabled_by) if not flag or values[flag]]
    if len(states) != len(keys) * n:
        raise ValueError(f"{op}: expected {len(keys)} state lists ({', '.join(keys)}) of {n} "
                         f"tensors, got {len(states)} state tensors")
    return {key: list(states[k * n:(k + 1) * n]) for k, key in enumerate(keys)}


def _mark_written(*lists: Sequence[Tensor]) -> None:
    """Bumps the version counters of the tensors the kernels wrote through their
    addresses, as torch's in-place ops (and the compiled step ops) do: autograd
    then refuses a backward through a graph that saved a param since changed.
    (Inference tensors, which have no version counter, are passed over by torch.)"""
    torch._C._increment_version([t for tensors in lists for t in tensors])


def step(algorithm: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
         steps: List[Tensor], hyper: Sequence[float], per_tensor: Sequence[float],
         grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
         telemetry: Optional[Tensor] = None, round_keys: Optional[Sequence[int]] = None,
         low_params: Optional[Sequence[Tensor]] = None, *, checked_by_caller: bool = False) -> None:
    """One step of ``algorithm`` over a bucket (arguments as ``torch.ops.amos_fused.step``;
    ``low_params`` is not taken: the optimizers copy masters into their params after
    the step).  ``checked_by_caller``: the caller ran ``check_step`` over these lists
    (``prechecked``), so its per-element checks are not run twice."""
    if low_params is not None:
        raise ValueError(f"amos_fused.triton.{algorithm}_step: low_params (master weights written in the same "
                         "pass) are not supported by the triton backend")
    if algorithm not in algorithms():
        raise ValueError(f"amos_fused: unknown algorithm {algorithm!r} (known: {', '.join(algorithms())})")
    op = f"amos_fused.triton.{algorithm}_step"
    lists = _state_lists(op, algorithm, len(params), states, hyper)
    hyper_by_name = dict(zip(contract(algorithm).hyper, (float(h) for h in hyper)))
    slot_keys = ("v", "b") if algorithm == "amos" else ()
    check_bucket(op, params, grads, {k: v for k, v in lists.items() if k not in slot_keys}, steps,
                 {k: lists[k] for k in slot_keys}, elements=not checked_by_caller)
    prepared = amos.amos_meta(op, params, lists["v"], lists["b"], lists.get("mu")) if slot_keys else None
    run, coef = _C.begin_step(algorithm, list(params), list(grads), list(states), list(steps),  # (the op's, no
                              [float(h) for h in hyper], [float(x) for x in per_tensor],  # dispatcher)
                              grad_scale, found_inf, telemetry,
                              None if round_keys is None else [int(k) for k in round_keys])
    if run:
        rounding = round_table(round_keys, steps, params[0].device)
        _LAUNCH[algorithm](params, grads, lists, hyper_by_name, coef, prepared, telemetry=telemetry,
                           rounding=rounding)
        _mark_written(params, states)
        torch.ops.amos_fused.advance_steps(list(steps))  # after the launch: a failed one leaves them


def capturable_algorithms() -> List[str]:
    """The algorithms ``step_capturable`` steps (those of ``step``)."""
    return [name for name in algorithms() if name in device_coefficients.algorithms()]


def step_capturable(algorithm: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
                    steps: List[Tensor], hyper: Mapping[str, object], per_tensor: Sequence[float],
                    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """One capturable step of ``algorithm`` over a bucket (``capturable=True``): as
    ``step``, but nothing is read on the host, so it can be captured in a CUDA graph
    and replayed.  ``steps``: float32 one-element counters on the params' device;
    ``hyper`` by the contract's names, ``lr`` a number or a one-element tensor on
    the device (a graph replayed with a changing lr reads it there);
    ``grad_scale`` / ``found_inf``: GradScaler's, on the device.  The coefficient
    table is computed on the device (device_coefficients.py), the kernels read
    found_inf themselves and return when it is set (nothing written), and the
    counters then advance by 1 unless found_inf is set.  No telemetry, stochastic rounding or
    low params."""
    capturable.check_algorithm(algorithm, capturable_algorithms())
    op = f"amos_fused.triton.{algorithm}_step_capturable"
    capturable.check_hyper_names(op, algorithm, hyper)
    names = contract(algorithm).hyper
    lists = _state_lists(op, algorithm, len(params), states, [hyper[name] for name in names])
    slot_keys = ("v", "b") if algorithm == "amos" else ()
    check_bucket(op, params, grads, {k: v for k, v in lists.items() if k not in slot_keys}, [],
                 {k: lists[k] for k in slot_keys})
    if not params:
        return
    capturable.check_device_arguments(op, params, steps, hyper, grad_scale, found_inf)
    prepared = amos.amos_meta(op, params, lists["v"], lists["b"], lists.get("mu")) if slot_keys else None
    coef = device_coefficients.coefficient_table(algorithm, steps, hyper, per_tensor, grad_scale,
                                                 float32_math=params[0].dtype != torch.float64)
    _LAUNCH[algorithm](params, grads, lists, capturable.host_hyper(hyper), coef, prepared,
                       skip=found_inf)  # (host_hyper: the constexpr choices)
    _mark_written(params, states)
    capturable.advance_counters(steps, found_inf)


def fp8_algorithms() -> List[str]:
    """The algorithms of the compiled step_fp8 op that the Triton kernels launch
    (fp8.py's, and Amos: amos_fp8.py)."""
    return [name for name in torch.ops.amos_fused.fp8_algorithms() if name in fp8.ALGORITHMS or name == "amos"]


def _per_state(tensors: Sequence[Tensor], n: int) -> List[List[Tensor]]:
    """A key-major list cut into one list of n tensors per state."""
    return [list(tensors[k:k + n]) for k in range(0, len(tensors), n)]


def step_fp8(algorithm: str, params: List[Tensor], grads: List[Tensor], codes: List[Tensor],
             absmax: List[Tensor], steps: List[Tensor], hyper: Sequence[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             telemetry: Optional[Tensor] = None, round_keys: Optional[Sequence[int]] = None,
             low_params: Optional[Sequence[Tensor]] = None, states: Optional[Sequence[Tensor]] = None,
             per_tensor: Optional[Sequence[float]] = None, *, checked_by_caller: bool = False) -> None:
    """One step of ``algorithm`` over a bucket with FP8 states (arguments as
    ``torch.ops.amos_fused.step_fp8``: codes and absmax key-major lists, Amos's
    slots in ``states`` and its η in ``per_tensor``; no ``low_params`` and
    ``checked_by_caller`` as ``step``)."""
    if low_params is not None:
        raise ValueError(f"amos_fused.triton.{algorithm}_step_fp8: low_params (master weights written in the same "
                         "pass) are not supported by the triton backend")
    if algorithm not in fp8_algorithms():
        raise ValueError(f"amos_fused: no FP8-state step for {algorithm!r} (known: {', '.join(fp8_algorithms())})")
    op = f"amos_fused.triton.{algorithm}_step_fp8"
    check_bucket(op, params, grads, {}, steps, elements=not checked_by_caller)
    keys = None if round_keys is None else [int(k) for k in round_keys]
    hyper = [float(h) for h in hyper]
    run, coef = _C.begin_step_fp8(algorithm, list(params), list(grads), list(codes),  # (the op's, no dispatcher)
                                  list(absmax), list(steps), hyper, grad_scale, found_inf,
                                  telemetry, keys, None if states is None else list(states),
                                  None if per_tensor is None else [float(x) for x in per_tensor])
    if not run:
        return
    by_name = dict(zip(contract(algorithm).hyper, hyper))
    rounding = round_table(keys, steps, params[0].device)
    if algorithm == "amos":
        n = len(params)
        meta = amos_fp8.amos_fp8_meta(op, params, states[:n], states[n:], codes, absmax)
        amos_fp8.launch_amos_fp8(list(params), list(grads), states[:n], states[n:], list(codes), list(absmax),
                                 by_name, coef, meta, telemetry=telemetry, rounding=rounding)
    else:
        fp8.launch_fp8(algorithm, list(params), list(grads), _per_state(codes, len(params)),
                       _per_state(absmax, len(params)), by_name, coef, telemetry=telemetry, rounding=rounding)
    _mark_written(params, codes, absmax, states or ())
    torch.ops.amos_fused.advance_steps(list(steps))  # after the launch: a failed one leaves them


class _Prechecked:
    """``step`` and ``step_fp8`` for a caller that ran ``check_step`` over the very
    lists it passes (the optimizers check every bucket so before any is written):
    the per-element checks run once per step, not twice."""

    @staticmethod
    def step(*args, **kwargs) -> None:
        step(*args, checked_by_caller=True, **kwargs)

    @staticmethod
    def step_fp8(*args, **kwargs) -> None:
        step_fp8(*args, checked_by_caller=True, **kwargs)


prechecked = _Prechecked()
