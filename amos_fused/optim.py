"""The optimizers: thin torch.optim.Optimizer classes over the fused kernels
(``backend='cpu'``, ``'cuda'``, ``'triton'``) and the eager reference
(``backend='reference'``).  The math is in csrc/step_math.h and reference.py."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import hyperparams as hp
from . import reference
from .amos_slots import loaded_slot_dims, normalize_reduce_axes, reduced_dims, slot_shape
from .deterministic_sums import fixed_order_mean, fixed_order_sum, local_sum_of_squares
from .optimizer_base import FusedOptimizer, ParamValueError, torch_flags, zeros_in_memory_order
from .sharding import is_dtensor, shard_groups, slot_placements, slot_zeros, sum_over_shards



def _new_step() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float32, device="cpu")


def adam_state(p: Tensor, moment) -> dict:
    """Fresh Adam moments of a param, with torch.optim.Adam's state keys;
    ``moment(p, key)`` makes each (an optimizer's _fresh_moment)."""
    return {"step": _new_step(), "exp_avg": moment(p, "exp_avg"), "exp_avg_sq": moment(p, "exp_avg_sq")}


def _advance(step: Tensor) -> float:
    step += 1
    return float(step)


def _optional_float(value):
    """None, or the number a group holds (a number, a 0-dim tensor, or a numeric
    string, as the checks read them)."""
    return None if value is None else hp.value_of(value)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _decay_factor(hyper: dict) -> dict:
    """1 − lr·λ, the decoupled decay factor the kernels take in the step's dtype
    (_derived_hyper)."""
    return {"decay factor 1 - lr*weight_decay": 1.0 - hyper["lr"] * hyper["weight_decay"]}


def _smallest_next_count(state: dict, params, stepping: bool) -> float:
    """The smallest step count t that ``params`` (those in float32) take at their
    next step: at a step (``stepping``) those with a grad, which it steps; when a
    group is added or loaded, all of them.  1 for one without state, and where none
    steps; a counter that is not a count ≥ 0, which the step's checks refuse, is
    not counted."""
    counts = []
    for p in params:
        if (stepping and p.grad is None) or p.dtype in (torch.float64, torch.complex128):
            continue
        st = state.get(p)
        step = st.get("step") if isinstance(st, dict) else None
        if step is None:
            counts.append(1.0)
            continue
        try:
            count = float(step)
        except (TypeError, RuntimeError, ValueError):
            continue
        if count >= 0.0:
            counts.append(count + 1.0)
    return min(counts, default=1.0)


def _typed(value):
    """``value`` with the type of every entry beside it, to compare (list and tuple
    alike): 1.0 and True are not the dim 1 they equal."""
    if isinstance(value, (list, tuple)):
        return tuple, tuple(_typed(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return set, frozenset(_typed(v) for v in value)
    return type(value), value


def _next_step(step: Tensor) -> float:
    """The count _advance will give, without writing it (a sharded step advances
    its counters only once its collective has returned)."""
    return float(step + 1)


class _AdamFamily(FusedOptimizer):
    """Adam and AdamW (Kingma & Ba, arXiv:1412.6980; Loshchilov & Hutter,
    arXiv:1711.05101), state keys as torch.optim.Adam."""

    algorithm = "adam"
    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    core_group_keys = ("lr", "betas", "eps", "weight_decay")
    torch_refuses_with_foreach = True
    torch_setstate_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                   differentiable=False, decoupled_weight_decay=False, fused=None)

    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, bias_correction, decoupled, flags):
        try:
            hp.betas_as_torch_constructs_them(betas)
        except ValueError as error:
            raise ValueError(f"{self._name}: the default betas of every group: {error}") from None
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, bias_correction=bias_correction,
            decoupled_weight_decay=decoupled, **flags,
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        hp.adam_group(group)
        for key in ("amsgrad", "bias_correction", "decoupled_weight_decay"):
            hp.flag(key, group[key])

    def _step_state_keys(self, group):
        return self.state_keys if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _new_state(self, p, group):
        state = adam_state(p, self._fresh_moment)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self._fresh_moment(p, "max_exp_avg_sq")
        return state

    def _hyper(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(
            lr=float(group["lr"]), beta1=beta1, beta1_weight=1.0 - beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]), bias_correction=bool(group["bias_correction"]),
        )

    def _derived_hyper(self, hyper, plan, stepping):
        derived = _decay_factor(hyper) if hyper["decoupled"] else {}
        if hyper["bias_correction"] and hyper["beta1"] > 0.0:
            # the kernels' step size η/(1 − β1^t) is largest at the params' smallest next t (1 for a param
            # without state): read only where a first step's would overflow float32 (a pass over the params)
            t = 1.0
            if not abs(hyper["lr"] / (1.0 - hyper["beta1"])) <= _FLOAT32_MAX:
                t = _smallest_next_count(self.state, plan.params, stepping)
            derived[f"step size lr/(1 - beta1^t) at t={t:.0f}"] = hyper["lr"] / (1.0 - hyper["beta1"] ** t)
        return derived

    def _bucket_hyper(self, bucket, group):
        """A Tensor β1 as torch.optim.Adam and AdamW read it: m's lerp weight 1 − β1
        taken with β1 cast to the param's dtype (a float64 tensor's 0.9 gives
        float32 params the weight 1 − float32(0.9); a bfloat16 param's β1 = 0.999
        is 1, the weight 0), the bias correction 1 − β1^t with β1 as it is; a
        float64 bucket's weight is 1 − β1 as it is."""
        h = self._hyper(group)
        beta1 = group["betas"][0]
        if isinstance(beta1, Tensor) and bucket.dtype != torch.float64:
            h["beta1_weight"] = float(1 - beta1.detach().reshape(()).to("cpu", bucket.dtype))
        return h

    def _reference_step(self, bucket, group):
        h = self._bucket_hyper(bucket, group)
        for p, g, st in bucket.each():
            reference.adam_step(
                p, g, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"),
                _advance(st["step"]), **h,
            )


class AdamW(_AdamFamily):
    """AdamW (decoupled weight decay θ ← θ·(1−ηλ)), a drop-in for torch.optim.AdamW:
    same defaults, state keys and checkpoints.  ``bias_correction=False`` gives the
    BERT-style update.  ``backend``: 'reference', 'cpu', 'cuda', 'triton' or None
    (the fastest available for the parameters' device)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, bias_correction=True,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, bias_correction, True,
                         torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Adam(_AdamFamily):
    """Adam with L2 weight decay (g ← g + λθ), a drop-in for torch.optim.Adam;
    ``decoupled_weight_decay=True`` (keyword-only, as in torch.optim.Adam) makes
    it AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, bias_correction=True,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False,
                 decoupled_weight_decay=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, bias_correction, decoupled_weight_decay,
                         torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights))


class RAdam(FusedOptimizer):
    """RAdam (Liu et al., arXiv:1908.03265), a drop-in for torch.optim.RAdam.  The update is
    rectified when ρ_t > ``rectify_threshold`` (5, like torch; the paper uses 4).
    Weight decay is L2 unless ``decoupled_weight_decay=True``."""

    algorithm = "radam"
    state_keys = ("exp_avg", "exp_avg_sq")
    core_group_keys = ("lr", "betas", "eps", "weight_decay")
    torch_setstate_defaults = dict(foreach=None, maximize=False, differentiable=False,
                                   decoupled_weight_decay=False, capturable=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, rectify_threshold=5.0,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, rectify_threshold=rectify_threshold,
            **torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights),
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        hp.adam_group(group)
        hp.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        # r_t = sqrt((ρt−4)(ρt−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρt)) is real only where ρt ≥ 4.
        hp.finite_at_least("rectify_threshold", group["rectify_threshold"], 4.0)

    def _new_state(self, p, group):
        return adam_state(p, self._fresh_moment)

    def _hyper(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=bool(group["decoupled_weight_decay"]),
            rectify_threshold=float(group["rectify_threshold"]),
        )

    def _derived_hyper(self, hyper, plan, stepping):  # (its step size, (m/(1 − β1^t))·η, is taken per element)
        return _decay_factor(hyper) if hyper["decoupled"] else {}

    def _reference_step(self, bucket, group):
        h = self._hyper(group)
        for p, g, st in bucket.each():
            reference.radam_step(p, g, st["exp_avg"], st["exp_avg_sq"], _advance(st["step"]), **h)


class Lion(FusedOptimizer):
    """Lion (Chen et al., arXiv:2302.06675) / SignSGDM-W (sign momentum, decoupled decay):
    θ ← θ·(1−ηλ) − η·sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g.
    State: ``exp_avg`` (and ``step``, a counter)."""

    algorithm = "lion"
    state_keys = ("exp_avg",)
    core_group_keys = ("lr", "betas", "weight_decay")

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      **torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights)))

    def _check_group(self, group):
        hp.nonnegative("learning rate", group["lr"])
        hp.betas(group["betas"])
        hp.nonnegative("weight_decay value", group["weight_decay"])

    def _new_state(self, p, group):
        return {"step": _new_step(), "exp_avg": self._fresh_moment(p, "exp_avg")}

    def _hyper(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                    weight_decay=float(group["weight_decay"]))

    def _derived_hyper(self, hyper, plan, stepping):
        return _decay_factor(hyper)

    def _reference_step(self, bucket, group):
        h = self._hyper(group)
        for p, g, st in bucket.each():
            _advance(st["step"])
            reference.lion_step(p, g, st["exp_avg"], **h)


def sum_of_squares(t: Tensor) -> Tensor:
    """Σ|x|² over t's entries, a float64 0-d tensor on t's device, bitwise the same
    at any torch thread count (amos_fused/deterministic_sums.py), so the scales
    inferred from it (Amos's η, ScaledAdamW's ‖ε0‖, amos_param_groups) are too.  A
    sharded DTensor: its local shard's sum, summed over the mesh dims that shard
    it (one all-reduce)."""
    total = local_sum_of_squares(t.to_local() if is_dtensor(t) else t)
    if is_dtensor(t):
        total = sum_over_shards([total], [shard_groups(t)])[0]
    return total


def refuse_valueless(p: Tensor, setting: str) -> None:
    """Raises a ValueError where ``setting`` is to be inferred from the values of a
    param that has none (on the meta device, or a FakeTensor)."""
    if p.is_meta:
        raise ValueError(
            f"cannot infer {setting} from a param on the meta device ({p.dtype}, shape {tuple(p.shape)}), which "
            f"holds no values: give {setting} explicitly, or make the optimizer once the params hold their "
            "initial values (after module.to_empty(...) and their init)")
    if is_fake(p):
        raise ValueError(
            f"cannot infer {setting} from a FakeTensor param ({p.dtype}, shape {tuple(p.shape)}, under "
            f"FakeTensorMode), which holds no values: give {setting} explicitly")


def initial_rms_eta(p: Tensor) -> float:
    """Amos's default η for a tensor: the RMS of its (freshly initialized) entries,
    0.5 where that is zero (zero-init biases); thread-count independent
    (``sum_of_squares``)."""
    if p.numel() == 0:
        return 0.5
    refuse_valueless(p, "eta")
    rms = math.sqrt(float(sum_of_squares(p)) / p.numel())
    return rms if rms > 0 and math.isfinite(rms) else 0.5


_FUSED_MAX_RUNS = 16  # kAmosMaxDims of csrc/amos_layout.h


class Amos(FusedOptimizer):
    """Amos (Tian & Parikh, arXiv:2210.11693; semantics of google-research/jestimator's
    amos.py): adaptive weight decay toward a model-oriented scale η, no learning-rate
    schedule needed.

    ``lr`` is the global learning rate ξ.  ``eta``: the expected RMS of the tensor's
    entries; None infers it per tensor from its RMS at construction (0.5 for
    all-zero tensors) and stores the values in the group as a tuple, one per param,
    so checkpoints keep them.  ``reduce_axes``: None (elementwise slots), 'all'
    (one scalar slot per tensor) or a tuple of dims averaged over.  State keys:
    ``step``, ``v``, ``b`` (slot-shaped) and ``mu`` (with momentum)."""

    algorithm = "amos"
    state_keys = ("v", "b", "mu")
    core_group_keys = ("lr", "eta", "beta")
    slot_keys = ("v", "b")
    per_param_keys = ("eta",)
    reciprocal_in_step = ("epsilon",)
    positive_in_step = ("eta",)
    supports_complex = False
    fused_needs_contiguous = True

    def __init__(self, params, lr, eta=None, reduce_axes=None, beta=0.999, momentum=None,
                 clip_value=None, extra_l2=0.0, d_coef=0.25, c_coef=0.25, epsilon=2.0**-125,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        defaults = dict(
            lr=lr, eta=eta, reduce_axes=reduce_axes, beta=beta, momentum=momentum,
            clip_value=clip_value, extra_l2=extra_l2, d_coef=d_coef, c_coef=c_coef,
            epsilon=epsilon,
            **torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights),
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        hp.nonnegative("learning rate", group["lr"])
        hp.in_unit_interval("beta", group["beta"])
        hp.optional_in_unit_interval("momentum", group["momentum"])
        hp.optional_positive("clip_value", group["clip_value"])
        hp.nonnegative("extra_l2", group["extra_l2"])
        hp.nonnegative("d_coef", group["d_coef"])
        hp.nonnegative("c_coef", group["c_coef"])
        hp.positive("epsilon", group["epsilon"])

    def _default_per_param(self, key, group, param):
        return initial_rms_eta(param)

    def _check_group_params(self, group):
        if group["eta"] is None:
            group["eta"] = tuple(self._default_per_param("eta", group, p) for p in group["params"])
        if isinstance(group["eta"], (tuple, list)):
            group["eta"] = tuple(group["eta"])
            if len(group["eta"]) != len(group["params"]):
                raise ValueError(f"Invalid eta: {len(group['eta'])} values for {len(group['params'])} params")
            for eta in group["eta"]:
                hp.positive("eta", eta)
        else:
            hp.positive("eta", group["eta"])
        for position, p in enumerate(group["params"]):
            try:
                normalize_reduce_axes(group["reduce_axes"], p.dim())
            except ValueError as error:
                raise ParamValueError(position, str(error)) from None

    def _check_per_param(self, index, key, values):
        for eta in values:
            hp.positive("eta", eta)

    def _step_state_keys(self, group):
        return ("v", "b", "mu") if group["momentum"] is not None else ("v", "b")

    def _check_slots(self, where, group, plan, positions, lists):
        """v and b must have the slot shape that the group's reduce_axes gives
        (changing reduce_axes after the state exists is refused here, before any
        write: clear that param's state to start its slots anew)."""
        axes = group["reduce_axes"]
        # (the cache follows the value and its types, not the object: a list edited in place, 1.0 or True
        # where 1 was, which the checks refuse; and the params' shapes: a p.data of another shape)
        key = (_typed(axes), [tuple(p.shape) for p in plan.params])
        cached = plan.cache.get("reduce_axes")
        if cached is None or cached[0] != key:
            cached = plan.cache["reduce_axes"] = (key, {})
        shapes = cached[1]
        for i, position in enumerate(positions):
            if position not in shapes:
                try:
                    shapes[position] = slot_shape(plan.params[position].shape, axes)
                except ValueError as error:
                    raise ValueError(f"{where(i)}: {error}") from None
            expected = shapes[position]
            for key in self.slot_keys:
                slot = lists[key][i]
                if tuple(slot.shape) != expected:
                    raise ValueError(
                        f"{where(i)}: state[{key!r}] has shape {tuple(slot.shape)} but "
                        f"reduce_axes={group['reduce_axes']!r} gives this param slots of shape {expected}; "
                        "neither reduce_axes nor the param's shape can change once it has state "
                        "(clear its state first)")

    def _slot_placements(self, p, group):
        return slot_placements(p, slot_shape(p.shape, group["reduce_axes"]),
                               reduced_dims(group["reduce_axes"], p.dim()))

    def _check_walk(self, where, group, backend, params, lists):
        """The fused kernels walk a tensor's dims merged into runs (neighbours both
        reduced or both kept, size-1 dims dropped, in memory order): at most
        _FUSED_MAX_RUNS of them (kAmosMaxDims, csrc/amos_layout.h), so only a param
        of more dims can exceed it."""
        for i, p in enumerate(params):
            if p.dim() <= _FUSED_MAX_RUNS:
                continue
            try:
                torch.ops.amos_fused.amos_slot_layouts("Amos", [p], [lists["v"][i]], [lists["b"][i]])
            except ValueError:
                raise ValueError(
                    f"{where(i)}: reduce_axes={group['reduce_axes']!r} splits its dims into more than "
                    f"{_FUSED_MAX_RUNS} alternately reduced and kept runs, more than the fused {backend!r} "
                    "backend walks; use backend='reference'") from None

    def _new_state(self, p, group):
        slot = slot_shape(p.shape, group["reduce_axes"])
        state = {
            "step": _new_step(),
            "v": self._slot_zeros(p, slot, reduced_dims(group["reduce_axes"], p.dim())),
            "b": self._slot_zeros(p, slot, reduced_dims(group["reduce_axes"], p.dim())),
        }
        if group["momentum"] is not None:
            state["mu"] = self._fresh_moment(p, "mu")
        return state

    @staticmethod
    def _slot_zeros(p: Tensor, slot, reduced) -> Tensor:
        """A v / b slot of shape ``slot`` averaging over the ``reduced`` dims: 0-dim,
        or p's dims (reduced ones of size 1) in p's memory order; for a DTensor
        param, a DTensor on its mesh (sharding.slot_zeros)."""
        def make(like, shape):
            if len(shape) != like.dim():
                return torch.zeros(shape, dtype=like.dtype, device=like.device)
            return zeros_in_memory_order(like, shape)
        return slot_zeros(p, slot, reduced, make) if is_dtensor(p) else make(p, slot)

    def _own_copy(self, param, key, value, master=False, upcast=False, group=None):
        if key in self.slot_keys and isinstance(value, Tensor):
            like = param
            if master and (value.dtype == torch.float32 or (upcast and value.is_floating_point())):
                like = param.detach().to(torch.float32)  # the slots of a param with a float32 master
            slot = tuple(value.shape)
            reduced = loaded_slot_dims(param.shape, slot, None if group is None else group.get("reduce_axes"))
            return self._slot_zeros(like, slot, reduced).copy_(value.detach().to(like.device, like.dtype))
        return super()._own_copy(param, key, value, master, upcast, group)

    def _hyper(self, group):
        momentum, clip_value = group["momentum"], group["clip_value"]
        return dict(lr=float(group["lr"]), beta=float(group["beta"]), momentum=float(momentum or 0.0),
                    clip_value=float(clip_value or 0.0), extra_l2=float(group["extra_l2"]),
                    d_coef=float(group["d_coef"]), c_coef=float(group["c_coef"]),
                    epsilon=float(group["epsilon"]), use_momentum=momentum is not None,
                    clip=clip_value is not None)

    def _sums_over_shards(self, param, group):
        return bool(shard_groups(param, reduced_dims(group["reduce_axes"], param.dim())))

    def _sharded_step(self, bucket, group):
        """Slots averaged over a sharded dim: every shard's Σg² per slot, summed over
        the shards in one all-reduce per bucket, divided by the slot's element count
        (the slots are replicated there, so every rank updates them alike)."""
        h = dict(lr=float(group["lr"]), beta=float(group["beta"]), momentum=_optional_float(group["momentum"]),
                 extra_l2=float(group["extra_l2"]), d_coef=float(group["d_coef"]),
                 c_coef=float(group["c_coef"]), epsilon=float(group["epsilon"]))
        parts, groups, phase1 = [], [], []
        for (p, g, st), owner in zip(bucket.each(), bucket.owners):
            step = _next_step(st["step"])
            theta, g = reference.amos_grad(p, g, clip_value=_optional_float(group["clip_value"]))
            dims = reduced_dims(group["reduce_axes"], g.dim())
            across = shard_groups(owner, dims)
            # (fixed-order sums, as the reference's: the same bits at any thread count)
            if across:
                part = fixed_order_sum(g.double() * g.double(), dims)
            else:
                part = fixed_order_mean(reference.squares(g), dims).to(g.dtype) if dims else g * g
            parts.append(part)
            groups.append(across)
            phase1.append((step, theta, g, dims, owner))
        sums = sum_over_shards(parts, groups)
        for i, ((p, _, st), eta) in enumerate(zip(bucket.each(), bucket.per_param["eta"])):
            _advance(st["step"])  # (after the all-reduce: one that raises leaves the counters)
            step, theta, g, dims, owner = phase1[i]
            if owner.numel() == 0:
                continue
            g2 = sums[i]
            if groups[i]:
                g2 = (g2 / math.prod(owner.shape[d] for d in dims)).to(theta.dtype)
            reference.amos_apply(p, st["v"], st["b"], st.get("mu"), theta, g, g2, step, eta=eta, **h)

    def _reference_step(self, bucket, group):
        for (p, g, st), eta in zip(bucket.each(), bucket.per_param["eta"]):
            reference.amos_step(
                p, g, st["v"], st["b"], st.get("mu"), _advance(st["step"]),
                lr=float(group["lr"]), eta=eta,
                reduce_axes=group["reduce_axes"], beta=float(group["beta"]),
                momentum=_optional_float(group["momentum"]), clip_value=_optional_float(group["clip_value"]),
                extra_l2=float(group["extra_l2"]), d_coef=float(group["d_coef"]),
                c_coef=float(group["c_coef"]), epsilon=float(group["epsilon"]),
            )
