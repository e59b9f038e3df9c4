"""Each algorithm's contract with the kernels, read from the compiled library (the
one place it is declared): the names of its hyper-parameters in the order the
``step`` op takes them, its state lists (and the flag that enables an optional
one), its per-tensor value, and the columns of its coefficient table.

``step_arguments`` turns an optimizer's hyper-parameters and bucket state into the
``states`` and ``hyper`` arguments of ``torch.ops.amos_fused.step`` (and of the
Triton backend's ``step``), checking the names against the contract."""
from __future__ import annotations

import functools
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.amos_fused)


class Contract(NamedTuple):
    hyper: Tuple[str, ...]        # the op's hyper list, in order
    states: Tuple[str, ...]       # state keys, in the op's (key-major) order
    enabled_by: Tuple[str, ...]   # per state: the hyper flag that enables it, or ""
    per_tensor: Tuple[str, ...]   # () or the name of the per-tensor value
    columns: Tuple[str, ...]      # the coefficient table's columns, in order


@functools.lru_cache(maxsize=None)
def algorithms() -> Tuple[str, ...]:
    """Every algorithm the compiled step op runs."""
    return tuple(torch.ops.amos_fused.algorithms())


@functools.lru_cache(maxsize=None)
def master_algorithms() -> Tuple[str, ...]:
    """The algorithms whose CPU step op writes low-precision params from their
    float32 masters in the same pass (its ``low_params``)."""
    return tuple(torch.ops.amos_fused.master_algorithms())


@functools.lru_cache(maxsize=None)
def contract(algorithm: str) -> Contract:
    return Contract(*(tuple(names) for names in torch.ops.amos_fused.contract(algorithm)))


def hyper_values(algorithm: str, hyper: Mapping[str, float]) -> List[float]:
    """``hyper``'s values in the order of ``algorithm``'s contract (flags as 0 / 1)."""
    names = contract(algorithm).hyper
    if set(hyper) != set(names):
        raise ValueError(f"{algorithm}: hyper-parameters {sorted(hyper)} do not match the kernels' "
                         f"{list(names)}")
    return [float(hyper[name]) for name in names]


def enabled_states(algorithm: str, hyper: Mapping[str, object],
                   state: Mapping[str, Sequence[Tensor]]) -> List[Tensor]:
    """The enabled state lists of ``state`` (key → one tensor per param, a key
    enabled by a flag of ``hyper`` or by none) concatenated in the contract's order."""
    c = contract(algorithm)
    states: List[Tensor] = []
    for key, flag in zip(c.states, c.enabled_by):
        if not flag or hyper[flag]:
            states.extend(state[key])
    return states


def step_arguments(algorithm: str, hyper: Mapping[str, float],
                   state: Mapping[str, Sequence[Tensor]]) -> Tuple[List[Tensor], List[float]]:
    """(states, hyper) of a step op call: ``enabled_states`` and ``hyper``'s values
    in the contract's order (flags as 0 / 1)."""
    return enabled_states(algorithm, hyper, state), hyper_values(algorithm, hyper)


def column_indices(algorithm: str, names: Sequence[str]) -> List[int]:
    """The column of each name in ``algorithm``'s coefficient table, in the order of
    ``names``, which must be exactly the contract's columns (any order), so a
    reader cannot fall out of step with the table."""
    columns = contract(algorithm).columns
    if sorted(names) != sorted(columns):
        raise RuntimeError(f"{algorithm}: coefficient columns {sorted(names)} do not match the "
                           f"kernels' {list(columns)}")
    return [columns.index(name) for name in names]


def call_step(ops, algorithm: str, params: Sequence[Tensor], grads: Sequence[Tensor],
              state: Mapping[str, Sequence[Tensor]], steps: Sequence[Tensor],
              hyper: Mapping[str, float], per_tensor: Sequence[float] = (),
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              telemetry: Optional[Tensor] = None, round_keys: Optional[Sequence[int]] = None,
              low_params: Optional[Sequence[Tensor]] = None) -> None:
    """One ``ops.step`` call (``ops``: torch.ops.amos_fused or the Triton ops) with the
    state lists and hyper-parameters given by name; ``telemetry``: the op's optional
    [len(params), 2] float64 output (Σθ², Σ(Δθ)² per param); ``round_keys``: one key per
    bfloat16 param to store it with stochastic rounding (amos_fused/stochastic_round.py);
    ``low_params``: the bfloat16 / float16 params whose float32 masters ``params`` are,
    written in the same pass (CPU, ``master_algorithms()``)."""
    states, values = step_arguments(algorithm, hyper, state)
    ops.step(algorithm, list(params), list(grads), states, list(steps), values, list(per_tensor),
             grad_scale, found_inf, telemetry, None if round_keys is None else list(round_keys),
             None if low_params is None else list(low_params))


def call_fp8_step(ops, algorithm: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                  state: Mapping[str, Sequence[Tensor]], steps: Sequence[Tensor],
                  hyper: Mapping[str, float], keys: Sequence[str],
                  grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                  telemetry: Optional[Tensor] = None, round_keys: Optional[Sequence[int]] = None,
                  low_params: Optional[Sequence[Tensor]] = None, full_keys: Sequence[str] = (),
                  per_tensor: Sequence[float] = ()) -> None:
    """One ``ops.step_fp8`` call (``ops``: torch.ops.amos_fused or the Triton ops): the
    states under ``keys`` are FP8 codes, each with its per-block absmax under
    ``key + '_absmax'`` (amos_fused/fp8_states.py), those under ``full_keys`` are
    kept in full precision (Amos's slots v, b) and ``per_tensor`` are the
    per-tensor values (Amos's η); the rest as in ``call_step`` (``low_params``:
    the CPU op only)."""
    codes = [t for key in keys for t in state[key]]
    absmax = [t for key in keys for t in state[key + "_absmax"]]
    full = [t for key in full_keys for t in state[key]]
    ops.step_fp8(algorithm, list(params), list(grads), codes, absmax, list(steps), hyper_values(algorithm, hyper),
                 grad_scale, found_inf, telemetry, None if round_keys is None else list(round_keys),
                 None if low_params is None else list(low_params), full or None,
                 [float(x) for x in per_tensor] or None)


def call_capturable_step(ops, algorithm: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                         state: Mapping[str, Sequence[Tensor]], steps: Sequence[Tensor], hyper: Mapping[str, object],
                         per_tensor: Sequence[float] = (), grad_scale: Optional[Tensor] = None,
                         found_inf: Optional[Tensor] = None) -> None:
    """One ``ops.step_capturable`` call (``ops``: backends.capturable_ops, the Triton
    ops or amos_fused/capturable.py): as ``call_step``, with step
    counters on the device and ``hyper['lr']`` possibly a device tensor (not read
    on the host); flags as 0 / 1."""
    values = {name: hyper[name] if isinstance(hyper[name], Tensor) else float(hyper[name])
              for name in contract(algorithm).hyper}
    ops.step_capturable(algorithm, list(params), list(grads), enabled_states(algorithm, values, state), list(steps),
                        values, list(per_tensor), grad_scale, found_inf)
