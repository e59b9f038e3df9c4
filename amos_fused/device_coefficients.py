"""Every tensor's per-step coefficients computed on the device, for capturable
steps (``capturable=True``): from the step counters on the params' device, a
learning rate that may be a device tensor, and GradScaler's ``grad_scale``, with
torch ops only, so a step reads nothing on the host and can be captured in a CUDA
graph and replayed: host numbers become device values through fill kernels
(torch.full, the number a kernel argument), never through a host-to-device copy,
which graph capture forbids.

The formulas are csrc/step_coefficients.h's (the host computes the same table in
double for every other step), column for column, in float64: the table is the
one the Triton kernels read (its columns named by the algorithm's contract).
``tests/test_triton_capturable.py`` holds both to each other."""
from __future__ import annotations

import struct
from typing import Callable, Dict, Mapping, Sequence, Union

import torch
from torch import Tensor

from .contracts import contract

Number = Union[float, Tensor]


def _lerp_small(weight: float, float32_math: bool) -> float:
    """torch.lerp's choice of form for the weight 1 − β1, taken as the math type
    holds it: float32 for every param dtype but float64 (step_coefficients.h)."""
    if float32_math:  # (rounded to nearest by the C cast; a weight is in [0, 1])
        weight = struct.unpack("f", struct.pack("f", weight))[0]
    return 1.0 if abs(weight) < 0.5 else 0.0


def _adam(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    # bc1 = 1 − β1^t, bc2 = 1 − β2^t (both 1 without bias correction)
    bc1 = 1.0 - torch.pow(h["beta1"], t) if h["bias_correction"] else torch.ones_like(t)
    bc2 = 1.0 - torch.pow(h["beta2"], t) if h["bias_correction"] else torch.ones_like(t)
    decoupled = bool(h["decoupled"])
    return dict(beta1_complement=h["beta1_weight"], beta2=h["beta2"], beta2_complement=1.0 - h["beta2"],
                param_decay=1.0 - lr * h["weight_decay"] if decoupled else 1.0,
                l2=0.0 if decoupled else h["weight_decay"], eps=h["eps"], bc2_sqrt=bc2.sqrt(),
                neg_step_size=-(lr / bc1), lerp_small=_lerp_small(h["beta1_weight"], float32_math))


def _radam(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    # ρ∞ = 2/(1−β2) − 1, ρt = ρ∞ − 2tβ2^t/(1−β2^t),
    # r = sqrt((ρt−4)(ρt−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρt)) when ρt > threshold
    beta2_t = torch.pow(h["beta2"], t)
    bc2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - h["beta2"]) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2_t / bc2
    rectified = rho_t > h["rectify_threshold"]
    rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).sqrt()
    decoupled = bool(h["decoupled"])
    return dict(beta1_complement=1.0 - h["beta1"], beta2=h["beta2"], beta2_complement=1.0 - h["beta2"],
                param_decay=1.0 - lr * h["weight_decay"] if decoupled else 1.0,
                l2=0.0 if decoupled else h["weight_decay"], eps=h["eps"], bc1=1.0 - torch.pow(h["beta1"], t),
                lr=lr, bc2_sqrt=bc2.sqrt(), rect=torch.where(rectified, rect, 1.0),
                rectified=rectified.double(), lerp_small=_lerp_small(1.0 - h["beta1"], float32_math))


def _lion(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    return dict(beta1=h["beta1"], beta1_complement=1.0 - h["beta1"], beta2=h["beta2"],
                beta2_complement=1.0 - h["beta2"], param_decay=1.0 - lr * h["weight_decay"], neg_lr=-lr)


def _amos(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    # α = ξ·η per tensor; the schedule-free coefficients of Amos (step_coefficients.h)
    alpha = lr * per_tensor
    momentum = h["momentum"] if h["use_momentum"] else 0.0
    lr = lr if isinstance(lr, Tensor) else torch.full((), float(lr), dtype=torch.float64, device=t.device)
    return dict(beta=h["beta"], beta_complement=1.0 - h["beta"], bias_correction=1.0 - torch.pow(h["beta"], t),
                epsilon=h["epsilon"], c_scale=h["c_coef"] * lr.sqrt(), lr_sq=lr * lr, alpha=alpha,
                d_scale=h["d_coef"] * alpha.sqrt(), extra_l2=h["extra_l2"],
                clip=h["clip_value"] if h["clip"] else 0.0, momentum=momentum, momentum_complement=1.0 - momentum)


def _moments(beta1, beta2, eps, weight_decay, bias_correction, t, float32_math) -> Dict[str, Number]:
    bc1 = 1.0 - torch.pow(beta1, t) if bias_correction else torch.ones_like(t)
    bc2 = 1.0 - torch.pow(beta2, t) if bias_correction else torch.ones_like(t)
    return dict(beta1_complement=1.0 - beta1, beta2=beta2, beta2_complement=1.0 - beta2, eps=eps, bc1=bc1,
                bc2_sqrt=bc2.sqrt(), weight_decay=weight_decay, lerp_small=_lerp_small(1.0 - beta1, float32_math))


def _scaled_adam(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    # s(t) = 1/(2·α0·p·t + 1) (inverse_time) or 1/(α0·p·t + 1)²; scale = α0·s, ρ = α0²/(2q)·s
    rate = lr * h["p"] * t
    s = 1.0 / (2.0 * rate + 1.0) if h["inverse_time"] else 1.0 / ((rate + 1.0) * (rate + 1.0))
    return dict(_moments(h["beta1"], h["beta2"], h["eps"], 0.0, True, t, float32_math), scale=lr * s,
                rho=lr * lr / (2.0 * h["q"]) * s, init_norm=per_tensor)


def _lamb(h, t, lr, per_tensor, float32_math) -> Dict[str, Number]:
    return dict(_moments(h["beta1"], h["beta2"], h["eps"], h["weight_decay"], bool(h["bias_correction"]), t,
                         float32_math),
                scale=lr, rho=0.0, init_norm=0.0)


_COEFFICIENTS: Dict[str, Callable[..., Dict[str, Number]]] = {
    "adam": _adam, "radam": _radam, "lion": _lion, "amos": _amos, "scaled_adam": _scaled_adam, "lamb": _lamb,
}


def _filled(values: Sequence[float], device: torch.device) -> Tensor:
    """A float64 vector of host numbers on ``device``, one fill kernel per run of
    equal values (no host-to-device copy)."""
    runs: list = []
    for x in values:
        if runs and runs[-1][0] == float(x):
            runs[-1][1] += 1
        else:
            runs.append([float(x), 1])
    parts = [torch.full((count,), value, dtype=torch.float64, device=device) for value, count in runs]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _column(value: Number, n: int, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(torch.float64).expand(n)
    return torch.full((n,), float(value), dtype=torch.float64, device=device)


def algorithms() -> Sequence[str]:
    return tuple(_COEFFICIENTS)


def coefficient_table(algorithm: str, steps: Sequence[Tensor], hyper: Mapping[str, Number],
                      per_tensor: Sequence[float], grad_scale: Union[Tensor, None], *,
                      float32_math: bool) -> Tensor:
    """The [len(steps), columns] float64 table of a step on the steps' device:
    ``steps`` the float32 counters BEFORE this step's increment (the table is at
    t = count + 1, in float32 as torch.optim adds it), ``hyper`` by the contract's
    names (``lr`` a float or a one-element tensor), ``grad_scale`` GradScaler's
    scale (the grad_unscale column is its reciprocal) or None; ``float32_math``:
    the params are not float64 (the kernels compute in float32)."""
    device = steps[0].device
    t = (torch.stack([s.reshape(()) for s in steps]) + 1.0).double()  # float32 count + 1, then double
    h = {name: value.to(device=device, dtype=torch.float64).reshape(()) if isinstance(value, Tensor) else float(value)
         for name, value in hyper.items()}  # (tensors: lr, and what derives from it, read on the device)
    lr = h["lr"]
    eta = _filled(list(per_tensor) or [0.0] * len(steps), device)
    values = _COEFFICIENTS[algorithm](h, t, lr, eta, float32_math)
    values["grad_unscale"] = 1.0 if grad_scale is None else 1.0 / grad_scale.to(torch.float64).reshape(())
    columns = contract(algorithm).columns
    return torch.stack([_column(values[name], len(steps), device) for name in columns], dim=1).contiguous()
