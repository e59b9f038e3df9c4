"""The machinery every amos_fused optimizer shares: checking a whole step before
anything is written, bucketing, lazy state, backend dispatch and checkpoint
loading.  Subclasses (optim.py, norm_scaled.py, optim_fp8.py) only say what
their state is and how one bucket is stepped by the fused kernels and by the
reference; states named in ``fp8_state_keys`` are kept as block-scaled FP8 codes
for the params that allow it (fp8_states.py), in buckets of their own.

Like torch.optim, every step reads ``group['params']``, each param's ``.grad``
and ``self.state`` afresh: a user may clear the state, replace a state tensor,
replace or reorder params, or set ``p.data`` between steps.  What is cached (how
a group splits into buckets, per-param hyper-parameter lists) is validated
against them at every step and rebuilt when they differ."""
from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
import math
import numbers
from itertools import repeat
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .backends import CAPTURABLE_BACKENDS, backend_for, capturable_backend, capturable_ops, check_backend, fused_ops
from .buckets import Bucket, BucketSpec, GroupPlan, kernel_dtype, memory_order
from .checks import (REAL_OF_COMPLEX, Problem, Walk, check_step, first_overlap, is_dense, is_foreign_step,
                     lazy_kind, shared_state_text, step_error)
from . import _C, fp8_states
from . import hyperparams as hp
from .master_weights import (MASTER_KEY, WriteMarks, awaits_master, float32_copy, has_master, master_problem,
                             upcast_states)
from . import master_weights as masters
from .contracts import call_capturable_step, call_fp8_step, call_step, master_algorithms
from .sharding import (dtensor_positions, is_dtensor, local, mesh_groups, placed_as, placed_like, shard_offset,
                       wait_for_every_shard)
from .stochastic_round import round_key, round_to_bfloat16
from .telemetry import RMS, Recorder, measured_sums, new_table, snapshot

_ABSENT = object()  # a param without an entry in the optimizer's state


def torch_flags(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                backend=None, track_rms=False, bf16_stochastic_round=False,
                stochastic_round_seed=0, master_weights=False) -> Dict[str, Any]:
    """The keyword-only flags every optimizer takes, as group defaults: torch.optim's
    own (``maximize``: g ← −g; ``foreach``: accepted, no effect — every step is one
    fused pass per bucket or the reference's per-tensor loop; ``fused``: None or
    True for the fused kernels, False for the reference; ``capturable``: steps
    that read nothing on the host, on the CUDA and Triton backends; ``differentiable``: False
    only), ``backend``, the constructor's choice of
    kernels (kept in the defaults only, not copied into the groups, so never saved
    in checkpoints; a ``backend`` key of a group's own overrides it), ``track_rms``: each step also
    measures every param's weight and update RMS, read with ``optimizer.rms()``
    (amos_fused/telemetry.py), and ``bf16_stochastic_round``: bfloat16 params are
    stored with stochastic rounding, its bits hashed from ``stochastic_round_seed``
    (amos_fused/stochastic_round.py), and ``master_weights``: each bfloat16 /
    float16 param has a float32 copy in its state (``'master_param'``) which the
    step updates, with float32 states, and the param is written as the master
    rounded to nearest (amos_fused/master_weights.py)."""
    return dict(maximize=maximize, foreach=foreach, capturable=capturable,
                differentiable=differentiable, fused=fused, backend=backend, track_rms=track_rms,
                bf16_stochastic_round=bf16_stochastic_round, stochastic_round_seed=stochastic_round_seed,
                master_weights=master_weights)


def _cloning_mode_in_this_thread() -> bool:
    """Whether allow_mutation_on_saved_tensors()'s dispatch mode is active in this
    thread (its global flag is set while any thread is inside the context)."""
    mode_type = getattr(torch.autograd.graph, "_CloneArgBeforeMutateMode", None)
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # (a torch without either: the flag alone decides)
        return True
    if mode_type is None:
        return True
    return any(isinstance(mode, mode_type) for mode in _get_current_dispatch_mode_stack())


def group_backend(group: dict, defaults: dict) -> Optional[str]:
    """The backend a group asks for: ``fused=False`` means the reference; else a
    ``backend`` set in the group itself, else the constructor's (``defaults``: the
    constructor's choice is not copied into the groups, so that no checkpoint
    carries it)."""
    fused = group.get("fused")
    if fused is not None and not fused:  # (False, 0, NumPy's False: torch.optim's "not fused")
        return "reference"
    return group.get("backend", defaults.get("backend"))


def fill_group_defaults(group: dict, defaults: dict) -> None:
    """The group's missing keys taken from the defaults, all but ``backend``: as
    torch.optim's add_param_group fills a new group, and, at load, the settings a
    checkpoint of the torch.optim peer (or of an older version) lacks; a loaded
    group without one of ``core_group_keys`` is refused first."""
    for key, value in defaults.items():
        if key != "backend":
            group.setdefault(key, value)


def zeros_in_memory_order(like: Tensor, shape, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Zeros of ``shape`` (like's dims, some of size 1; of like's dtype unless
    ``dtype``) laid out in like's memory order, so that permuting both into that
    order gives row-major tensors."""
    order = memory_order(like)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    zeros = torch.zeros([shape[d] for d in order], dtype=dtype or like.dtype, device=like.device)
    return zeros.permute(inverse)


def writes_low_params(backend: str, algorithm: str, fp8: bool) -> bool:
    """Whether the step op writes the low-precision params of float32 masters in the
    same pass (its ``low_params``): the CPU kernels of ``master_algorithms()`` and
    the CPU FP8 kernels.  Otherwise the masters are copied into them after."""
    return backend == "cpu" and (fp8 or algorithm in master_algorithms())


def _process_groups(params: List[Tensor]) -> List[Tuple[object, torch.device]]:
    """The process groups (with a device for their tensors) of every mesh dim of
    ``params`` (the dims that shard them and those that replicate them), in the
    order first met (the same on every rank)."""
    found: List[Tuple[object, torch.device]] = []
    for p in params:
        for group in mesh_groups(p):
            if all(group is not seen for seen, _ in found):
                found.append((group, local(p).device))
    return found


def _holds_tensor(values) -> bool:
    """Whether a per-param tuple holds a tensor (whose value may be edited in place)."""
    return any(isinstance(v, Tensor) for v in values)


def _as_float(value) -> Optional[float]:
    """A real number (a Python or NumPy number, a one-element tensor) as a float,
    else None (what is not a number is checked elsewhere)."""
    if isinstance(value, bool) or hp.complex_valued(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None


def _host_values(group: dict) -> dict:
    """``group`` as the host-side checks read it: a capturable step's lr tensor on
    the device reads as 0.0 (its value stays there; _gather checks the tensor)."""
    lr = group.get("lr")
    if group.get("capturable") and isinstance(lr, Tensor) and lr.device.type != "cpu":
        return {**group, "lr": 0.0}
    return group


def _each_element_once(grads: List[Tensor]) -> Tuple[List[Tensor], List[Tuple[Tensor, Tensor]]]:
    """``grads`` as (the grads that share no memory with another, [(a flat tensor over
    a storage, a mask of the elements that grads of its dtype there hold)]): two
    params' grads that are views of one memory (``p1.grad = g``, ``p2.grad =
    g.view(...)``) are then multiplied once per element, as one grad tensor two
    params hold is.  The common case, dense grads none of which shares memory with
    another, costs one C++ pass over the grads' spans (exact for dense tensors)."""
    if len(grads) < 2:
        return grads, []
    if all(g.is_contiguous() or is_dense(g) for g in grads) and _C.first_written_overlap(grads, len(grads))[0] < 0:
        return grads, []
    by_storage: Dict[Tuple[str, int, torch.dtype], List[Tensor]] = defaultdict(list)
    for g in grads:
        by_storage[(str(g.device), g.untyped_storage().data_ptr(), g.dtype)].append(g)
    alone, unions = [], []
    for members in by_storage.values():
        if len(members) == 1:
            alone.extend(members)
            continue
        storage = members[0].untyped_storage()
        base = torch.empty(0, dtype=members[0].dtype, device=members[0].device).set_(
            storage, 0, (storage.nbytes() // members[0].element_size(),))
        mask = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
        for g in members:
            mask.as_strided(g.shape, g.stride(), g.storage_offset()).fill_(True)
        unions.append((base, mask))
    return alone, unions


def _multiply_grads(grads: List[Tensor], inverse) -> None:
    """g ← g·(1/s) in place, as the steps read the grads: 1/s (``inverse``, a number
    or a 0-dim float64 tensor) in float64 for float64 grads, else rounded to float32,
    the product taken in float32 and rounded once into a bfloat16/float16 grad
    (torch's own foreach multiply would round 1/s to the grad's dtype first)."""
    # (a DTensor's local shard holds its data; a complex grad is stepped as its real view)
    grads = [torch.view_as_real(g) if g.is_complex() else g for g in map(local, grads)]
    grads, unions = _each_element_once(grads)
    for base, mask in unions:  # grads that share memory: each element of theirs once
        product = base.clone()  # (where(), not mask indexing: no host sync on a GPU)
        _multiply_grads([product], inverse)
        base.copy_(torch.where(mask, product, base))
    for dtype, device in {(g.dtype, g.device) for g in grads}:
        same = [g for g in grads if g.dtype == dtype and g.device == device]
        negated = [g for g in same if g.is_neg()]  # (x.conj().imag: torch's foreach ops cannot write those)
        same = [g for g in same if not g.is_neg()] if negated else same
        factor = inverse if not isinstance(inverse, Tensor) else inverse.to(
            torch.float64 if dtype == torch.float64 else torch.float32)
        if dtype in (torch.float32, torch.float64):
            if same:
                torch._foreach_mul_(same, factor)
            for g in negated:
                g.mul_(factor)
        else:
            if not isinstance(factor, Tensor):
                factor = torch.tensor(factor, dtype=torch.float32, device=device)
            if same:
                torch._foreach_copy_(same, torch._foreach_mul([g.float() for g in same], factor))
            for g in negated:
                g.copy_(g.float() * factor)


@contextlib.contextmanager
def _naming_group(index: int):
    """Adds the group to the message of a group-level refusal (its backend, its
    capturable flag) raised inside."""
    try:
        yield
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise type(error)(f"{error} (param_groups[{index}])") from None


def _float32_master(state) -> bool:
    """Whether a (saved) state holds a float32 master, which a load keeps."""
    return isinstance(state, dict) and isinstance(state.get(MASTER_KEY), Tensor) and \
        state[MASTER_KEY].dtype == torch.float32


def _steps_beside_master(key: str, value: Tensor) -> bool:
    """A floating state (not the master, not an FP8 absmax) that a float32 master's
    step reads in float32: a load beside a kept master brings it to float32, where
    torch.optim would cast it to the param's dtype (a checkpoint without a master
    gets its states upcast with the master made at the next step)."""
    return (key not in (MASTER_KEY, "step") and isinstance(value, Tensor) and value.is_floating_point()
            and not key.endswith(fp8_states.ABSMAX_SUFFIX))


def _loadable_count(step) -> bool:
    """A checkpoint's ``step`` that reads as a count: a real number within float64's
    range, or a one-element real tensor with data (its value is checked at the step)."""
    if isinstance(step, Tensor):
        return (step.numel() == 1 and step.layout == torch.strided and step.device.type != "meta"
                and not step.is_complex() and step.dtype != torch.bool)
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        return False
    try:
        float(step)
    except OverflowError:
        return False
    return True


def _tensors_copied(entry):
    """A loaded state entry of no param, with copies of its tensors (a dict's values
    or the entry itself); anything else kept as it is, as torch.optim keeps it."""
    if isinstance(entry, Tensor):
        return entry.detach().clone()
    if isinstance(entry, dict):
        return {key: value.detach().clone() if isinstance(value, Tensor) else value for key, value in entry.items()}
    return entry


def _laid_out_above(fp8: bool) -> int:
    """The dims above which a param's layout at its last step is followed
    (_relaid_states): a 1-D param has one dense layout, but FP8 codes follow its
    strides when it is a strided view too."""
    return 0 if fp8 else 1


def _unscalable_grad(where: str, grad: Tensor) -> ValueError:
    """The error for a grad GradScaler's in-place unscaling cannot write (its
    elements share memory: an expanded view), raised before the step writes."""
    return ValueError(f"{where}: its grad has elements that share memory (strides {tuple(grad.stride())}); under "
                      "torch.amp.GradScaler the step divides the grads in place once it has run, as torch's fused "
                      "optimizers do: give it a grad of its own (p.grad = p.grad.clone())")


def _unpaired_fp8_error(where: str, st: dict, pair: Tuple[str, str], code_keys) -> ValueError:
    """The error for an FP8 state ``pair`` = (key present, key missing): a
    full-precision state where codes belong (a param grown past the 8-bit size), or
    codes or absmax without the other."""
    present = st[pair[0]]
    if pair[0] in code_keys and isinstance(present, Tensor) and present.dtype != torch.uint8:
        return ValueError(
            f"{where}: state {pair[0]!r} is a full-precision state ({present.dtype}, shape "
            f"{tuple(present.shape)}), where this param keeps FP8 states (uint8 codes with {pair[1]!r}, as params "
            f"of {fp8_states.MIN_NUMEL} elements or more do): delete its state to start afresh, or set it through "
            "load_state_dict, which quantizes full-precision states")
    return ValueError(f"{where}: state {pair[0]!r} is there but {pair[1]!r} is missing; set both (or delete both "
                      "to start them afresh)")


class ParamValueError(ValueError):
    """A group setting that does not fit one of its params (``position`` in
    group['params']): raised by _check_group_params, named by the param."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


class _StalePlan(Exception):
    """A param changed dtype or device since its group's plan was made."""


class _Ready:
    """One param group's step, checked and ready to run: its buckets and the
    state changes to make first (``(param, {key: tensor, or None to remove})``:
    fresh state of params stepped for the first time, masters made or dropped)."""

    def __init__(self, group: dict, buckets: List[Bucket], new_states: List[Tuple[Tensor, dict]],
                 first_index: int):
        self.group, self.buckets, self.new_states = group, buckets, new_states
        self.first_index = first_index  # the optimizer-wide index of the group's first param


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the amos_fused optimizers.  Subclasses set ``algorithm`` and
    ``state_keys`` and implement ``_check_group``, ``_new_state``, ``_hyper`` and
    ``_reference_step``."""

    algorithm: str = ""
    # State tensors shaped like the param, besides 'step' (all that may exist).
    state_keys: Tuple[str, ...] = ()
    # State tensors with a shape of their own (Amos's slots), checked by _check_slots.
    slot_keys: Tuple[str, ...] = ()
    # Group keys that may hold one value per param (a tuple) instead of one float.
    per_param_keys: Tuple[str, ...] = ()
    # torch.optim.Adam/AdamW's refusals: fused=True with foreach=True, and a Tensor lr or betas
    # with foreach=True (its foreach step cannot take them); set by the classes of that peer.
    torch_refuses_with_foreach: bool = False
    # Hyper-parameters (or per-param values) that must stay > 0 in float32 for float32 steps.
    positive_in_step: Tuple[str, ...] = ()
    # Hyper-parameters whose reciprocal the step takes: finite in the step's dtype (_check_reciprocals).
    reciprocal_in_step: Tuple[str, ...] = ()
    # States kept as block-scaled FP8 codes (plus a per-block absmax under
    # fp8_states.absmax_key(key)) for the params fp8_states.keeps_fp8 accepts: the
    # 8-bit optimizers (amos_fused/optim_fp8.py).
    fp8_state_keys: Tuple[str, ...] = ()
    # Elementwise algorithms step complex params as their real views, like torch.optim.
    supports_complex: bool = True
    # The fused kernels walk params in memory order; some (Amos's slot layouts) read
    # it as row-major: their dense params are handed over permuted into memory order.
    fused_needs_contiguous: bool = False
    # torch.amp.GradScaler hands us `grad_scale` / `found_inf` (as attributes)
    # instead of unscaling the grads itself; the kernels unscale in-kernel and skip
    # the step when found_inf is set.
    _step_supports_amp_scaling = True

    # Set while torch.optim's constructor or a load adds many groups: the memory overlap
    # of all params is then checked once at the end, not once per group added.
    _bulk_adding: bool = False
    # Set when a plan is made (a group added, or its params changed): the step then
    # drops what the caches hold of params that left (_forget_departed_params).
    _members_changed: bool = True
    # The flags the matching torch.optim class sets, when a loaded (or unpickled)
    # group lacks them, to torch's defaults rather than to this optimizer's: a
    # checkpoint saved by a torch without a flag meant the flag's default.
    torch_setstate_defaults: Dict[str, Any] = {}
    # The settings every group of this class (and of its torch.optim peer) has: a
    # checkpoint group without one is another optimizer's, refused at load rather
    # than filled from this one's defaults.
    core_group_keys: Tuple[str, ...] = ("lr",)
    _plans_before_step: Dict[int, GroupPlan] = {}
    # During a step: the step counters it replaces by float32 ones of their own
    # (_state_changes: torch.tensor(10), a float64 count), by address -> their param.
    _replaced_steps: Dict[Tuple[str, int], Tensor] = {}
    # Plans kept by id of their group until the next step: which params a loaded or
    # unpickled group's per-param values belong to, and a plan that add_param_group
    # displaced from its index (its group moved there when an earlier one was removed).
    _plans_by_group: Dict[int, GroupPlan] = {}
    # Whether per-param values (per_param_keys) may be given as 1-D tensors or arrays.
    per_param_arrays: bool = False

    def __init__(self, params, defaults: Dict[str, Any]):
        self._plans: Dict[int, GroupPlan] = {}
        self._telemetry = Recorder()
        self._master_marks = WriteMarks()
        self._layouts: Dict[int, Tuple[Tensor, tuple]] = {}  # id(p) -> (p, its strides at its last step)
        self._awaiting_master: Dict[int, Tensor] = {}  # id(p) -> p: see _mark_awaiting_masters
        self._departed_with_state: List[Tensor] = []  # see _forget_departed_params
        self._bulk_adding = True
        defaults = {"maximize": False, "track_rms": False, "bf16_stochastic_round": False,
                    "stochastic_round_seed": 0, "master_weights": False, **defaults}
        # the settings every group holds (a key a user adds to opt.defaults later only fills groups
        # added after, as in torch.optim; the backend is not a group key)
        self._setting_keys = tuple(key for key in defaults if key != "backend")
        try:
            super().__init__(params, defaults)
            self._check_all_overlaps()
        finally:
            self._bulk_adding = False

    # ---- subclass hooks ---------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Raises ValueError on a bad scalar hyper-parameter of ``group`` (run at
        every step: schedulers may write them)."""

    def _check_group_params(self, group: dict) -> None:
        """Checks (and completes) the per-param settings of ``group``; run when the
        group is added or loaded and when its params change."""

    def _default_per_param(self, key: str, group: dict, param: Tensor) -> float:
        """The value of per-param key ``key`` the class gives ``param`` when none is
        given (e.g. Amos's η inferred from the param)."""
        raise NotImplementedError

    def _values_following_params(self, group: dict, old: Optional[GroupPlan]) -> Dict[str, tuple]:
        """Per-param group values (tuples in group['params'] order: Amos's eta,
        ScaledAdamW's init_norm) that follow their params when group['params'] was
        reordered, or params were added or removed, since the last plan (``old``), as
        torch.optim steps each param by itself: a kept param keeps its value, a new
        one gets _default_per_param.  Only for a value the user left as it was (the
        same tuple object): a tuple set anew is taken in the new order.  Returns
        the new tuples by key (nothing is written here)."""
        if old is None:  # (_last_plan_of: no plan of this group, or of a group it replaced)
            return {}
        params = group["params"]
        if len(params) == len(old.params) and all(p is q for p, q in zip(params, old.params)):
            return {}
        moved = {}
        for key in self.per_param_keys:
            value = group.get(key)
            if not (isinstance(value, tuple) and value is old.group_values.get(key)
                    and len(value) == len(old.params)):
                continue
            kept = {id(p): v for p, v in zip(old.params, value)}
            moved[key] = tuple(kept[id(p)] if id(p) in kept else self._default_per_param(key, group, p)
                               for p in params)
        return moved

    def _step_state_keys(self, group: dict) -> Tuple[str, ...]:
        """The state keys (besides 'step') this group's step reads and writes."""
        return self.state_keys

    def _new_state(self, param: Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _stepped_keys(self, group: dict, fp8: bool, master: bool) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(keys, coded): the state keys a step of ``group`` reads and writes for a
        param with FP8 states (``fp8``) or a float32 master (``master``) — its
        algorithm's, then the FP8 absmax keys, then the master's — and the FP8
        states' keys, codes then absmax (() without FP8 states)."""
        keys = self._step_state_keys(group)
        coded: Tuple[str, ...] = ()
        if fp8:
            coded = tuple(k for k in keys if k in self.fp8_state_keys)
            coded += tuple(fp8_states.absmax_key(k) for k in coded)
            keys = keys + coded[len(coded) // 2:]
        if master:
            keys = keys + (MASTER_KEY,)
        return keys, coded

    def _fresh_moment(self, param: Tensor, key: str) -> Optional[Tensor]:
        """The fresh value of state ``key`` of ``param`` (a moment) that _new_state
        makes: zeros like the param; None where the 8-bit classes make FP8 codes
        in its place (optim_fp8), so that no full-precision moment is made first."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def _keeps_fp8(self, param: Tensor) -> bool:
        """Whether this optimizer keeps ``param``'s states as FP8 codes."""
        return bool(self.fp8_state_keys) and not param.is_complex() and fp8_states.keeps_fp8(param)

    def _check_slots(self, where, group: dict, plan: GroupPlan, positions: List[int],
                     lists: Dict[str, List[Tensor]]) -> None:
        """Raises when a slot-shaped state tensor (``lists[key][i]`` of the param at
        ``positions[i]``) has the wrong shape."""

    def _hyper(self, group: dict) -> dict:
        """The group's hyper-parameters under the names of the algorithm's contract
        (amos_fused/contracts.py), flags as bools."""
        raise NotImplementedError

    def _bucket_hyper(self, bucket: Bucket, group: dict) -> dict:
        """``_hyper(group)`` as the step of ``bucket`` reads it (an algorithm may
        read a value in the bucket's dtype, as torch.optim does)."""
        return self._hyper(group)

    def _fused_step(self, ops, bucket: Bucket, group: dict, telemetry: Optional[Tensor] = None,
                    round_keys: Optional[List[int]] = None) -> None:
        """Steps the bucket with one ``ops.step`` call (``ops.step_fp8`` for FP8 states;
        ``ops``: torch.ops.amos_fused, or the Triton ops with the same signatures),
        which fills ``telemetry`` and rounds bfloat16 params stochastically with
        ``round_keys`` when given."""
        low_params = bucket.shadows if bucket.shadows_in_kernel else None
        if self._capturable(group):  # (ops of its own: capturable_ops)
            per_tensor = bucket.per_param[self.per_param_keys[0]] if self.per_param_keys else []
            # GradScaler's tensors on this bucket's device, as torch's capturable steps
            # take them (a device-to-device copy where they live elsewhere)
            scaling = {name: None if t is None else t.to(bucket.device, non_blocking=True)
                       for name, t in self._grad_scaling().items()}
            call_capturable_step(capturable_ops(bucket.backend), self.algorithm, bucket.params, bucket.grads,
                                 bucket.state, bucket.state["step"], self._capturable_hyper(bucket, group), per_tensor,
                                 **scaling)
            return
        per_tensor = bucket.per_param[self.per_param_keys[0]] if self.per_param_keys else []
        coded = self._coded_keys(bucket)
        if coded:
            full = tuple(k for k in self._step_state_keys(group) if k not in coded)
            call_fp8_step(ops, self.algorithm, bucket.params, bucket.grads, bucket.state, bucket.state["step"],
                          self._bucket_hyper(bucket, group), coded, telemetry=telemetry, round_keys=round_keys,
                          low_params=low_params, full_keys=full, per_tensor=per_tensor,
                          **self._host_grad_scaling())
            return
        call_step(ops, self.algorithm, bucket.params, bucket.grads, bucket.state, bucket.state["step"],
                  self._bucket_hyper(bucket, group), per_tensor, telemetry=telemetry, round_keys=round_keys,
                  low_params=low_params, **self._host_grad_scaling())

    def _coded_keys(self, bucket: Bucket) -> Tuple[str, ...]:
        """The keys of the bucket's states stepped as FP8 codes (none for a bucket of
        full-precision states, or when the group's step has no such state: Amos8bit
        without momentum)."""
        return tuple(k for k in self.fp8_state_keys if k in bucket.state) if bucket.fp8 else ()

    def _capturable_hyper(self, bucket: Bucket, group: dict) -> dict:
        """_bucket_hyper for a capturable step: a tensor ``lr`` stays a tensor (read
        on the device), the rest as _bucket_hyper gives it."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            return self._bucket_hyper(bucket, group)
        hyper = self._bucket_hyper(bucket, {**group, "lr": 1.0})  # (nothing but 'lr' may depend on lr: see ScaledAdamW)
        hyper["lr"] = lr
        return hyper

    def _reference_step(self, bucket: Bucket, group: dict) -> None:
        raise NotImplementedError

    def _sums_over_shards(self, param: Tensor, group: dict) -> bool:
        """True when the step of ``param`` (in ``group``) sums over its shards: a
        DTensor param whose step reduces over a sharded dim."""
        return False

    def _reduces_across_shards(self, bucket: Bucket, group: dict) -> bool:
        """True when the bucket's step reduces over a sharded DTensor (then
        ``_sharded_step`` steps it, whatever the backend)."""
        if not bucket.sharded:  # (no DTensor: no per-param walk)
            return False
        return any(self._sums_over_shards(owner, group) for owner in bucket.owners)

    def _split_by_sums(self, index: int, spec: BucketSpec, positions: List[int], plan: GroupPlan,
                       group: dict) -> List[List[int]]:
        """``positions`` (those of a bucket's params with grads) as the buckets to
        gather: the params whose step sums over their shards apart from the rest,
        which the fused kernels step as they would in a group of their own (the
        summing step is eager torch ops, rounding otherwise); none when empty."""
        if not positions:
            return []
        if not spec.dtensor_positions or type(self)._sums_over_shards is FusedOptimizer._sums_over_shards:
            return [positions]
        summing = [i for i in positions if i in spec.dtensor_positions
                   and self._named_sums_over_shards(index, i, plan.params[i], group)]
        if not summing or len(summing) == len(positions):
            return [positions]
        taken = set(summing)
        return [summing, [i for i in positions if i not in taken]]

    def _named_sums_over_shards(self, index: int, position: int, param: Tensor, group: dict) -> bool:
        """``_sums_over_shards``, a refusal of the group's settings (Amos's
        ``reduce_axes``) named by the param, as the plain params' checks name it."""
        try:
            return self._sums_over_shards(param, group)
        except ValueError as error:
            raise ValueError(f"{self._where(index, position, param)}: {error}") from None

    def _params_summed_over_shards(self, refused: bool = False) -> List[Tuple[str, Tensor]]:
        """(where, param) of every param whose step sums over its shards, with a
        grad or not, in group order: the same on every rank that holds them.
        ``refused``: listed for a step this rank's checks refused, as well as its
        settings allow (_tell_the_shards_this_step_raised): a group that is no dict
        of a params list is left out (one this rank alone holds), and a param whose
        settings cannot answer (a bad or deleted reduce_axes: this rank's refusal)
        counts as summing, as it does with every valid setting of a reduced
        sharded dim."""
        if type(self)._sums_over_shards is FusedOptimizer._sums_over_shards:
            return []  # (no per-param walk for the algorithms that never sum)
        found = []
        for index, group in enumerate(self.param_groups):
            params = group.get("params") if isinstance(group, dict) else None
            if refused and not isinstance(params, (list, tuple)):
                continue
            if refused:
                params = [p for p in params if isinstance(p, Tensor)]
            for position in dtensor_positions(params):
                try:
                    sums = self._named_sums_over_shards(index, position, params[position], group)
                except Exception:
                    if not refused:
                        raise
                    sums = True
                if sums:
                    found.append((f"param_groups[{index}]['params'][{position}]", params[position]))
        return found

    def _sharded_step(self, bucket: Bucket, group: dict) -> None:
        raise NotImplementedError

    # ---- construction -----------------------------------------------------
    @property
    def _name(self) -> str:
        return type(self).__name__

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group like torch.optim does, then checks it; a group that fails
        the checks is not kept."""
        explicit_backend = isinstance(param_group, dict) and "backend" in param_group
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        if not explicit_backend:  # (torch.optim copied every default into the group)
            self.param_groups[index].pop("backend", None)
        displaced = self._plans.pop(index, None)  # (the plan of a group moved to this index by a removal)
        if displaced is not None and displaced.group is not None:
            self._plans_by_group = {**self._plans_by_group, id(displaced.group): displaced}
        try:
            self._check_new_group(index, self.param_groups[index])
        except Exception:
            self.param_groups.pop()
            self._plans.pop(index, None)
            raise

    def _check_settings_present(self, index: int, group: dict) -> None:
        """Raises a MissingGroupKey naming the first of the optimizer's settings that
        ``group`` lacks (deleted from it, or from opt.defaults before it was added)."""
        keys = getattr(self, "_setting_keys", None)  # (an optimizer pickled before it was kept)
        if keys is None:
            keys = tuple(key for key in self.defaults if key != "backend")
        missing = [key for key in keys if key not in group]
        if missing:
            default = (f"its default: {self.defaults[missing[0]]!r}" if missing[0] in self.defaults
                       else "opt.defaults holds none")
            raise hp.MissingGroupKey(f"{self._name}: param_groups[{index}] has no {missing[0]!r}; every group "
                                     f"holds each of the optimizer's settings ({default})")

    def _check_new_group(self, index: int, group: dict, adding: bool = True) -> None:
        """Checks a group being added (``adding``) or loaded, whose torch flags are
        this optimizer's own (a capturable=True that Dynamo wrote among them reads
        as a step reads it: _capturable)."""
        self._check_settings_present(index, group)
        self._check_flags(index, group, adding=adding)
        with _naming_group(index):
            check_backend(group_backend(group, self.defaults), self.algorithm, self._name)
        self._checked_group(index, group)
        plan = self._plans[index] = self._make_plan(index, group)
        hyper = self._named_hyper(index, _host_values(group))
        self._check_range(index, group, hyper, plan)  # lr=1e300 for float32 params: refused now, not at step()

    def _named_hyper(self, index: int, group: dict) -> dict:
        """``_hyper(group)``: every value the step reads, converted (nothing may fail
        once a group is written); its errors named by the group."""
        try:
            return self._hyper(group)
        except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as error:
            raise hp.renamed(error, f"{self._name}: param_groups[{index}]: {error}") from None

    def _checked_group(self, index: int, group: dict) -> None:
        """``_check_group(group)``, its errors named by the group."""
        try:
            self._check_group(group)
        except ValueError as error:
            raise hp.renamed(error, f"{self._name}: param_groups[{index}]: {error}") from None

    def _check_flags(self, index: int, group: dict, adding: bool = False) -> None:
        """torch.optim's flags: what we cannot honour is refused, never ignored
        (``adding``: a group being added; a step reads capturable as _capturable)."""
        where = f"{self._name}: param_groups[{index}]"
        for flag in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            try:  # torch's flags, read as torch.optim reads them (None, 0 and 1 too; hyperparams.flag)
                hp.flag(flag, group.get(flag))
            except ValueError as error:
                raise hp.renamed(error, f"{where}: {error}") from None
        if group.get("differentiable"):
            raise ValueError(f"{where}: differentiable=True is not supported (the steps do not "
                             "record autograd history); use torch.optim for differentiable optimizers")
        if group.get("capturable") if adding else self._capturable(group):
            with _naming_group(index):
                self._check_capturable(group)
        if group.get("fused") and group_backend(group, self.defaults) == "reference":
            raise ValueError(f"{where}: fused=True contradicts backend='reference'")
        chosen = group.get("backend", self.defaults.get("backend"))
        if group_backend(group, self.defaults) == "reference" and chosen not in (None, "reference"):
            # (fused=False alone means the reference: a backend named beside it is not silently dropped)
            raise ValueError(f"{where}: fused=False (the reference step) contradicts backend={chosen!r}")
        if adding and self.torch_refuses_with_foreach and group.get("fused") and group.get("foreach"):
            # (torch's constructor's error; its step takes the pair, as the fused step, and so does this one)
            raise RuntimeError(f"{where}: `fused` and `foreach` cannot be `True` together")
        if self.torch_refuses_with_foreach and group.get("foreach") and not self._capturable(group):
            # torch.optim refuses these (its foreach step cannot take them), so a checkpoint
            # saved with them would not step there
            betas = group.get("betas")
            tensors = [("lr", group.get("lr"))] + ([(f"betas[{i}]", b) for i, b in enumerate(betas)]
                                                   if isinstance(betas, (tuple, list)) else [])
            for name, value in tensors:
                if isinstance(value, Tensor):  # (lr: torch.optim's step raises a RuntimeError)
                    kind = hp.StepRefusedTensorError if name == "lr" else ValueError
                    raise kind(f"{where}: {name} as a Tensor is not supported with foreach=True and "
                               "capturable=False (as in torch.optim)")
        for flag in ("track_rms", "bf16_stochastic_round", "master_weights"):  # ours: True or False
            if not isinstance(group.get(flag, False), bool):
                raise ValueError(f"{where}: {flag} must be True or False, "
                                 f"got {group[flag]!r}")
        if group.get("master_weights") and group.get("bf16_stochastic_round"):
            raise ValueError(f"{where}: master_weights=True and bf16_stochastic_round=True exclude each "
                             "other (with float32 master weights the param is the master rounded to nearest)")
        seed = group.get("stochastic_round_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"{where}: stochastic_round_seed must be an int in [0, 2**31), got {seed!r}")

    def _capturable(self, group: dict) -> bool:
        """Whether ``group`` steps capturably (its ``capturable`` flag), as a step reads
        it.  On a group of CPU params whose backend has no capturable step, a True
        written after the group was added (when the constructor and add_param_group
        refuse it) reads as False: torch.compile's Dynamo writes capturable=True into
        the groups of a compiled function that edits a group (its traced copy of a
        torch.optim optimizer's groups holds True, and it writes that copy back), and
        torch.optim's compiled step takes it there as a host step.  (Read where a step
        runs, once per bucket or param: the first param tells the group's device, as
        a group mixing devices is refused.)"""
        if not group.get("capturable"):
            return False
        if group_backend(group, self.defaults) in CAPTURABLE_BACKENDS:
            return True
        params = group.get("params")
        first = params[0] if isinstance(params, (list, tuple)) and params else None
        return not (isinstance(first, Tensor) and local(first).device.type == "cpu")

    def _check_capturable(self, group: dict) -> None:
        """capturable=True (torch's flag: a step that reads nothing on the host, so it
        can be captured in a CUDA graph) runs on the CUDA or the Triton backend,
        whose capturable steps keep their counters and coefficients on the device
        (amos_fused/capturable.py, device_coefficients.py); the rest is refused,
        never ignored."""
        refuse = None
        if self.fp8_state_keys:
            refuse = "8-bit states"
        elif group.get("track_rms"):
            refuse = "track_rms=True (rms() reads the sums on the host)"
        elif group.get("bf16_stochastic_round"):
            refuse = "bf16_stochastic_round=True (its hash takes the step count on the host)"
        if refuse is not None:
            raise ValueError(f"{self._name}: capturable=True is not supported with {refuse}")
        for device in {p.device for p in group["params"]}:
            capturable_backend(group_backend(group, self.defaults), device, self._name)

    def _where(self, index: int, position: int, param: Tensor) -> str:
        return (
            f"{self._name}: param_groups[{index}]['params'][{position}] "
            f"({param.dtype}, shape {tuple(param.shape)}, on {param.device})"
        )

    def _make_plan(self, index: int, group: dict) -> GroupPlan:
        """Checks a group's params (dtypes, devices, memory overlap with every other
        param, per-param settings) and splits them into buckets."""
        params = group["params"]
        for position, p in enumerate(params):
            if torch.nn.parameter.is_lazy(p):  # (its dtype, size and memory decide its bucket and checks)
                raise ValueError(f"{self._name}: param_groups[{index}]['params'][{position}] is an uninitialized "
                                 "parameter of a lazy module (torch.nn.LazyLinear, …); run a forward pass to "
                                 "materialize it before making the optimizer")
            if p.layout != torch.strided:
                raise TypeError(f"{self._name}: param_groups[{index}]['params'][{position}] is a {p.layout} "
                                "tensor; only dense (strided) params can be stepped")
            if p.is_complex() and not self.supports_complex:
                raise TypeError(f"{self._where(index, position, p)}: {self._name} does not support "
                                "complex params (its per-tensor reductions have no complex form)")
        devices = sorted({str(p.device) for p in params})
        if len(devices) > 1:
            raise ValueError(
                f"{self._name}: param_groups[{index}] mixes devices {devices}; "
                "put the params of each device in a param group of their own"
            )
        if not self._bulk_adding:  # (else checked once when all groups are in: _check_all_overlaps)
            self._check_no_overlap([(i, pos, p) for i, g in enumerate(self.param_groups)
                                    for pos, p in enumerate(params if i == index else g["params"])])
        moved = self._values_following_params(group, self._last_plan_of(index, group))
        before = {key: group[key] for key in moved}
        group.update(moved)
        try:
            self._check_group_params(group)
        except ValueError as error:  # (per-param settings: one value per param, in group['params'] order)
            group.update(before)  # (a raising step changes nothing)
            if isinstance(error, ParamValueError):
                raise ValueError(f"{self._where(index, error.position, params[error.position])}: {error}") from None
            raise hp.renamed(error, f"{self._name}: param_groups[{index}]: {error}") from None
        plan = GroupPlan.build(params, self._keeps_fp8, group.get("master_weights", False))
        plan.group_values = {key: group.get(key) for key in self.per_param_keys}
        plan.group = group
        self._members_changed = True
        return plan

    def _last_plan_of(self, index: int, group: dict) -> Optional[GroupPlan]:
        """The plan last made for ``group`` (the dict): kept under its index, or under
        another one when groups were reordered, removed or inserted since (the plans
        as they were when this step began, before it replaced any); for a copy of a
        group put in the place of its dict, the plan of the group it copies."""
        plan = self._plans.get(index)
        if plan is not None and plan.group is group:
            return plan
        plans = list(self._plans_before_step.values()) + list(self._plans.values()) + \
            list(self._plans_by_group.values())
        for plan in plans:
            if plan.group is group:
                return plan
        # a copy of a group ({**g, 'params': …}) put in its place or anywhere else, its dict in no group any
        # more: the plan of the group whose per-param values (the same tuple) the copy holds
        # (and params in common: groups may share one tuple; the plan with the most params in common)
        shared = [group.get(key) for key in self.per_param_keys if isinstance(group.get(key), tuple)]
        params = group.get("params")
        mine = {id(p) for p in params} if isinstance(params, (list, tuple)) else set()
        best, most = None, 0
        for plan in plans:
            if any(value is plan.group_values.get(key) for key in self.per_param_keys for value in shared) \
                    and not any(plan.group is g for g in self.param_groups):
                common = len(mine & {id(p) for p in plan.params})
                if common > most:
                    best, most = plan, common
        if best is not None:
            return best
        # a copy of the group this index held, put in its place (opt.param_groups[i] = {**g, 'params': …}):
        # that group's plan, when its dict is in no group any more (else it is another group's, moved)
        plan = self._plans_before_step.get(index) or self._plans.get(index)
        if plan is not None and not any(plan.group is g for g in self.param_groups):
            return plan
        return None

    def _check_all_overlaps(self) -> None:
        self._check_no_overlap([(i, pos, p) for i, g in enumerate(self.param_groups)
                                for pos, p in enumerate(g["params"])])

    def _check_no_overlap(self, everyone: List[Tuple[int, int, Tensor]]) -> None:
        """Raises when two params ((group index, position, param) triples) share memory."""
        clash = first_overlap([local(p) for _, _, p in everyone])
        if clash is not None:
            (gi, pi, _), (gj, pj, q) = everyone[clash[0]], everyone[clash[1]]
            raise ValueError(f"{self._where(gj, pj, q)} shares memory with param_groups[{gi}]"
                             f"['params'][{pi}]; overlapping params cannot be stepped")

    def _check_swaps(self) -> None:
        """Raises when params were made to share memory since the last check (a
        ``p.data = …`` swap keeps the plans, which checked overlap when made).  The
        params' addresses, sizes and strides are compared with the last check's; the
        full check runs only when they changed."""
        params = [p for g in self.param_groups for p in g["params"]]
        if dtensor_positions(params):
            params = [local(p) for p in params]
        signature = _C.layout_signature(params)  # (one C++ pass, no dispatcher: per param cost matters here)
        if signature == getattr(self, "_checked_layouts", None):
            return
        self._check_all_overlaps()
        self._checked_layouts = signature

    def _check_own_memory(self, ready: List[Optional[_Ready]]) -> None:
        """Raises when a tensor the step writes (a param, its master, a state, a
        step counter) shares memory with another tensor of the step other than
        through the grads (which may share memory with each other, and are only
        read): one param's state given to another, a counter viewing an absmax.
        torch.optim, stepping param by param, would then read one param's writes
        in the next one's step; the fused kernels step them in parallel, so the
        result would depend on the thread count.  (Sharing among one param's own
        tensors is named by its bucket's check already, with its own message.)"""
        written: List[Tensor] = []
        read: List[Tensor] = []
        for item in ready:
            for bucket in item.buckets if item is not None else ():
                written.extend(bucket.shadows or bucket.params)  # (masters: in bucket.state)
                for values in bucket.state.values():
                    written.extend(values)
                read.extend(bucket.held_grads)
        first, second = _C.first_written_overlap(written + read, len(written))  # (the op's check, no dispatcher)
        if first < 0:
            return
        # (where, short name, what) of each tensor, in the order of written + read
        names: List[Tuple[str, str, str]] = []
        grads: List[Tuple[str, str, str]] = []
        for index, item in enumerate(ready):
            for bucket in item.buckets if item is not None else ():
                owners = [(self._where(index, pos, p), f"param_groups[{index}]['params'][{pos}]")
                          for pos, p in zip(bucket.positions, bucket.owners)]
                names.extend((where, short, "the param") for where, short in owners)
                for key in bucket.state:
                    names.extend((where, short, f"state[{key!r}]") for where, short in owners)
                grads.extend((where, short, "the grad") for where, short in owners)
        names.extend(grads)
        (_, short, what), (where, other, other_what) = names[first], names[second]
        if short == other and "the grad" not in (what, other_what):  # (a master on its own param's memory)
            raise ValueError(f"{where}: {other_what} shares memory with {what} of the same param; every tensor "
                             "a step writes needs memory of its own")
        if short == other:  # (a grad that is its own param's memory: the bucket checks name the rest)
            raise ValueError(f"{where}: {other_what} shares memory with {what} of the same param; a step "
                             "reads the grad while it writes the param, so the grad needs memory of its own "
                             "(torch.optim's for-loop and fused steps would give different results)")
        raise ValueError(f"{where}: {other_what} shares memory with {what} of {short}; every tensor a step "
                         "writes needs memory of its own (the params are stepped in parallel: the result "
                         "would depend on their order and on the thread count)")

    # ---- step -------------------------------------------------------------
    # torch.optim's own way to keep Dynamo out (imports torch._dynamo lazily, at the first call).
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.  Every group's inputs are checked
        before anything is written: a step that raises changes nothing.

        Under ``torch.compile`` the step runs eagerly, as one opaque call: its
        checks and state reads are host-side Python, and its hyper-parameters
        (a changing ``lr``) reach the kernels as numbers, so a scheduler never
        causes a recompile."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._holds_fake_params():
            self._fake_step()
            return loss
        # what preparing may write (per-param values re-inferred or following their
        # params, plans), put back when any group's checks fail
        kept = [(group, {key: group[key] for key in self.per_param_keys if key in group})
                for group in self.param_groups]
        plans = self._plans_before_step = dict(self._plans)
        self._replaced_steps = {}
        summing, waiting = None, False
        try:
            if not isinstance(self.state, dict):
                raise TypeError(f"{self._name}: state must be a dict of param -> dict, got "
                                f"{type(self.state).__name__}")
            ready, first_index = [], 0
            for index, group in enumerate(self.param_groups):
                ready.append(self._prepare(index, group, first_index))
                first_index += len(group["params"])
            self._check_swaps()
            self._check_own_memory(ready)
            self._check_grad_scaling()
            self._check_no_cloning_mode(ready)
            collective = [(item, bucket) for item in ready if item is not None for bucket in item.buckets
                          if self._reduces_across_shards(bucket, item.group)]
            summing = self._params_summed_over_shards()  # (grads or not: the same on every rank)
            if summing:  # every rank's checks passed before any rank writes (a rank whose checks
                taken = {id(p) for _, bucket in collective for p in bucket.owners}  # raised tells the others)
                waiting = True
                wait_for_every_shard(_process_groups([p for _, p in summing]), self._grad_scaling()["found_inf"],
                                     self._name, [(where, mesh_groups(p), id(p) in taken) for where, p in summing])
        except BaseException as error:
            for group, values in kept:
                if isinstance(group, dict):  # (a user's non-dict entry: the error names it)
                    group.update(values)
            self._plans = plans
            if not waiting and isinstance(error, Exception):
                self._tell_the_shards_this_step_raised(summing)
            raise
        finally:
            self._plans_before_step = {}
            self._replaced_steps = {}
        self._step_host_scaling = None  # (read afresh by this step: _host_grad_scaling)
        try:
            # the buckets summed over shards first: a sum that fails then finds the others unwritten
            # (a bucket's new states, which its step reads from the bucket, are stored once it stepped)
            summed = {id(bucket) for _, bucket in collective}
            in_order = collective + [(item, bucket) for item in ready if item is not None for bucket in item.buckets
                                     if id(bucket) not in summed]
            for n, (item, bucket) in enumerate(in_order):
                self._run_bucket(item, bucket, summed_over_shards=n < len(collective))
            self._unscale_stepped_grads(ready)
        finally:
            self._step_host_scaling = None
        if self._members_changed or any(i >= len(self.param_groups) for i in self._plans) or \
                any(p not in self.state for p in self._departed_with_state):
            self._forget_departed_params()
        return loss

    def _check_no_cloning_mode(self, ready: List[Optional[_Ready]]) -> None:
        """Inside torch.autograd.graph.allow_mutation_on_saved_tensors(), whose
        dispatch mode clones what an op writes by reading the op's arguments by
        their schema positions (it cannot read the step ops' optional written
        arguments, absent or None), only the reference backend steps: a fused
        bucket is refused here, before anything is written."""
        if not getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False):
            return  # (set while any thread is inside the context; the mode is this thread's)
        if not _cloning_mode_in_this_thread():
            return
        for index, item in enumerate(ready):  # (one per group)
            for bucket in item.buckets if item is not None else ():
                if bucket.backend != "reference":
                    raise RuntimeError(
                        f"{self._name}: param_groups[{index}]: the {bucket.backend!r} "
                        "backend's fused step cannot run inside torch.autograd.graph."
                        "allow_mutation_on_saved_tensors() (its mode cannot clone the op's optional written "
                        "arguments); step that group with backend='reference' there, or outside it")

    def _tell_the_shards_this_step_raised(self, summing: Optional[List[Tuple[str, Tensor]]]) -> None:
        """After this rank's checks refused the step: the other ranks whose step sums
        over shards with this one wait for every rank before writing anything
        (wait_for_every_shard); this rank takes part in that wait with its refusal,
        so that they raise too instead of waiting until the process group's timeout.
        Every rank whose checks raised comes here, so the collectives match.  An
        optimizer too broken to list those params (``summing``: the list when the
        step got that far) tells no one; the caller raises its own error."""
        try:
            if summing is None:
                summing = self._params_summed_over_shards(refused=True)
            if summing:
                wait_for_every_shard(_process_groups([p for _, p in summing]), None, self._name,
                                     [(where, mesh_groups(p), False) for where, p in summing], refused=True)
        except Exception:  # (the error that refused the step is the one to raise)
            pass

    def _holds_fake_params(self) -> bool:
        """Whether this is a step of FakeTensors: a FakeTensorMode is active, or the
        first param is fake (a real first param: the real step, which refuses the
        fake ones)."""
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return True
        for group in self.param_groups:
            params = group.get("params") if isinstance(group, dict) else None
            if isinstance(params, (list, tuple)) and params and isinstance(params[0], Tensor):
                return is_fake(params[0])
        return False

    def _fake_step(self) -> None:
        """A step of FakeTensors, which have shapes, dtypes and devices but no memory
        or values (torch's FakeTensorMode, under which memory estimators such as
        torch.distributed._tools.mem_tracker run a training step): every group's
        settings, and each stepped param's grad and existing states, are checked
        as a real step checks their metadata, before anything is made; then each
        param with a grad gets the state a real step makes for it (its keys,
        dtypes, shapes and devices: FP8 codes and absmax, a float32 master) and its
        counter advances, as torch.optim's step makes and advances them there.
        Nothing else is computed: fake tensors have no values to compute with.  A
        real param with a grad among them is refused (a step takes fake params or
        real ones)."""
        for index, group in enumerate(self.param_groups):
            self._checked_settings(index, group)
        stepped = []
        for index, group in enumerate(self.param_groups):
            like_keys = [k for k in self._step_state_keys(group) if k not in self.slot_keys]
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = self._where(index, position, p)
                if not is_fake(p):
                    raise ValueError(f"{where}: a real param in a step of FakeTensor params (FakeTensorMode); a "
                                     "step takes fake params or real ones, not both")
                self._check_fake_param(where, p, like_keys)
                stepped.append((index, position, p, group))
        for index, position, p, group in stepped:
            master = has_master(p, group.get("master_weights", False))
            keys, _ = self._stepped_keys(group, self._keeps_fp8(p), master)
            st = self.state.setdefault(p, {})
            try:
                changes = self._state_changes(p, st, group, keys, master)
            except ValueError as error:
                raise ValueError(f"{self._where(index, position, p)}: {error}") from None
            for key, value in changes.items():
                if value is None:
                    st.pop(key, None)
                else:
                    st[key] = value
            if isinstance(st.get("step"), Tensor):  # (a real counter too, made outside the mode)
                st["step"].add_(1)

    def _check_fake_param(self, where: str, p: Tensor, like_keys: List[str]) -> None:
        """The metadata checks of a real step's bucket for fake param ``p``: its grad
        (dense, the param's dtype, device and shape), its state a dict whose
        param-shaped states have the param's shape."""
        grad = p.grad
        if grad.is_sparse or grad.layout != torch.strided:
            raise step_error(where, Problem.GRAD_SPARSE, p, grad=grad)
        if grad.dtype != p.dtype:
            raise step_error(where, Problem.GRAD_DTYPE, p, grad=grad)
        if grad.device != p.device:
            raise step_error(where, Problem.GRAD_DEVICE, p, grad=grad)
        if grad.shape != p.shape:
            raise step_error(where, Problem.GRAD_SHAPE, p, grad=grad)
        st = self.state.get(p, _ABSENT)
        if st is _ABSENT:
            return
        if not isinstance(st, dict):
            raise ValueError(f"{where}: its state must be a dict, got {type(st).__name__} {st!r:.60}")
        for key in like_keys:
            value = st.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.shape != p.shape):
                shown = (f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__)
                raise ValueError(f"{where}: state[{key!r}] ({shown}) must have the param's shape "
                                 f"{tuple(p.shape)}")

    def _forget_departed_params(self) -> None:
        """Drops what the caches hold of params that left the optimizer (in no group
        and without state: torch.optim keeps nothing of them either) — their last
        layouts and write marks, their telemetry (out of every group), the plans of
        removed groups — so that they can be freed.  Run after a step whose plans
        changed."""
        self._members_changed = False
        self._plans = {i: plan for i, plan in self._plans.items() if i < len(self.param_groups)}
        self._plans_by_group = {}  # (every group has a plan after a step)
        in_groups = {id(p) for group in self.param_groups for p in group["params"]}
        kept = in_groups | {id(p) for p in self.state}
        self._layouts = {key: entry for key, entry in self._layouts.items() if key in kept}
        self._master_marks.keep(kept)
        self._telemetry.keep(in_groups)
        self._awaiting_master = {key: p for key, p in self._awaiting_master.items() if key in kept}
        # the params in no group still held for their state: forgotten at the first step after their
        # state is deleted, which changes no plan
        self._departed_with_state = [p for p in self.state if isinstance(p, Tensor) and id(p) not in in_groups]

    def _unscale_stepped_grads(self, ready: List[Optional[_Ready]]) -> None:
        """As torch's fused optimizers leave them: after a step that ran with
        GradScaler's ``grad_scale``, every stepped param's grad is divided by it in
        place (the kernels read the scaled grads and unscale them in registers); a
        step skipped for ``found_inf`` leaves the grads scaled.  Host steps read
        found_inf on the host already; capturable ones divide on the device by 1 or
        the scale, reading nothing."""
        scaling = self._grad_scaling()
        if scaling["grad_scale"] is None:
            return
        host: List[Tensor] = []
        on_device: Dict[torch.device, List[Tensor]] = {}
        seen: set = set()
        for item in ready:
            if item is None:
                continue
            grads = [p.grad for bucket in item.buckets for p in bucket.owners if p.grad is not None]
            # a grad two params share: once; a ZeroTensor's zeros need no unscaling (and it has no memory to write)
            grads = [g for g in grads if id(g) not in seen and not seen.add(id(g)) and not g._is_zerotensor()]
            if self._capturable(item.group):
                for g in grads:
                    on_device.setdefault(local(g).device, []).append(g)
            else:
                host.extend(grads)
        if host:
            values = self._host_grad_scaling()
            if values["found_inf"] is None or float(values["found_inf"]) == 0.0:
                with torch.inference_mode():  # (which also writes a grad made under inference_mode)
                    # g·(1/s), the unscaled grad the kernels and the reference stepped with (as torch's
                    # unscale_ leaves it; the same as g/s for GradScaler's power-of-two scales)
                    scale = float(values["grad_scale"])
                    _multiply_grads(host, 1.0 / scale if scale != 0.0 else math.copysign(math.inf, scale))
        for device, grads in on_device.items():
            # g·(1/s) as the capturable kernels read it (device_coefficients: 1/s in float64), or 1 when skipped
            inverse = 1.0 / scaling["grad_scale"].to(device, torch.float64, non_blocking=True).reshape(())
            found_inf = scaling["found_inf"]
            if found_inf is not None:
                inverse = torch.where(found_inf.to(device, non_blocking=True).reshape(()) != 0,
                                      torch.ones_like(inverse), inverse)
            with torch.inference_mode():
                _multiply_grads(grads, inverse)

    def _plan(self, index: int, group: dict, rebuild: bool) -> GroupPlan:
        plan = self._plans.get(index)
        reinfer = any(key in group and group[key] is None for key in self.per_param_keys)  # (None: inferred anew)
        if (rebuild or reinfer or plan is None or plan.group is not group
                or not plan.matches(group["params"], group.get("master_weights", False))):
            plan = self._plans[index] = self._make_plan(index, group)
        return plan

    def _prepare(self, index: int, group: dict, first_index: int, rebuild: bool = False) -> Optional[_Ready]:
        """Checks group ``index`` (whose first param is the optimizer's
        ``first_index``-th) and gathers its buckets; None when nothing to step."""
        hyper = self._checked_settings(index, group)
        plan = self._plan(index, group, rebuild)
        self._check_range(index, group, hyper, plan, stepping=True)
        grads = ([placed_like(p, p.grad) for p in plan.params] if plan.has_dtensors
                 else [p.grad for p in plan.params])
        buckets: List[Bucket] = []
        new_states: List[Tuple[Tensor, dict]] = []
        try:
            for spec in plan.specs:
                positions = [i for i in spec.positions if grads[i] is not None]
                for part in self._split_by_sums(index, spec, positions, plan, group):
                    buckets.append(self._gather(index, group, plan, spec, part, grads, new_states))
        except _StalePlan:
            if rebuild:
                raise RuntimeError("amos_fused: a param's dtype or device is not stable")  # pragma: no cover
            return self._prepare(index, group, first_index, rebuild=True)
        return _Ready(group, buckets, new_states, first_index) if buckets else None

    def _checked_settings(self, index: int, group: dict) -> dict:
        """Checks group ``index``'s form (a dict of the optimizer's settings and a
        list of tensors), its flags, backend and hyper-parameters; returns the
        hyper-parameters, named."""
        if not isinstance(group, dict):
            raise TypeError(f"{self._name}: param_groups[{index}] must be a dict, as add_param_group makes it, got "
                            f"{type(group).__name__}")
        if "params" not in group:
            raise hp.MissingGroupKey(f"{self._name}: param_groups[{index}] has no 'params'")
        if not isinstance(group["params"], (list, tuple)):  # (a set has no order; a generator, one pass)
            raise TypeError(f"{self._name}: param_groups[{index}]['params'] must be a list of tensors, as "
                            f"add_param_group makes it, got {type(group['params']).__name__}")
        for position, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"{self._name}: param_groups[{index}]['params'][{position}] must be a tensor, got "
                                f"{type(p).__name__} {p!r:.40}")
        self._check_settings_present(index, group)
        self._check_flags(index, group)
        # (a group's backend may be set anew)
        with _naming_group(index):
            check_backend(group_backend(group, self.defaults), self.algorithm, self._name)
        checked = _host_values(group)
        self._checked_group(index, checked)
        return self._named_hyper(index, checked)

    def _derived_hyper(self, hyper: dict, plan: GroupPlan, stepping: bool) -> Dict[str, float]:
        """Per-step values derived from the hyper-parameters (and the step counts of
        ``plan``'s params: those a step steps, ``stepping``, else all), named by their
        formula, that the kernels take in the step's dtype too (_check_range)."""
        return {}

    def _check_range(self, index: int, group: dict, hyper: dict, plan: GroupPlan, stepping: bool = False) -> None:
        """A finite hyper-parameter beyond float32's range (lr=1e300) is refused for a
        group with params of a narrower dtype than float64, whose step computes in
        float32: the kernels would store it as Inf, the reference could not convert it.
        ``stepping``: checked by a step (whose params with a grad are those it steps),
        not when the group is added or loaded."""
        self._check_reciprocals(index, hyper, plan)
        dtypes = [spec.dtype for spec in plan.specs if spec.dtype not in (torch.float64, torch.complex128)]
        if not dtypes:
            return
        limit = torch.finfo(torch.float32).max
        named = {name: (value, dtypes[0]) for name, value in hyper.items()}
        checked = plan.cache.setdefault("per_param_in_range", {})  # key -> the tuple last found in range
        wide = (torch.float64, torch.complex128)
        for key in self.per_param_keys:  # (Amos's eta, ScaledAdamW's init_norm: one value or one per param)
            values = self._per_param_value(group.get(key))
            if isinstance(values, (tuple, list)):
                # (a tuple is checked once, not at every step; a list, which may be edited in place, always,
                # and so is a tuple holding a tensor, which may be too; each entry in the dtype its own
                # param steps in)
                if isinstance(values, list) or checked.get(key) is not values or _holds_tensor(values):
                    named.update((f"{key}[{j}] (param_groups[{index}]['params'][{j}]'s)", (_as_float(v), dtype))
                                 for j, (v, dtype) in enumerate(zip(values, plan.dtypes)) if dtype not in wide)
            else:
                named[key] = (_as_float(values), dtypes[0])
        for name, (value, dtype) in named.items():
            if isinstance(value, float) and math.isfinite(value) and abs(value) > limit:
                raise ValueError(f"{self._name}: param_groups[{index}]: Invalid {name}: {value} (beyond float32's "
                                 f"range, in which the step of {dtype} params computes)")
            if name.split("[")[0] in self.positive_in_step and isinstance(value, float) and 0.0 < value <= 2.0 ** -150:
                raise ValueError(f"{self._name}: param_groups[{index}]: Invalid {name}: {value} (positive, but 0 in "
                                 f"float32, in which the step of {dtype} params computes)")
        checked.update((key, group.get(key)) for key in self.per_param_keys
                       if isinstance(group.get(key), tuple) and not _holds_tensor(group.get(key)))
        for name, value in self._derived_hyper(hyper, plan, stepping).items():  # (from values in range: an Inf overflowed)
            if not abs(value) <= limit:
                raise ValueError(f"{self._name}: param_groups[{index}]: Invalid {name}: {value} (beyond float32's "
                                 f"range, in which the step of {dtypes[0]} params computes)")

    def _check_reciprocals(self, index: int, hyper: dict, plan: GroupPlan) -> None:
        """A value of ``reciprocal_in_step`` (positive by its group check) is refused
        where its reciprocal overflows the dtype the step computes in (float64 for
        float64 params, else float32): Amos's r = (1 − β^t)/max(v, ε) would be Inf
        for a slot below ε, and a zero grad's Inf·0 a NaN in θ and b for good."""
        for name in self.reciprocal_in_step:
            value = hyper.get(name)
            if not (isinstance(value, float) and value > 0.0):
                continue
            for dtype in sorted({torch.float64 if spec.dtype in (torch.float64, torch.complex128) else torch.float32
                                 for spec in plan.specs}, key=str):
                if not torch.isfinite(torch.tensor(value, dtype=dtype, device="cpu").reciprocal()):
                    smallest = 1.0 / torch.finfo(dtype).max
                    if float(torch.tensor(smallest, dtype=dtype, device="cpu")) == 0.0:  # (subnormals flushed:
                        smallest = torch.finfo(dtype).tiny  # torch.set_flush_denormal(True))
                    raise ValueError(f"{self._name}: param_groups[{index}]: Invalid {name}: {value} (its "
                                     f"reciprocal overflows {dtype}, in which the step of such params computes: "
                                     f"it must be at least about {smallest:.4g})")

    def _gather(self, index: int, group: dict, plan: GroupPlan, spec: BucketSpec,
                positions: List[int], all_grads: List[Optional[Tensor]],
                new_states: List[Tuple[Tensor, dict]]) -> Bucket:
        """The bucket of ``positions`` for this step, read from the params, their
        grads and ``self.state``, and checked (one C++ pass); state that does not
        exist yet is made (not stored: see _run)."""
        owners = [plan.params[i] for i in positions]
        if self.fp8_state_keys and any(self._keeps_fp8(p) != spec.fp8 for p in owners):
            raise _StalePlan()
        if spec.master_of is not None and any(p.dtype != spec.master_of for p in owners):
            raise _StalePlan()
        grads = [all_grads[i] for i in positions]
        held_grads = [local(g) for g in grads] if spec.dtensor_positions else grads
        master = spec.master_of is not None
        keys, coded = self._stepped_keys(group, spec.fp8, master)
        states = []
        state_of = self.state
        settled = self._settled_state(group, keys, master, spec.fp8)
        resharded = bool(spec.dtensor_positions and self.fp8_state_keys)
        for i, p in enumerate(owners):
            st = state_of.get(p, _ABSENT)  # (one lookup: a tensor key's hash is a Python call)
            if st is _ABSENT:
                st = {}
            if resharded and is_dtensor(p) and isinstance(st, dict):  # FP8 states moved from another placement
                switched = fp8_states.switched_precision(p, st, self.fp8_state_keys, spec.fp8,
                                                         torch.float32 if master else p.dtype)
                if switched:
                    new_states.append((p, switched))
                    st = {k: v for k, v in {**st, **switched}.items() if v is not None}
            if settled(p, st):  # the common case: nothing to make, convert or move
                states.append(st)
                continue
            if not isinstance(st, dict):
                raise ValueError(f"{self._where(index, positions[i], p)}: its state must be a dict, got "
                                 f"{type(st).__name__} {st!r:.60}")
            pair = fp8_states.unpaired(st, coded[:len(coded) // 2]) if coded else None
            if pair is not None:
                raise _unpaired_fp8_error(self._where(index, positions[i], p), st, pair, coded[:len(coded) // 2])
            try:  # (new state made for p's shape: Amos's slots for its reduce_axes)
                changes = self._state_changes(p, st, group, keys, master)
            except ValueError as error:
                raise ValueError(f"{self._where(index, positions[i], p)}: {error}") from None
            if "step" in changes and isinstance(st.get("step"), Tensor):
                self._check_replaced_step(self._where(index, positions[i], p), p, st["step"])
            if changes:
                new_states.append((p, changes))
                st = {k: v for k, v in {**st, **changes}.items() if v is not None}
            states.append(st)
        like_keys = [k for k in keys if k not in self.slot_keys and k not in coded and k != MASTER_KEY]
        slot_keys = [k for k in keys if k in self.slot_keys]
        lists = {k: [st[k] for st in states] for k in ("step",) + tuple(keys)}
        where = lambda i: self._where(index, positions[i], owners[i])  # noqa: E731
        for key in ("step",) + tuple(keys):
            if key == MASTER_KEY or all(map(isinstance, lists[key], repeat(Tensor))):  # (master: master_problem)
                continue
            for i, t in enumerate(lists[key]):
                if not isinstance(t, Tensor):
                    if key == "step":
                        raise step_error(where(i), Problem.STEP, owners[i], tensor=t)
                    raise ValueError(f"{where(i)}: state[{key!r}] must be a tensor, got {type(t).__name__} {t!r:.60}")
        self._check_slots(where, group, plan, positions, lists)
        if spec.dtensor_positions:
            self._place_like_params(where, owners, lists, keys, new_states, group)
        params, shadows = owners, []
        if master:  # the kernels step the float32 masters; the params are written from them
            for i, m in enumerate(lists[MASTER_KEY]):
                problem = master_problem(owners[i], m)
                if problem is not None:
                    raise ValueError(f"{where(i)}: state {MASTER_KEY!r} {problem}")
            params, shadows = list(lists[MASTER_KEY]), list(owners)
        if spec.dtensor_positions:  # the kernels and the reference step the local shards
            params, grads, shadows = [local(p) for p in params], [local(g) for g in grads], [local(p) for p in shadows]
            for key in keys:
                lists[key] = [local(t) for t in lists[key]]
            for key in coded[len(coded) // 2:]:  # the kernels see each absmax as one row of blocks
                lists[key] = [t.view(-1) if t.is_contiguous() else t for t in lists[key]]
        if spec.complex_positions:
            params, grads = list(params), list(grads)
            for i, pos in enumerate(positions):
                if pos in spec.complex_positions:
                    if not owners[i].is_complex():  # p.data set to a real tensor since the plan was made
                        raise _StalePlan()
                    params[i], grads[i] = self._real_views(where(i), params[i], grads[i], lists, like_keys, i)
        capturable = self._capturable(group)
        if capturable:
            if spec.dtensor_positions:
                raise ValueError(f"{self._name}: param_groups[{index}]: capturable=True is not supported for "
                                 "sharded (DTensor) params")
            with _naming_group(index):
                backend = capturable_backend(group_backend(group, self.defaults), spec.device, self._name)
            lr = group["lr"]
            if isinstance(lr, Tensor) and (lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool
                                           or lr.device != spec.device):
                raise ValueError(f"{self._name}: param_groups[{index}]['lr'] must be a number or a one-element "
                                 f"real tensor on the params' device ({spec.device}) with capturable=True, got "
                                 f"{lr.dtype} {tuple(lr.shape)} on {lr.device}")
        else:
            backend = backend_for(group_backend(group, self.defaults), self.algorithm, spec.device, self._name,
                                  fp8=bool(coded))
        walk = Walk.ANY if backend == "reference" else (
            Walk.CONTIGUOUS if self.fused_needs_contiguous else Walk.DENSE)
        shown = lists  # the states as the user holds them, for the checks' messages
        if walk == Walk.CONTIGUOUS:
            params, grads = list(params), list(grads)
            shown = {key: list(column) for key, column in lists.items()}
            for i, p in enumerate(params):
                if not p.is_contiguous():
                    if shadows:
                        shadows[i] = shadows[i].permute(memory_order(p))
                    self._to_memory_order(i, params, grads, lists, keys)
        shadows_in_kernel = False
        host_steps = lists["step"]
        if capturable:  # float32 counters on the params' device (the C++ check takes host ones)
            host_steps = []
            for i, s in enumerate(lists["step"]):
                if not (s.numel() == 1 and s.dtype == torch.float32 and s.device == params[i].device):
                    raise ValueError(f"{where(i)}: state['step'] must be a one-element float32 tensor on "
                                     f"{params[i].device} with capturable=True, got {s.dtype} {tuple(s.shape)} "
                                     f"on {s.device}")
        if master:  # the grads belong to the low-precision params
            grads = self._checked_grads(where, owners, shadows, list(grads), all_grads, positions, host_steps, walk,
                                        backend=backend)
            shadows_in_kernel = writes_low_params(backend, self.algorithm, spec.fp8)
            if not shadows_in_kernel:  # the kernels step float32 grads; the params are copied after
                grads = [g.float() for g in grads]
        # (the masters stand in for the grads the kernel reads in the low params' dtype)
        checked = self._checked_grads(where, owners, params, params if shadows_in_kernel else grads, all_grads,
                                      positions, host_steps, walk, spec, backend,
                                      [lists[k] for k in like_keys], [lists[k] for k in slot_keys],
                                      like_keys, slot_keys, shown)
        if not shadows_in_kernel:
            grads = checked
        if coded:
            self._check_fp8(where, owners, params, lists, coded, shown)
        if walk == Walk.ANY:
            self._check_written_once(where, params, lists, keys,
                                     [local(p.grad) for p in owners] if self._unscales_grads() else (),
                                     shadows if master else ())
        else:
            self._check_walk(where, group, backend, params, lists)
        if group.get("maximize"):  # g ← −g; for the fused walks in the grads' checked layout (neg may
            negated = torch._foreach_neg(grads)  # restride a size-1 dim; the reference takes any strides)
            if walk != Walk.ANY:
                negated = [n if n.stride() == g.stride() else
                           torch.empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device).copy_(n)
                           for n, g in zip(negated, grads)]
            grads = negated
        bucket = Bucket(spec.device, spec.dtype, backend, owners, positions, params, grads, lists, fp8=spec.fp8,
                        shadows=shadows, shadows_in_kernel=shadows_in_kernel, held_grads=held_grads,
                        sharded=bool(spec.dtensor_positions))
        for key in self.per_param_keys:
            bucket.per_param[key] = self._per_param(index, group, plan, key, positions)
        if shadows_in_kernel and self._reduces_across_shards(bucket, group):  # stepped in Python: copy after
            bucket.grads, bucket.shadows_in_kernel = [g.float() for g in bucket.grads], False
        return bucket

    def _checked_grads(self, where, owners, params, grads, all_grads, positions, steps, walk, spec=None,
                       backend=None, states=(), slots=(), like_keys=(), slot_keys=(), lists=None) -> List[Tensor]:
        """Checks the bucket (``check_step``: params with their grads, states, slots
        and steps) and returns the grads, a grad whose strides differ from its
        param's copied into the param's layout; raises on any other problem,
        naming a state as ``lists`` holds it (the user's tensor, where the checked
        ones are views permuted into their param's memory order)."""
        grads = list(grads)
        while True:
            bad, problem, which = check_step(params, grads, list(states), list(slots), steps, walk)
            if problem == Problem.NONE:
                return grads
            if problem == Problem.GRAD_LAYOUT:  # copy the grad into its param's layout
                if self._unscales_grads() and torch._debug_has_internal_overlap(grads[bad]) == 1:
                    raise _unscalable_grad(where(bad), grads[bad])
                p = params[bad]
                grads[bad] = torch.empty_strided(p.size(), p.stride(), dtype=grads[bad].dtype,
                                                 device=p.device).copy_(grads[bad])
                continue
            if (problem in (Problem.PARAM_MIXED, Problem.PARAM_DTYPE) and spec is not None
                    and self._stale(owners[bad], spec, positions[bad])):
                raise _StalePlan()
            if problem == Problem.LAZY and which < 0:  # a ZeroTensor grad (no memory): its zeros, as torch reads it
                grads[bad] = torch.zeros_like(params[bad], memory_format=torch.preserve_format)
                continue
            if problem == Problem.LAZY:  # which: 0 the param (or its master), 1 its step, then states, slots
                master = spec is not None and spec.master_of is not None
                name = [MASTER_KEY if master else "", "step", *like_keys, *slot_keys][which]
                tensor = (params[bad], steps[bad])[which] if which < 2 else lists[name][bad]
                raise step_error(where(bad), problem, owners[bad], tensor=tensor, name=name)
            if problem == Problem.INFERENCE:  # which: 0 the param (or its master), 1 its step, then states, slots
                master = spec is not None and spec.master_of is not None
                name = [MASTER_KEY if master else "", "step", *like_keys, *slot_keys][which]
            else:
                name = {Problem.STATE: like_keys, Problem.STATE_SHARED: like_keys, Problem.SLOT: slot_keys,
                        Problem.SLOT_SHARED: slot_keys}.get(problem, [""] * (which + 1))[which]
            tensor = steps[bad] if name in ("", "step") else lists[name][bad]
            if problem in (Problem.STATE, Problem.SLOT, Problem.STEP) and (
                    is_fake(owners[bad]) or isinstance(tensor, Tensor) and is_fake(tensor)):
                what = "the param" if is_fake(owners[bad]) else f"state[{name or 'step'!r}]"
                raise ValueError(f"{where(bad)}: {what} is a FakeTensor (FakeTensorMode) in a step of real "
                                 "params; a step takes fake params or real ones, not both")
            if problem in (Problem.STATE, Problem.SLOT, Problem.STEP) and is_dtensor(tensor):
                # (the C++ check refuses tensors that dispatch in Python: no memory of their own)
                what = "a plain float32 CPU scalar tensor, as torch.optim keeps it" if name in ("", "step") \
                    else "a plain tensor like its param"
                raise ValueError(f"{where(bad)}: state[{name or 'step'!r}] must be {what}, not a DTensor "
                                 f"(placements {tuple(tensor.placements)})")
            master = spec is not None and spec.master_of is not None
            raise step_error(where(bad), problem, owners[bad], grad=all_grads[positions[bad]],
                             tensor=tensor, name=name, backend=backend, walk=walk,
                             master=params[bad] if master else None)

    def _place_like_params(self, where, owners: List[Tensor], lists: Dict[str, List], keys: Tuple[str, ...],
                           new_states: List[Tuple[Tensor, dict]], group: dict) -> None:
        """A DTensor param's state placed otherwise than the param (a state moved
        over from a param placed otherwise, as a reshard leaves it) is stepped as a
        copy placed like the param, stored once the step ran — as torch.optim's
        DTensor ops redistribute it; slots (Amos's v, b) are placed as the param's
        new slots would be (_slot_placements).  A state on another mesh is refused."""
        for key in keys:
            column = lists[key]
            for i, (p, t) in enumerate(zip(owners, column)):
                if not (is_dtensor(p) and is_dtensor(t)):
                    continue
                placements = self._slot_placements(p, group) if key in self.slot_keys else p.placements
                if tuple(t.placements) == tuple(placements):
                    continue
                if t.device_mesh != p.device_mesh:
                    raise ValueError(f"{where(i)}: state[{key!r}] is a DTensor on another mesh ({t.device_mesh}) "
                                     f"than its param ({p.device_mesh}); redistribute it onto the param's")
                column[i] = t.redistribute(p.device_mesh, placements)
                new_states.append((p, {key: column[i]}))

    def _slot_placements(self, p: Tensor, group: dict) -> list:
        """The placements of a DTensor param's slot-shaped states (slot_keys)."""
        raise NotImplementedError

    def _settled_state(self, group: dict, keys: Tuple[str, ...], master: bool, fp8: bool):
        """A test ``(p, st) -> bool``, True only where ``_state_changes(p, st, …)``
        has nothing to do (states all there, a float32 CPU step, no master to make
        or drop, the layout p's states were last stepped in): cheaper than that
        call, for the common case of every step after the first.  ``fp8``: a
        bucket with FP8 states, whose 1-D params' layouts are followed too
        (_laid_out_above)."""
        if master or self._capturable(group):
            return lambda p, st: False
        laid_out_above = _laid_out_above(fp8)
        wanted = frozenset(("step",) + tuple(keys))
        awaiting, layouts, float32 = self._awaiting_master, self._layouts, torch.float32

        def settled(p: Tensor, st: dict) -> bool:
            if type(st) is not dict or not wanted <= st.keys() or MASTER_KEY in st:
                return False
            step = st["step"]
            if not (type(step) is Tensor and step.dtype == float32 and step.is_cpu):
                return False
            if awaiting and awaiting.get(id(p)) is p:
                return False
            if p.dim() > laid_out_above:
                last = layouts.get(id(p))
                return last is None or last[0] is not p or last[1] == p.stride()
            return True
        return settled

    def _state_changes(self, p: Tensor, st: dict, group: dict, keys: Tuple[str, ...], master: bool) -> dict:
        """The entries to set (None: to remove) in p's state before this step: the
        master made (with float32 states) or dropped (states rounded to p's dtype)
        when ``master_weights`` changed, and fresh state where keys are missing."""
        changes: Dict[str, Any] = {}
        if master and awaits_master(st):  # (states without a master, a `step` or not: upcast)
            changes.update(upcast_states(p, st))
            changes.update(fp8_states.relaid_into(st, changes[MASTER_KEY]))  # codes follow the master's layout
        elif master and MASTER_KEY in st and self._master_marks.edited(p) and not masters.rounds_to(st[MASTER_KEY], p):
            changes[MASTER_KEY] = float32_copy(p.detach())  # written since our last step, to another value
        elif not master and (MASTER_KEY in st or self._awaiting_master.get(id(p)) is p):
            if MASTER_KEY in st:
                changes[MASTER_KEY] = None
            for key, value in st.items():
                if (key not in ("step", MASTER_KEY) and not key.endswith(fp8_states.ABSMAX_SUFFIX) and isinstance(value, Tensor)
                        and value.dtype == torch.float32 and p.dtype != torch.float32):
                    changes[key] = value.to(p.dtype)
            if not is_dtensor(p):  # codes made in the master's layout follow the param's (when not dense)
                changes.update(fp8_states.relaid_into(st, p))
        current = {**st, **changes} if changes else st
        step = current.get("step")
        capturable = self._capturable(group)
        if isinstance(step, Tensor) and not capturable and is_foreign_step(step):  # torch.tensor(10), as torch takes it
            changes["step"] = torch.tensor(float(step), dtype=torch.float32, device="cpu")
        if isinstance(step, Tensor) and capturable and step.numel() == 1 and (
                step.device != local(p).device or step.dtype != torch.float32):  # torch's capturable: on the device
            changes["step"] = step.detach().to(device=local(p).device, dtype=torch.float32).reshape(())
        if p.dim() > 0 and not is_dtensor(p):  # states left in an old layout (p.data in another memory format)
            relaid = self._relaid_states(p, current, keys)
            if relaid:
                changes.update(relaid)
                current = {**st, **changes}
        if "step" not in current or any(k not in current for k in keys):
            like = p
            if master:
                like = current.get(MASTER_KEY)
                if like is None:
                    like = changes[MASTER_KEY] = float32_copy(p.detach())
            changes.update({k: v for k, v in self._new_state(like, group).items() if k not in current})
            if capturable and "step" not in current:
                changes["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
        return changes

    def _check_replaced_step(self, where: str, p: Tensor, step: Tensor) -> None:
        """Refuses a step counter that another param's state holds too (the same
        tensor, or a view of its element), where this step replaces it by a float32
        counter of the param's own: torch.optim would advance it once per param."""
        if step.device.type == "meta" or step.numel() != 1 or not step.layout == torch.strided:
            return
        address = (str(step.device), step.data_ptr())
        other = self._replaced_steps.setdefault(address, p)
        if other is not p:
            raise step_error(where, Problem.STEP_SHARED, p)

    @staticmethod
    def _check_written_once(where, params, lists, keys, grads=(), low_params=()) -> None:
        """The reference steps any strides, but no tensor it writes in place may have
        elements that share memory (an expanded view): torch's in-place ops refuse
        them half-way through a step.  ``grads``: those GradScaler's unscaling will
        divide in place after the step; ``low_params``: the low-precision params of
        float32 masters (``params``), into which the step copies them."""
        for i, g in enumerate(grads):
            if torch._debug_has_internal_overlap(g) == 1:
                raise _unscalable_grad(where(i), g)
        for i, p in enumerate(params):
            if any(torch._debug_has_internal_overlap(t) == 1 for t in (p, *low_params[i:i + 1])):
                raise ValueError(f"{where(i)}: elements of the param share memory (an expanded view?); "
                                 "it cannot be written in place")
            for key in keys:
                t = lists[key][i]
                if t.device.type != "meta" and torch._debug_has_internal_overlap(t) == 1:
                    raise ValueError(f"{where(i)}: elements of state[{key!r}] ({t.dtype}, shape {tuple(t.shape)}, "
                                     f"strides {t.stride()}) share memory; it cannot be written in place")

    def _check_walk(self, where, group: dict, backend: str, params, lists) -> None:
        """Raises when a fused backend cannot walk a checked bucket (params and
        states as the kernels see them)."""

    def _mark_layouts(self) -> None:
        """Records, for every param with state, the layout its states have (after a
        load, which copies them into the param's; after an unpickling, the layout
        they were saved in, which a param given another memory format since its
        last step no longer has): a param whose strides differ at its next step has
        them re-laid."""
        for p, st in self.state.items():
            if isinstance(p, Tensor) and p.dim() > 0:
                shaped = [v for k, v in st.items() if k != MASTER_KEY and isinstance(v, Tensor)
                          and v.shape == p.shape] if isinstance(st, dict) else []
                self._layouts[id(p)] = (p, shaped[0].stride() if shaped else p.stride())

    def _relaid_states(self, p: Tensor, st: dict, keys: Tuple[str, ...]) -> dict:
        """When p's strides changed since its last step (a param replaced by one of
        another memory format: torch.optim steps it, its elementwise math taking any
        strides), copies in p's new layout of its state tensors laid out otherwise:
        the states shaped like p, with p's strides (FP8 codes, whose blocks follow
        their own memory order, re-encoded in p's, with their absmax), and the slots
        with p's memory order.  Only dense states on p's device move; a master is
        remade from the replaced param anyway.  Where p or its codes are not dense
        (p set to a strided view, or back), FP8 codes follow the stepped tensor's
        strides whatever they are (_relaid_strided_codes), and beside a strided p
        nothing else moves.  Any other misfit, and a state laid
        out otherwise beside a param that kept its layout, is left to the step's
        checks.  Empty when nothing needs it (the common case)."""
        last = self._layouts.get(id(p))
        if last is None or last[0] is not p or last[1] == p.stride():
            return {}
        codes_moved = self._relaid_strided_codes(p, st, keys)
        if not is_dense(p):  # (the reference steps the other states in any strides; the fused backends
            return codes_moved  # refuse a strided param)
        st = {**st, **codes_moved}
        stride, order = p.stride(), None
        stale = []
        for key, value in st.items():
            if (not isinstance(value, Tensor) or value.dim() != p.dim() or key.endswith(fp8_states.ABSMAX_SUFFIX)
                    or value.device != p.device or key == MASTER_KEY):
                continue
            if value.shape == p.shape and value.stride() != stride:
                stale.append(key)
            elif key in self.slot_keys and value.shape != p.shape:
                order = memory_order(p) if order is None else order
                if not value.permute(order).is_contiguous():
                    stale.append(key)
        stale = [key for key in stale if is_dense(st[key])]
        if not stale:
            return codes_moved
        self._refuse_shared_states(p, st, keys)
        out = dict(codes_moved)
        for key in stale:
            value = st[key]
            if key in self.slot_keys:
                out[key] = zeros_in_memory_order(p, tuple(value.shape), value.dtype).copy_(value)
            elif value.dtype == torch.uint8 and fp8_states.absmax_key(key) in st:  # as a load relays them
                out[key], out[fp8_states.absmax_key(key)] = fp8_states.relaid(
                    value, st[fp8_states.absmax_key(key)], p, key in fp8_states.ROOT_KEYS)
            else:
                out[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
        return out

    def _relaid_strided_codes(self, p: Tensor, st: dict, keys: Tuple[str, ...]) -> dict:
        """FP8 codes re-laid where a strided view is on either side of p's layout
        change (p set to one, or back): codes follow the strides of the tensor the
        kernels step, whatever they are (p's, or its float32 master's, which is
        dense); empty where neither p nor its codes are a strided view."""
        master = st.get(MASTER_KEY)
        stepped = master if isinstance(master, Tensor) else p
        coded = [key for key, value in st.items() if key in keys and isinstance(value, Tensor)
                 and value.dtype == torch.uint8 and fp8_states.absmax_key(key) in st]
        if is_dense(p) and all(is_dense(st[key]) for key in coded):
            return {}
        self._refuse_shared_states(p, st, keys)
        return fp8_states.relaid_into(st, stepped)

    @staticmethod
    def _refuse_shared_states(p: Tensor, st: dict, keys: Tuple[str, ...]) -> None:
        """Raises when states the step writes share memory with p or with each
        other: copies in a new layout would part them, where the step's checks
        refuse them."""
        held = [(key, value) for key, value in st.items()
                if key in keys and key != MASTER_KEY and isinstance(value, Tensor) and value.device == p.device]
        shared = first_overlap([p] + [value for _, value in held])
        if shared is not None:
            key, value = held[shared[1] - 1]
            raise ValueError(shared_state_text(key, value))

    @staticmethod
    def _check_fp8(where, owners, params, lists, coded, shown) -> None:
        """Raises when an FP8 state (codes and absmax under the keys ``coded``) does
        not fit its param (csrc/checks.h: find_fp8_problem), naming it as ``shown``
        holds it (the user's tensor, where ``lists`` holds a permuted view)."""
        half = len(coded) // 2
        bad, which = torch.ops.amos_fused.check_fp8_states(
            params, [t for k in coded[:half] for t in lists[k]], [t for k in coded[half:] for t in lists[k]])
        if bad < 0:
            return
        key, tensor, p = coded[which], shown[coded[which]][bad], params[bad]
        if tensor.is_inference() and not torch.is_inference_mode_enabled():
            raise step_error(where(bad), Problem.INFERENCE, p, name=key)
        expected = ("uint8 codes with the param's shape and strides" if which < half else
                    f"a contiguous float32 tensor of {fp8_states.num_blocks(p.numel())} elements "
                    f"(one per block of {fp8_states.BLOCK})")
        if lazy_kind(tensor):
            expected += f", a plain tensor (it is {lazy_kind(tensor)})"
        raise ValueError(f"{where(bad)}: state {key!r} ({tensor.dtype}, shape {tuple(tensor.shape)}, "
                         f"strides {tensor.stride()}, on {tensor.device}) does not fit: expected {expected}")

    @staticmethod
    def _to_memory_order(i: int, params, grads, lists, keys) -> None:
        """Replaces param i, its grad and state by views with the dims permuted into
        the param's memory order (row-major views of a dense param: channels_last,
        transposed, …).  Slots keep their logical dims, permuted alike."""
        order = memory_order(params[i])
        params[i] = params[i].permute(order)
        if grads[i].dim() == len(order):  # (a grad of another rank is refused by the checks, as it is)
            grads[i] = grads[i].permute(order)
        for key in keys:
            if lists[key][i].dim() == len(order):
                lists[key][i] = lists[key][i].permute(order)

    def _stale(self, param: Tensor, spec: BucketSpec, position: int) -> bool:
        """True when ``param`` (at ``position`` in its group) no longer belongs to the
        bucket its plan put it in (p.data set to another dtype, device or size, or
        to a complex tensor)."""
        return (param.device != spec.device or kernel_dtype(param) != (spec.master_of or spec.dtype)
                or self._keeps_fp8(param) != spec.fp8 or param.is_complex() != (position in spec.complex_positions))

    @staticmethod
    def _real_views(where: str, param: Tensor, grad: Tensor, lists: dict, like_keys, i: int):
        """A complex param, its grad and state as real views (torch.view_as_real),
        after checking that they are complex of the param's dtype (complex64 or
        complex128: torch.optim's step turns complex32 params NaN)."""
        if param.dtype not in REAL_OF_COMPLEX:
            raise step_error(where, Problem.PARAM_DTYPE, param)
        if grad.layout != torch.strided:
            raise step_error(where, Problem.GRAD_SPARSE, param, grad=grad)
        if grad.dtype != param.dtype:
            raise step_error(where, Problem.GRAD_DTYPE, param, grad=grad)
        for what, tensor in [("the param", param), ("its grad", grad)] + [(f"state[{k!r}]", lists[k][i])
                                                                          for k in like_keys]:
            if tensor.is_conj():  # (torch.view_as_real needs the conjugation resolved, as torch.optim does)
                raise ValueError(f"{where}: {what} is a lazily conjugated view (tensor.conj()); resolve it "
                                 "first (tensor.resolve_conj())")
        for key in like_keys:
            if lists[key][i].dtype != param.dtype:
                raise step_error(where, Problem.STATE, param, tensor=lists[key][i], name=key)
            lists[key][i] = torch.view_as_real(lists[key][i])
        return torch.view_as_real(param), torch.view_as_real(grad)

    def _per_param(self, index: int, group: dict, plan: GroupPlan, key: str,
                   positions: List[int]) -> List[float]:
        """``group[key]`` for the params at ``positions``: the group value is a number
        (for every param) or a tuple with one value per param.  Read and checked at
        every step, as the group holds it now (a list edited in place included)."""
        value = group[key]
        count = len(plan.params)
        where = f"{self._name}: param_groups[{index}]['{key}']"
        value = self._per_param_value(value)
        try:
            entries = value if isinstance(value, (tuple, list)) else (value,)
            # (float() would read '0.5', and a NumPy complex as its real part)
            if any(isinstance(v, (str, bytes)) or hp.complex_valued(v) for v in entries):
                raise TypeError
            values = [float(v) for v in entries] if entries is value else [float(value)] * count
        except (TypeError, ValueError, RuntimeError):
            raise hp.HyperParameterTypeError(
                f"{where} must be a number or a tuple of one number per param, got {value!r}") from None
        except OverflowError:  # (an int past float64's range)
            raise ValueError(f"{where} holds a value beyond float64's range: {hp.shown(value)}") from None
        if len(values) != count:
            raise ValueError(f"{where} has {len(values)} values for {count} params")
        if plan.cache.get(("checked", key)) != values:  # (the values checked at the last step: not again)
            try:
                self._check_per_param(index, key, values)
            except ValueError as error:
                raise ValueError(f"{self._name}: param_groups[{index}]: {error}") from None
            plan.cache[("checked", key)] = values
        return [values[i] for i in positions]

    def _per_param_value(self, value):
        """A per-param group value as the step reads it: a 1-D tensor or array (one
        per param, where the class takes them: ``per_param_arrays``) as a list, as
        the group takes it when added; anything else as it is."""
        if self.per_param_arrays and getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
            return value.tolist()
        return value

    def _check_per_param(self, index: int, key: str, values: List[float]) -> None:
        """Raises on a bad per-param hyper-parameter value (a function of ``values``
        alone: values equal to those checked at the last step are not checked again)."""

    def _grad_scaling(self) -> Dict[str, Optional[Tensor]]:
        """GradScaler inputs set by torch.amp.GradScaler.step, as op keyword arguments.
        (GradScaler sums found_inf over the devices it checked: a step where no param
        had a grad gets the int 0, as torch's fused optimizers take it.)"""
        found_inf = getattr(self, "found_inf", None)
        if isinstance(found_inf, (int, float)) and not isinstance(found_inf, bool):
            found_inf = torch.tensor(float(found_inf), device="cpu")
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": found_inf}

    def _host_grad_scaling(self) -> Dict[str, Optional[Tensor]]:
        """GradScaler's inputs as the host-side steps read them (all but capturable
        ones): copied to the host once per step, both in one device-to-host copy
        (float64 holds either exactly), instead of one sync per bucket and tensor."""
        cached = getattr(self, "_step_host_scaling", None)  # (this step's: step() resets it)
        if cached is not None:
            return cached
        scaling = self._grad_scaling()
        on_device = {name: t for name, t in scaling.items() if t is not None and t.device.type != "cpu"}
        host = dict(scaling)
        if len({t.device for t in on_device.values()}) == 1:
            values = torch.stack([t.reshape(()).to(torch.float64) for t in on_device.values()]).cpu()
            host.update(zip(on_device, values.unbind()))
        else:
            host.update({name: t.cpu() for name, t in on_device.items()})
        self._step_host_scaling = host
        return host

    def _check_grad_scaling(self) -> None:
        """GradScaler's inputs, checked before anything is written (every backend
        alike): one-element floating tensors."""
        for name, value in self._grad_scaling().items():
            if value is not None and not (isinstance(value, Tensor) and value.layout == torch.strided
                                          and value.numel() == 1 and value.is_floating_point()
                                          and value.device.type != "meta" and not value.is_mkldnn):
                got = (f"{value.dtype} {tuple(value.shape)} ({value.layout}) on {value.device}"
                       if isinstance(value, Tensor) else repr(value))
                raise ValueError(f"{self._name}: {name} (set by torch.amp.GradScaler) must be a one-element "
                                 f"floating tensor with data (dense), got {got}")

    def _unscales_grads(self) -> bool:
        """Whether this step divides the grads in place once it has run (GradScaler's
        grad_scale is set: _unscale_stepped_grads)."""
        return self._grad_scaling()["grad_scale"] is not None

    def _reference_grads(self, grads: List[Tensor]) -> Optional[List[Tensor]]:
        """Grads for the reference: unscaled by GradScaler's scale, or None when
        found_inf says to skip the step."""
        scaling = self._host_grad_scaling()
        if scaling["found_inf"] is not None and float(scaling["found_inf"]) != 0.0:
            return None
        if scaling["grad_scale"] is not None:  # unscaled in the step's float32, as the kernels unscale
            scale = float(scaling["grad_scale"])  # 1/0 = inf as in C++ (a scale that backed off to 0)
            unscale = 1.0 / scale if scale != 0.0 else math.copysign(math.inf, scale)
            return [(g.float() if g.dtype in (torch.bfloat16, torch.float16) else g) * unscale for g in grads]
        return grads

    def _apply_new_states(self, ready: _Ready, bucket: Bucket, skipped: bool) -> Set[int]:
        """Stores the state made or changed for the params of ``bucket`` (once it stepped).
        A step that GradScaler's found_inf skipped on the host stores the state it
        made (a first step's, as torch.optim's makes it) but replaces none: a master
        remade from a written param, states converted or re-laid are made again by
        the next step that runs (``skipped``: _skipped_on_host).  Returns the ids of
        the params whose changes it declined so."""
        declined: Set[int] = set()
        if not ready.new_states:
            return declined
        owners = {id(p) for p in bucket.owners}
        for param, changes in ready.new_states:
            if id(param) not in owners:
                continue
            held = self.state.get(param)
            if skipped and isinstance(held, dict) and held and (  # (a master made beside FP8 codes, which stay)
                    MASTER_KEY in changes or any(key in held for key in changes)):
                declined.add(id(param))
                continue
            self._awaiting_master.pop(id(param), None)  # its master made, or its states rounded
            state = self.state.setdefault(param, {})  # (a plain dict in place of torch's defaultdict too)
            for key, value in changes.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
        return declined

    def _run_bucket(self, ready: _Ready, bucket: Bucket, summed_over_shards: bool) -> None:
        """Steps one bucket (``summed_over_shards``: by ``_sharded_step``, whatever
        the backend)."""
        group = ready.group
        track = group.get("track_rms", False)
        table = new_table(len(bucket.params), bucket.params[0].device) if track else None
        keys = None
        if group.get("bf16_stochastic_round") and bucket.dtype == torch.bfloat16:
            keys = [round_key(group.get("stochastic_round_seed", 0), ready.first_index + position,
                              shard_offset(owner))
                    for position, owner in zip(bucket.positions, bucket.owners)]
        python_step = None
        if summed_over_shards:
            python_step = self._sharded_step
        elif bucket.backend == "reference":
            python_step = self._reference_step
        if python_step is None:
            self._fused_step(fused_ops(bucket.backend, prechecked=True), bucket, group, table, keys)
        else:
            unscaled = self._reference_grads(bucket.grads)
            before = snapshot(bucket.params) if track and unscaled is not None else None
            if unscaled is not None:
                bucket.grads = unscaled
                if keys is None:
                    python_step(bucket, group)
                else:
                    self._python_step_rounded(python_step, bucket, group, keys)
            if track:
                measured_sums(bucket.params, before, table)
        skipped = self._skipped_on_host()
        if bucket.shadows and not bucket.shadows_in_kernel and not skipped:
            torch._foreach_copy_(bucket.shadows, bucket.params)  # the params, rounded from their masters
        declined = self._apply_new_states(ready, bucket, skipped)  # (a sum over shards that failed stores none)
        self._bump_sharded_versions(bucket, group)
        if bucket.shadows and skipped:
            self._master_marks.mark_unmarked(bucket.owners)
        elif bucket.shadows:
            self._master_marks.mark(bucket.owners)
        laid_out_above = _laid_out_above(bucket.fp8)
        for p in bucket.owners:  # (a param whose re-laid states a skipped step declined: re-laid by the next)
            if p.dim() > laid_out_above and id(p) not in declined:
                self._layouts[id(p)] = (p, p.stride())
        if track:
            self._telemetry.record(bucket.owners, bucket.params, table, float(ready.group["lr"]))
        else:
            self._telemetry.forget(bucket.owners)

    def _skipped_on_host(self) -> bool:
        """Whether GradScaler's found_inf, held on the host, skips this step (one on a
        device is not read here: the kernels read it there)."""
        found_inf = self._grad_scaling()["found_inf"]
        return found_inf is not None and found_inf.device.type == "cpu" and float(found_inf) != 0.0

    def _bump_sharded_versions(self, bucket: Bucket, group: dict) -> None:
        """The step wrote the local shards of a bucket's DTensor params and states,
        whose version counters are not the DTensors' own: bumps those too, as
        torch's in-place ops on the DTensors would (autograd then refuses a
        backward through a graph that saved such a param, and a master sees the
        user's later writes as later ones) — unless found_inf, read on the host
        by such a step already, skipped it (a capturable step: bumped anyway)."""
        if not bucket.sharded:
            return
        written = [t for p in bucket.owners if is_dtensor(p)
                   for t in [p, *self.state.get(p, {}).values()] if is_dtensor(t)]
        found_inf = None if self._capturable(group) else self._host_grad_scaling()["found_inf"]
        if found_inf is None or float(found_inf) == 0.0:
            torch._C._increment_version(written)

    @staticmethod
    def _python_step_rounded(python_step, bucket: Bucket, group: dict, keys: List[int]) -> None:
        """An eager step of bfloat16 params with stochastic rounding: the step runs on
        float32 copies (the eager math reads every tensor as float32 anyway, so the
        result is the same float32 value), then each copy is rounded into its param
        with the kernels' bits."""
        params = bucket.params
        bucket.params = [p.float() for p in params]
        try:
            python_step(bucket, group)
        finally:
            exact, bucket.params = bucket.params, params
        for p, value, key, step in zip(params, exact, keys, bucket.state["step"]):
            p.copy_(round_to_bfloat16(value, key, int(step), p))

    # ---- telemetry --------------------------------------------------------
    def rms(self) -> Dict[Tensor, RMS]:
        """Every tracked param's weight RMS and update RMS (per unit of lr) at its
        latest step: ``{param: RMS(weight, update)}`` for the params of groups with
        ``track_rms=True`` that have been stepped (amos_fused/telemetry.py).  One
        device-to-host copy; a collective when params are sharded DTensors."""
        return self._telemetry.rms([p for group in self.param_groups for p in group["params"]])

    # ---- checkpoints ------------------------------------------------------
    def _settled_values(self) -> List[dict]:
        """Each group's per-param values (Amos's eta, ScaledAdamW's init_norm) as the
        next step would settle them, following the params added, removed or
        reordered since the last step (a new param's inferred now: a checkpoint holds
        numbers), by group index, without changing this optimizer."""
        values: List[dict] = []
        for index, group in enumerate(self.param_groups):
            moved = {}
            if self.per_param_keys and isinstance(group, dict) and isinstance(group.get("params"), (list, tuple)):
                try:
                    moved = self._values_following_params(group, self._last_plan_of(index, group))
                except Exception:  # (a param whose value cannot be inferred: saved as it is, refused at the step)
                    moved = {}
            values.append(moved)
        return values

    def _fresh_masters(self) -> Dict[int, Tensor]:
        """A float32 master made from each param written since its last step (to
        other values than its master rounds to), by id of the param, as the next
        step would make it, without changing this optimizer."""
        fresh: Dict[int, Tensor] = {}
        for group in self.param_groups:
            if not (isinstance(group, dict) and group.get("master_weights")):
                continue
            for p in group.get("params", ()):
                st = self.state.get(p) if isinstance(p, Tensor) else None
                if isinstance(st, dict) and MASTER_KEY in st and self._master_marks.edited(p) and \
                        not masters.rounds_to(st[MASTER_KEY], p):
                    with torch.inference_mode(False):
                        fresh[id(p)] = float32_copy(p.detach())
        return fresh

    @torch._disable_dynamo
    def state_dict(self) -> dict:
        """torch.optim's state_dict, with what the next step would bring up to date
        (_settled_values, _fresh_masters) in the saved groups and states.  Hooks run as
        torch.optim runs them: the pre-hooks first (what they change is saved), the
        post-hooks on the settled state_dict (one a hook returns is the result)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        values, fresh = self._settled_values(), self._fresh_masters()
        hooks = self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = OrderedDict(), OrderedDict()
        live, kept = self.state, self._states_of_grouped_params()
        try:
            self.state = kept  # (torch.optim's would raise KeyError on the state of a param no group holds)
            saved = super().state_dict()  # (runs no hook: they run here, around the settling)
        finally:
            self.state = live
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = hooks
        groups, states = saved["param_groups"], saved["state"]
        for group, saved_group, moved in zip(self.param_groups, groups, values):
            saved_group.update({key: value for key, value in moved.items() if key in saved_group})
            for p, key in zip(group["params"], saved_group["params"]):
                if id(p) in fresh and isinstance(states.get(key), dict) and MASTER_KEY in states[key]:
                    states[key] = {**states[key], MASTER_KEY: fresh[id(p)]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            returned = post_hook(self, saved)
            if returned is not None:
                saved = returned
        return saved

    def _states_of_grouped_params(self):
        """self.state, or, when it holds the state of a param that no group holds any
        more (removed from its group's list since), a copy without those: a
        state_dict numbers the params of the groups, and has no number for them."""
        grouped = {id(p) for group in self.param_groups for p in group.get("params", ())}
        if all(id(p) in grouped for p in self.state if isinstance(p, Tensor)):
            return self.state
        kept = defaultdict(dict)
        kept.update((p, st) for p, st in self.state.items() if not isinstance(p, Tensor) or id(p) in grouped)
        return kept

    def __getstate__(self) -> dict:
        """torch.optim's, with each float32 master a step would remake (a param written
        since its last step) made fresh in the copied states, and each group's last
        plan of per-param values (_per_param_plans): the copy settles those at its
        own next step, from its params as they are then, as this optimizer will."""
        fresh = self._fresh_masters()
        state = dict(super().__getstate__())
        state["_per_param_plans"] = self._per_param_plans()
        if hasattr(self, "_setting_keys"):
            state["_setting_keys"] = self._setting_keys  # (which keys every group holds: not all of defaults')
        if fresh:
            copied = defaultdict(dict)
            for p, st in self.state.items():
                copied[p] = {**st, MASTER_KEY: fresh[id(p)]} if id(p) in fresh else st
            state["state"] = copied
        return state

    def _per_param_plans(self) -> Dict[int, Tuple[List[Tensor], dict]]:
        """{group index: (params, {key: values})}: the params and per-param values of
        each group's last plan (what _values_following_params follows from)."""
        plans = {}
        for index, group in enumerate(self.param_groups):
            if self.per_param_keys and isinstance(group, dict) and isinstance(group.get("params"), (list, tuple)):
                old = self._last_plan_of(index, group)
                if old is not None:
                    plans[index] = (list(old.params), dict(old.group_values))
        return plans

    def __setstate__(self, state: dict) -> None:
        plans = state.pop("_per_param_plans", {})  # (none in a copy pickled by an older version)
        super().__setstate__(state)
        self._plans = {}
        # which params each group's per-param values belong to: the original's last
        # plan, or (none) the params the group holds now, so that a param added to a
        # group of the copy gets its own value at the copy's next step, as in the original
        self._plans_by_group = {
            id(group): GroupPlan(list(group["params"]), [], False,
                                 group_values={k: group.get(k) for k in self.per_param_keys}, group=group)
            for group in self.param_groups if self.per_param_keys and isinstance(group.get("params"), (list, tuple))}
        for index, (params, values) in plans.items():
            if index < len(self.param_groups):
                group = self.param_groups[index]
                self._plans_by_group[id(group)] = GroupPlan(params, [], False, group_values=values, group=group)
        self._telemetry = Recorder()  # (torch.optim pickles defaults, state and groups only)
        self._master_marks = WriteMarks()
        self._layouts: Dict[int, Tuple[Tensor, tuple]] = {}  # id(p) -> (p, its strides at its last step)
        self._mark_layouts()
        self._master_marks.mark_masters(self.state)  # a param written from now on gets its master remade
        self._mark_awaiting_masters()
        self._departed_with_state = []  # (the next step makes every plan, then _forget_departed_params lists them)
        for group in self.param_groups:
            for key, value in self.torch_setstate_defaults.items():  # (a checkpoint of an older torch)
                group.setdefault(key, value)
            fill_group_defaults(group, self.defaults)
        for per_param in self.state.values():
            # a count held as a Python number becomes the step's float32 CPU scalar, as
            # torch.optim.Adam's __setstate__ turns it into a tensor (and as a load reads it)
            count = per_param.get("step") if isinstance(per_param, dict) else None
            if count is not None and not isinstance(count, Tensor):
                try:
                    per_param["step"] = torch.tensor(float(count), dtype=torch.float32, device="cpu")
                except (TypeError, ValueError):  # (not a count: the step names it)
                    pass

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint of this optimizer or of the matching torch.optim one.
        Every state tensor is copied (never aliased) into the layout of its param;
        ``step`` becomes a float32 CPU scalar.  Each group keeps the backend this
        optimizer was built with (a saved ``backend`` — a group's own, or one saved
        by older versions — is ignored), and torch's ``fused``/``foreach``/``capturable``
        choices of the saver are not carried over.  States are brought to this
        optimizer's precision: a
        full-precision ``exp_avg``/``exp_avg_sq`` loaded into an 8-bit optimizer is
        quantized, and FP8 codes loaded into a full-precision one are decoded
        (amos_fused/fp8_states.py).  With ``master_weights``, the float32 master
        and states of a low-precision param are kept in float32 (a checkpoint
        without a master gets one at the next step, made from the param), and FP8
        codes are decoded to float32; without, they are rounded to the param's
        dtype and the master is dropped (amos_fused/master_weights.py).  As with every
        group setting, ``master_weights`` is the checkpoint's group's when it has
        one (as in torch.optim); set ``param_groups[i]['master_weights']`` after
        loading to change it.  FP8 codes saved from a param of another memory
        layout are decoded in their own and quantized in the param's
        (fp8_states.relaid): their blocks follow the memory order.  A param with
        a master resumes from it at the next step unless written after the load
        (master_weights.WriteMarks).

        All or nothing: a load that raises leaves the optimizer as it was (state,
        param_groups, caches, marks), then the error propagates.  Hooks run as
        torch.optim runs them: the load_state_dict pre-hooks first (a state_dict one
        returns is the one loaded, every part of it), the post-hooks once the load
        is complete (conversions included), and not after a load that raised."""
        state_dict = state_dict.copy()  # (shallow, as torch.optim's: a pre-hook may edit or replace it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        attrs = dict(self.__dict__)  # torch.optim's load replaces self.state and the groups, never edits them
        groups = [dict(group) for group in self.param_groups]
        states = {param: dict(state) for param, state in self.state.items()}
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            # (under torch.inference_mode() too, the copies are normal tensors, which a step outside it updates)
            with torch.inference_mode(False):
                self._load_checkpoint(state_dict)  # (torch.optim's load inside runs no hook: they run here)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(attrs)
            for group, saved in zip(self.param_groups, groups):
                group.clear()
                group.update(saved)
            for param, saved in states.items():
                self.state[param].clear()
                self.state[param].update(saved)
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checkpoint(self, state_dict: dict) -> None:
        """load_state_dict's work, undone by it when this raises."""
        for index, group in enumerate(state_dict.get("param_groups", [])):
            missing = [key for key in self.core_group_keys if isinstance(group, dict) and key not in group]
            if missing:
                raise hp.MissingGroupKey(
                    f"{self._name}: cannot load the checkpoint's param_groups[{index}]: it has no {missing[0]!r}, "
                    f"which every {self._name} group has (settings {sorted(group)}: a checkpoint of another "
                    "optimizer?)")
            if group.get("differentiable"):
                raise ValueError(f"{self._name}: cannot load param_groups[{index}] with "
                                 "differentiable=True (not supported by amos_fused)")
        saved_ids = {i for group in state_dict.get("param_groups", []) if isinstance(group, dict)
                     for i in group.get("params", ()) if isinstance(i, (int, str))}
        for key, saved in state_dict.get("state", {}).items():
            if key in saved_ids and not isinstance(saved, dict):
                raise TypeError(f"{self._name}: cannot load the checkpoint's state[{key!r}]: a param's state must "
                                f"be a dict of its state values, got {type(saved).__name__} {hp.shown(saved)}")
            if key in saved_ids and isinstance(saved, dict):
                fp8_states.check_saved_codes(self._name, key, saved)
            if not (isinstance(saved, dict) and "step" in saved):
                continue
            step = saved["step"]
            if not _loadable_count(step):
                raise ValueError(f"{self._name}: cannot load the checkpoint's state[{key!r}]['step']: it must be "
                                 f"a count (a number or a one-element tensor), got {type(step).__name__} "
                                 f"{hp.shown(step)}")
        machine = [{**{key: group.get(key, self.defaults.get(key)) for key in ("fused", "foreach", "capturable")},
                    **({"backend": group["backend"]} if "backend" in group else {})}
                   for group in self.param_groups]
        super().load_state_dict(state_dict)
        with_master = {p: has_master(p, group.get("master_weights", self.defaults.get("master_weights", False)))
                       for group in self.param_groups for p in group["params"]}
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._restore_saved_dtypes(state_dict, with_master)
        for param, state in self.state.items():
            if not isinstance(param, Tensor) or not isinstance(state, dict):
                self.state[param] = _tensors_copied(state)  # an entry of no param of ours: kept as saved, as
                continue  # torch.optim keeps it, but with copies of its tensors (never the caller's)
            master = with_master.get(param, False)
            upcast = master and _float32_master(state)
            for key, value in list(state.items()):
                state[key] = self._own_copy(param, key, value, master, upcast, group_of.get(param))
            masters.convert_loaded(param, state, master)
            keys = self.fp8_state_keys if self._keeps_fp8(param) else ()
            try:
                fp8_states.convert_loaded(param, state, keys, dtype=torch.float32 if master else param.dtype,
                                          like=masters.stepped_like(param, master) if keys else param)
            except ValueError as error:
                raise ValueError(f"{self._name}: {error}") from None
        self._plans = {}
        self._bulk_adding = True
        try:
            for index, group in enumerate(self.param_groups):
                fill_group_defaults(group, self.defaults)
                group.pop("backend", None)  # (saved by older versions: never loaded)
                group.update(machine[index])
                self._check_new_group(index, group, adding=False)
            self._check_all_overlaps()
        finally:
            self._bulk_adding = False
        self._master_marks.clear()
        self._master_marks.mark_masters(self.state)  # the next step starts from the loaded master unless written
        self._mark_layouts()
        self._mark_awaiting_masters()

    def _mark_awaiting_masters(self) -> None:
        """Records the params of master groups whose loaded states (float32, FP8
        codes in the master's layout) wait for the master their next step makes
        from the param.  Should ``master_weights`` be turned off first, that step
        brings those states to the param's dtype and layout as it does when a
        master is dropped."""
        self._awaiting_master = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p) if p in self.state else None
                if awaits_master(st) and has_master(p, group.get("master_weights", False)):
                    self._awaiting_master[id(p)] = p

    def _restore_saved_dtypes(self, state_dict: dict, with_master: Dict[Tensor, bool]) -> None:
        """torch.optim's load_state_dict casts every non-step state tensor to its
        param's dtype: FP8 codes (uint8) would become floats holding 0..255, and a
        float32 absmax, master or state of a bfloat16 param would lose bits.  Puts
        the saved codes and absmax back, and the float32 tensors of params with a
        master (the params are matched like torch.optim does: in group order);
        _own_copy then copies them."""
        saved = state_dict.get("state", {})
        ids = (i for group in state_dict.get("param_groups", []) for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, param in zip(ids, params):
            if saved_id not in saved or param not in self.state:
                continue
            master = with_master.get(param, False)
            own_master = _float32_master(saved[saved_id])
            for key, value in saved[saved_id].items():
                if isinstance(value, Tensor) and key != "step" and (
                        value.dtype == torch.uint8 or key.endswith(fp8_states.ABSMAX_SUFFIX)
                        or (master and value.dtype == torch.float32)
                        or (master and own_master and _steps_beside_master(key, value))):
                    self.state[param][key] = value

    @staticmethod
    def _own_copy(param: Tensor, key: str, value, master: bool = False, upcast: bool = False,
                  group: Optional[dict] = None) -> object:
        """A loaded state value as this param's own tensor: the param's device and
        layout, and its dtype except for FP8 codes and absmax and (``master``: the
        param has a float32 master) float32 tensors.  Codes keep the memory order
        they were saved in (fp8_states.loaded_codes: their absmax belongs to it)
        until fp8_states.convert_loaded relays them.  ``group``: the param's group
        (None for a state of no param in a group), for states shaped by it."""
        if key == "step":
            return torch.tensor(float(value), dtype=torch.float32, device="cpu")
        if not isinstance(value, Tensor):
            return value
        value = value.detach()
        if is_dtensor(param) and not is_dtensor(value) and value.shape == param.shape:
            # a full state dict's tensor under a key this optimizer's state lacked (torch's set_state_dict
            # places only those it has): this rank's shard of it, as torch would have placed it
            value = placed_as(value.to(local(param).device), param)
        if upcast and _steps_beside_master(key, value):  # (the states of a float32 master: float32 too)
            value = value.float()
        if key.endswith(fp8_states.ABSMAX_SUFFIX) and is_dtensor(param):
            return fp8_states.loaded_absmax(value, param)  # (placed like the param, as its codes are)
        if (value.dtype == torch.uint8 or key.endswith(fp8_states.ABSMAX_SUFFIX)
                or (master and value.dtype == torch.float32)):  # these keep their dtype
            if value.shape == param.shape and value.dtype == torch.uint8:
                return fp8_states.loaded_codes(value, param)
            if value.shape == param.shape:
                return torch.empty_like(param, dtype=value.dtype).copy_(value)
            return value.to(device=param.device, copy=True).contiguous()
        if value.shape == param.shape:
            return torch.empty_like(param).copy_(value)
        return value.to(device=param.device, dtype=param.dtype, copy=True).contiguous()
