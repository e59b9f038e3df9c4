"""The Triton ops: the same names, positional arguments and keywords as the torch
ops of csrc/ops.cpp (``torch.ops.amos_fused.<name>``), so an optimizer steps a
bucket with ``ops.adam_step(...)`` in place of ``torch.ops.amos_fused.adam_step(...)``.

Each op checks its inputs before any write, reads the GradScaler inputs on the
host (a non-zero ``found_inf`` skips the whole step, step counters included;
grads are multiplied by 1/``grad_scale`` in the kernel), advances the float32
CPU step counters, computes the per-tensor coefficients in double on the host
and launches the kernels over the whole bucket (adam.py, amos.py, norm_scaled.py).
Tensors: CUDA, or CPU under TRITON_INTERPRET=1; float32 / bfloat16 / float16
with fp32 math, float64 with fp64 math."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import adam, amos, norm_scaled
from .common import check_bucket, read_grad_scaling, require


def _advance_steps(steps: Sequence[Tensor]) -> Tensor:
    """Adds 1 to every float32 step counter (in float32, as the C++ ops do); returns
    the new values in double."""
    steps = list(steps)
    torch._foreach_add_(steps, 1.0)
    try:
        return torch.stack(steps).reshape(-1).double()
    except RuntimeError:  # counters of different shapes, e.g. () and (1,)
        return torch.stack([s.reshape(()) for s in steps]).double()


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], steps: List[Tensor],
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled: bool, amsgrad: bool, bias_correction: bool,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Adam / AdamW (decoupled), amsgrad, optional bias correction."""
    op = "amos_fused.triton.adam_step"
    if amsgrad and len(max_exp_avg_sqs) == 0:
        raise ValueError(f"{op}: amsgrad=True needs max_exp_avg_sqs")
    check_bucket(op, params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                                     "max_exp_avg_sqs": max_exp_avg_sqs if amsgrad else []}, steps)
    require(op, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    coef = adam.adam_coefficients(_advance_steps(steps), lr, beta1, beta2, eps, weight_decay,
                                  decoupled, bias_correction, unscale)
    adam.launch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                     coef, l2=not decoupled and weight_decay != 0.0)


def radam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
               exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, decoupled: bool,
               rectify_threshold: float, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None) -> None:
    """RAdam, L2 or decoupled decay."""
    op = "amos_fused.triton.radam_step"
    check_bucket(op, params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, steps)
    require(op, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    coef = adam.radam_coefficients(_advance_steps(steps), lr, beta1, beta2, eps, weight_decay,
                                   decoupled, rectify_threshold, unscale)
    adam.launch_radam(params, grads, exp_avgs, exp_avg_sqs, coef,
                      l2=not decoupled and weight_decay != 0.0)


def lion_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              steps: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Lion / SignSGDM-W (the step counter is kept for checkpoints only)."""
    op = "amos_fused.triton.lion_step"
    check_bucket(op, params, grads, {"exp_avgs": exp_avgs}, steps)
    require(op, exp_avgs=exp_avgs, steps=steps)
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    _advance_steps(steps)
    coef = adam.lion_coefficients(len(params), lr, beta1, beta2, weight_decay, unscale)
    adam.launch_lion(params, grads, exp_avgs, coef)


def amos_step(params: List[Tensor], grads: List[Tensor], vs: List[Tensor], bs: List[Tensor],
              mus: List[Tensor], steps: List[Tensor], etas: Sequence[float], lr: float,
              beta: float, momentum: Optional[float], clip_value: Optional[float],
              extra_l2: float, d_coef: float, c_coef: float, epsilon: float,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Amos; each tensor's slot layout is read off the shapes of its v / b."""
    op = "amos_fused.triton.amos_step"
    with_momentum = momentum is not None
    check_bucket(op, params, grads, {"mus": mus if with_momentum else []}, steps, {"vs": vs, "bs": bs})
    require(op, steps=steps)
    if with_momentum:
        require(op, mus=mus)
    if len(etas) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(etas)} etas")
    for i, (v, b) in enumerate(zip(vs, bs)):
        if b.shape != v.shape:
            raise ValueError(f"{op}: bs[{i}] has shape {list(b.shape)} but vs[{i}] has "
                             f"{list(v.shape)}")
    meta = amos.amos_meta(op, params, vs, bs, mus if with_momentum else None)
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    coef = amos.amos_coefficients(_advance_steps(steps), [float(e) for e in etas], lr, beta,
                                  momentum, clip_value, extra_l2, d_coef, c_coef, epsilon, unscale)
    amos.launch_amos(meta, params, grads, coef, momentum=with_momentum,
                     clip=clip_value is not None)


def _check_moments(op, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
    check_bucket(op, params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, steps)
    require(op, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)


def scaled_adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                     exp_avg_sqs: List[Tensor], steps: List[Tensor], init_norms: Sequence[float],
                     lr: float, beta1: float, beta2: float, eps: float, p: float,
                     inverse_time: bool, q: float, grad_scale: Optional[Tensor] = None,
                     found_inf: Optional[Tensor] = None) -> None:
    """Scale-aware Adam: θ ← θ − (α_t·u + ρ_t·θ), α_t = α0·‖ε0‖/‖u‖·s(t)."""
    op = "amos_fused.triton.scaled_adam_step"
    _check_moments(op, params, grads, exp_avgs, exp_avg_sqs, steps)
    if len(init_norms) != len(params):
        raise ValueError(f"{op}: {len(params)} params but {len(init_norms)} init_norms")
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    coef = norm_scaled.scaled_adam_coefficients(_advance_steps(steps), [float(x) for x in init_norms],
                                                lr, beta1, beta2, eps, p, inverse_time, q, unscale)
    norm_scaled.launch_norm_scaled(params, grads, exp_avgs, exp_avg_sqs, coef, lamb=False)


def lamb_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, bias_correction: bool,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB: θ ← θ − η·(‖θ‖/‖u‖)·u, u = m̂/(sqrt(v̂)+ε) + λθ (ratio 1 when a norm is 0)."""
    op = "amos_fused.triton.lamb_step"
    _check_moments(op, params, grads, exp_avgs, exp_avg_sqs, steps)
    skip, unscale = read_grad_scaling(op, grad_scale, found_inf)
    if skip:
        return
    coef = norm_scaled.lamb_coefficients(_advance_steps(steps), lr, beta1, beta2, eps, weight_decay,
                                         bias_correction, unscale)
    norm_scaled.launch_norm_scaled(params, grads, exp_avgs, exp_avg_sqs, coef, lamb=True)
