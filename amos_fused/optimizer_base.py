"""The machinery every amos_fused optimizer shares: checking a step's inputs
before anything is written, bucketing, lazy state, backend dispatch and
checkpoint loading.  Subclasses (optim.py) only say what their state is and how
one bucket is stepped by the fused kernels and by the reference."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import backend_for, check_backend, fused_ops
from .buckets import Bucket, GroupPlan, make_buckets

# amos_fused::GradProblem (csrc/checks.h)
_SPARSE, _DTYPE, _DEVICE, _SHAPE, _LAYOUT = 1, 2, 3, 4, 5

# torch.optim group flags that change the math and that we do not implement.
_REFUSED_TORCH_FLAGS = ("maximize", "differentiable")


def _is_dense(t: Tensor) -> bool:
    """True when t's elements fill one block of memory without gaps or overlap
    (any dim order), which is what the fused kernels walk."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Work:
    """One param group's step, checked and ready to run."""

    def __init__(self, group: dict, plan: Optional[GroupPlan], params: List[Tensor], grads: List[Tensor]):
        self.group, self.plan, self.params, self.grads = group, plan, params, grads


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the amos_fused optimizers.  Subclasses set ``algorithm`` and
    ``state_keys`` and implement ``_check_group``, ``_new_state``, ``_fused_step``
    and ``_reference_step``."""

    algorithm: str = ""
    state_keys: Tuple[str, ...] = ()
    # torch.amp.GradScaler hands us `grad_scale` / `found_inf` (as attributes)
    # instead of unscaling the grads itself; the kernels unscale in-kernel and skip
    # the step when found_inf is set.
    _step_supports_amp_scaling = True
    # The fused kernels walk params in memory order; some need it row-major.
    fused_needs_contiguous: bool = False

    def __init__(self, params, defaults: Dict[str, Any]):
        self._plans: Dict[int, GroupPlan] = {}
        super().__init__(params, defaults)

    # ---- subclass hooks ---------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Raises ValueError on a bad scalar hyper-parameter of ``group`` (run at
        every step: schedulers may write them)."""

    def _check_group_params(self, group: dict) -> None:
        """Checks (and completes) the per-param settings of ``group``; run when the
        group is added or loaded, not at every step."""

    def _new_state(self, param: Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _fused_step(self, ops, bucket: Bucket, grads: List[Tensor], group: dict) -> None:
        """Steps the bucket with ``ops.<algorithm>_step`` (``ops``: torch.ops.amos_fused,
        or the Triton ops with the same signatures); pass ``**self._grad_scaling()``."""
        raise NotImplementedError

    def _reference_step(self, bucket: Bucket, grads: List[Tensor], group: dict) -> None:
        raise NotImplementedError

    # ---- construction -----------------------------------------------------
    @property
    def _name(self) -> str:
        return type(self).__name__

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group like torch.optim does, then checks it; a group that fails
        the checks is not kept."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_backend(group["backend"], self.algorithm, self._name)
            self._check_group(group)
            self._check_group_params(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _per_param(self, group: dict, key: str, bucket: Bucket) -> List[float]:
        """``group[key]`` for each param of ``bucket``: the group value is a float
        (for every param) or a tuple with one value per param of the group.  Cached
        on the bucket while the group keeps the same value object."""
        value = group[key]
        cached = bucket.cache.get(key)
        if cached is not None and cached[0] is value:
            return cached[1]
        if isinstance(value, (tuple, list)):
            position = {id(q): i for i, q in enumerate(group["params"])}
            values = [float(value[position[id(p)]]) for p in bucket.params]
        else:
            values = [float(value)] * len(bucket.params)
        bucket.cache[key] = (value, values)
        return values

    # ---- step -------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.  Every group's inputs are checked
        before anything is written: a step that raises changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._prepare(index, group) for index, group in enumerate(self.param_groups)]
        for index, item in enumerate(work):
            if item is not None:
                self._run(index, item)
        return loss

    def _prepare(self, index: int, group: dict) -> Optional[_Work]:
        self._check_group(group)
        plan = self._plans.get(index)
        if plan is not None and not plan.matches(group["params"]):
            plan = None
            del self._plans[index]
        order = plan.order if plan is not None else group["params"]
        if not order:
            return None
        grads = [p.grad for p in order]
        missing = self._check_grads(index, order, grads)
        if plan is not None and missing == 0:
            if plan.checked_backend != group["backend"]:
                self._check_backends(index, plan.buckets)
                plan.checked_backend = group["backend"]
            return _Work(group, plan, order, grads)
        active = [(p, g) for p, g in zip(order, grads) if g is not None]
        if not active:
            return None
        self._check_devices(index, group["params"])
        params = [p for p, _ in active]
        self._check_backends(index, make_buckets(params, {p: {} for p in params}, ()))
        return _Work(group, None, params, [g for _, g in active])

    def _check_grads(self, index: int, params: List[Tensor], grads: List[Optional[Tensor]]) -> int:
        """Checks every grad against its param (in C++); copies a grad whose strides
        differ from its param's into the param's layout.  Returns the number of
        missing grads."""
        while True:
            missing, bad, problem = torch.ops.amos_fused.check_grads(params, grads)
            if bad < 0:
                return missing
            if problem != _LAYOUT:
                raise self._grad_error(index, params[bad], grads[bad], problem)
            p = params[bad]
            grads[bad] = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device).copy_(grads[bad])

    def _where(self, index: int, param: Tensor) -> str:
        position = next(i for i, p in enumerate(self.param_groups[index]["params"]) if p is param)
        return (
            f"{self._name}: param_groups[{index}]['params'][{position}] "
            f"({param.dtype}, shape {tuple(param.shape)}, on {param.device})"
        )

    def _grad_error(self, index: int, param: Tensor, grad: Tensor, problem: int) -> Exception:
        where = self._where(index, param)
        if problem == _SPARSE:
            return RuntimeError(f"{where}: sparse gradients are not supported (grad layout {grad.layout})")
        if problem == _DTYPE:
            return TypeError(f"{where}: grad has dtype {grad.dtype}, expected {param.dtype}")
        if problem == _DEVICE:
            return ValueError(f"{where}: grad is on {grad.device}, expected {param.device}")
        return ValueError(f"{where}: grad has shape {tuple(grad.shape)}, expected {tuple(param.shape)}")

    def _check_devices(self, index: int, params: Sequence[Tensor]) -> None:
        devices = sorted({str(p.device) for p in params})
        if len(devices) > 1:
            raise ValueError(
                f"{self._name}: param_groups[{index}] mixes devices {devices}; "
                "put the params of each device in a param group of their own"
            )

    def _check_backends(self, index: int, buckets: List[Bucket]) -> None:
        group = self.param_groups[index]
        for bucket in buckets:
            backend = backend_for(group["backend"], self.algorithm, bucket.device, self._name)
            if backend == "reference":
                continue
            for p in bucket.params:
                if not (p.is_contiguous() if self.fused_needs_contiguous else _is_dense(p)):
                    need = "contiguous" if self.fused_needs_contiguous else "dense in memory (not a strided view)"
                    raise ValueError(
                        f"{self._where(index, p)}: the fused {backend!r} backend of {self._name} "
                        f"needs params that are {need}; use backend='reference'"
                    )

    def _grad_scaling(self) -> Dict[str, Optional[Tensor]]:
        """GradScaler inputs set by torch.amp.GradScaler.step, as op keyword arguments."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    def _reference_grads(self, grads: List[Tensor]) -> Optional[List[Tensor]]:
        """Grads for the reference: unscaled by GradScaler's scale, or None when
        found_inf says to skip the step."""
        scaling = self._grad_scaling()
        if scaling["found_inf"] is not None and float(scaling["found_inf"]) != 0.0:
            return None
        if scaling["grad_scale"] is not None:
            unscale = 1.0 / float(scaling["grad_scale"])
            return [g * unscale for g in grads]
        return grads

    def _run(self, index: int, work: _Work) -> None:
        group = work.group
        if work.plan is not None:
            buckets, plan_grads = work.plan.buckets, work.grads
            grads_of = lambda bucket: plan_grads[bucket.start : bucket.stop]  # noqa: E731
        else:
            for p in work.params:
                if not self.state[p]:
                    self.state[p] = self._new_state(p, group)
            buckets = make_buckets(work.params, self.state, ("step",) + self.state_keys)
            by_param = {id(p): g for p, g in zip(work.params, work.grads)}
            grads_of = lambda bucket: [by_param[id(p)] for p in bucket.params]  # noqa: E731
        for bucket in buckets:
            backend = backend_for(group["backend"], self.algorithm, bucket.device, self._name)
            if backend == "reference":
                unscaled = self._reference_grads(grads_of(bucket))
                if unscaled is not None:
                    self._reference_step(bucket, unscaled, group)
            else:
                self._fused_step(fused_ops(backend), bucket, grads_of(bucket), group)
        if work.plan is None and all(self.state[p] for p in group["params"]):
            self._plans[index] = GroupPlan.build(group["params"], self.state, ("step",) + self.state_keys)

    # ---- checkpoints ------------------------------------------------------
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint of this optimizer or of the matching torch.optim one.
        Every state tensor is copied (never aliased) into the layout of its param;
        ``step`` becomes a float32 CPU scalar."""
        for index, group in enumerate(state_dict.get("param_groups", [])):
            for flag in _REFUSED_TORCH_FLAGS:
                if group.get(flag):
                    raise ValueError(
                        f"{self._name}: cannot load param_groups[{index}] with {flag}=True "
                        "(not supported by amos_fused)"
                    )
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key, value in list(state.items()):
                state[key] = self._own_copy(param, key, value)
        self._plans = {}
        for group in self.param_groups:
            check_backend(group["backend"], self.algorithm, self._name)
            self._check_group(group)
            self._check_group_params(group)

    @staticmethod
    def _own_copy(param: Tensor, key: str, value) -> object:
        if key == "step":
            return torch.tensor(float(value), dtype=torch.float32)
        if not isinstance(value, Tensor):
            return value
        value = value.detach()
        if value.shape == param.shape:
            return torch.empty_like(param).copy_(value)
        return value.to(device=param.device, dtype=param.dtype, copy=True).contiguous()
