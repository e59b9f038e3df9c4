"""Optimizers that scale each tensor's Adam direction u = m̂/(sqrt(v̂)+ε) by a norm,
stepped in two phases: moments and ‖u‖ first, then θ.  ScaledAdamW follows
Su Jianlin, "基于Amos优化器思想推导出来的一些'炼丹策略'", kexue.fm, 2022-11-22;
LAMB follows You et al., arXiv:1904.00962."""
from __future__ import annotations

import math

import torch

from . import hyperparams as hp
from . import reference
from .deterministic_sums import local_sum_of_squares
from .optim import _advance, _next_step, adam_state, refuse_valueless, sum_of_squares
from .optimizer_base import FusedOptimizer, torch_flags
from .sharding import shard_groups, sharded_dims, sum_over_shards
from .theory import DECAYS, half_life_p, half_life_rate



def initial_sigma(p: torch.Tensor) -> float:
    """σ of a tensor for ‖ε0‖ = sqrt(numel)·σ (as in the kexue.fm post cited above): the
    init std (here its RMS) of weight matrices/kernels (0.5 for an all-zero or
    non-finite one: a zero-initialised matrix would otherwise never move); 0.5 for
    vectors (zero-init biases, one-init gains).  Thread-count independent, as Amos's inferred η
    (``optim.sum_of_squares``)."""
    if p.dim() < 2 or p.numel() == 0:
        return 0.5
    refuse_valueless(p, "sigma")
    rms = math.sqrt(float(sum_of_squares(p)) / p.numel())
    return rms if rms > 0 and math.isfinite(rms) else 0.5


class _AdamMoments(FusedOptimizer):
    """The two-phase rules.  A bucket with a sharded DTensor (FSDP2) is stepped by
    ``_sharded_step``: phase 1 on every local shard, the per-tensor sums of squares
    summed over the shards in one all-reduce per bucket, then phase 2 — the result
    of the unsharded step up to the order of summation."""

    state_keys = ("exp_avg", "exp_avg_sq")
    core_group_keys = ("lr", "betas", "eps")
    supports_complex = False  # per-tensor norms have no complex form here

    def _new_state(self, p, group):
        return adam_state(p, self._fresh_moment)

    def _sums_over_shards(self, param, group):
        return bool(sharded_dims(param))

    def _sharded_step(self, bucket, group):
        phase1 = []
        partials = torch.zeros(len(bucket.params), 2, dtype=torch.float64, device=bucket.device)
        for i, (p, g, st) in enumerate(bucket.each()):
            step = _next_step(st["step"])
            theta, m, v, u = self._direction(p, g, st, step, group)
            partials[i, 0] = local_sum_of_squares(u)  # fixed order: any thread count
            partials[i, 1] = local_sum_of_squares(theta)
            phase1.append((step, theta, m, v, u))
        sums = sum_over_shards(list(partials), [shard_groups(owner) for owner in bucket.owners])
        for i, ((p, _, st), (step, theta, m, v, u)) in enumerate(zip(bucket.each(), phase1)):
            _advance(st["step"])  # (after the all-reduce: one that raises leaves the counters)
            norms = sums[i].sqrt()
            self._apply(p, st, i, step, theta, m, v, u, norms[0], norms[1], bucket, group)


class ScaledAdamW(_AdamMoments):
    """Scale-aware Adam from the Amos derivation (Su Jianlin, kexue.fm, 2022-11-22)::

        θ ← θ − (α_t·u + ρ_t·θ),  α_t = α0·‖ε0‖/‖u‖·s(t),  ρ_t = α0²/(2q)·s(t)

    ``lr`` is α0.  ``decay``: 'inverse_square' (s = 1/(α0·p·t+1)², constant p) or
    'inverse_time' (s = 1/(2·α0·p·t+1), dynamic p).  Give ``p`` or ``half_life`` T
    (the rate halves after T steps: p is derived from T and the group's current
    lr, so α0·p stays fixed when a scheduler changes lr); neither means p = 0 (no
    decay of the rate).  ``sigma``: the expected init std
    of every tensor of the group, or None to infer it per tensor
    (``initial_sigma``); ‖ε0‖ = sqrt(numel)·σ is stored per param in the group's
    ``init_norm``.  State: ``step``, ``exp_avg``, ``exp_avg_sq``."""

    algorithm = "scaled_adam"
    per_param_keys = ("init_norm",)
    per_param_arrays = True  # (init_norm as a vector: one per param)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, p=None, half_life=None,
                 decay="inverse_square", q=1.0, sigma=None,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, p=p, half_life=half_life, decay=decay, q=q,
                        sigma=sigma, init_norm=None,
                        **torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights))
        super().__init__(params, defaults)

    def _check_group(self, group):
        hp.adam_group(group)
        if not (isinstance(group["decay"], str) and group["decay"] in DECAYS):
            raise ValueError(f"Invalid decay: {group['decay']!r} (expected one of {DECAYS})")
        hp.positive("q", group["q"])
        if group["sigma"] is not None:
            hp.positive("sigma", group["sigma"])
        if group["half_life"] is not None:
            hp.positive("half_life", group["half_life"])
        if group["p"] is not None:
            hp.nonnegative("p", group["p"])
        if group["p"] is not None and group["half_life"] is not None:
            raise ValueError(
                f"ScaledAdamW: give p or half_life, not both (p={group['p']}, half_life={group['half_life']})"
            )
        hp.nonnegative("p", self._schedule_p(group))

    @staticmethod
    def _schedule_p(group) -> float:
        """p of s(t): the group's p, or the one whose rate halves every half_life steps
        at the group's current lr (α0·p = (√2−1)/T or α0·p0 = 1/(2T)), or 0."""
        if group["half_life"] is not None:
            lr = float(group["lr"])
            if lr == 0.0:  # no step is taken (scale = ρ = 0 whatever p): a warm-up's or DCP's first step
                return 0.0
            return half_life_p(lr, float(group["half_life"]), group["decay"])
        return float(group["p"] or 0.0)

    def _default_per_param(self, key, group, param):
        # ‖ε0‖ = sqrt(numel)·σ, σ the group's or the param's own initial RMS
        sigma = group["sigma"]
        return math.sqrt(param.numel()) * (float(sigma) if sigma is not None else initial_sigma(param))

    def _check_group_params(self, group):
        if group["init_norm"] is None:
            group["init_norm"] = tuple(self._default_per_param("init_norm", group, p) for p in group["params"])
        norms = group["init_norm"]
        if getattr(norms, "ndim", None) == 1 and hasattr(norms, "tolist"):  # one per param, as a tensor/array
            norms = norms.tolist()
        if not isinstance(norms, (tuple, list)):  # one number for every param
            hp.nonnegative("init_norm", norms)
            return
        group["init_norm"] = tuple(norms)
        if len(group["init_norm"]) != len(group["params"]):
            raise ValueError(f"Invalid init_norm: {len(group['init_norm'])} values for "
                             f"{len(group['params'])} params")
        self._check_per_param(None, "init_norm", group["init_norm"])

    def _check_per_param(self, index, key, values):
        # a finite ‖ε0‖ >= 0: α_t scales the update by ‖ε0‖/‖u‖ (a negative norm would step
        # the param uphill; 0 is a zero-element param's, which has nothing to step)
        for norm in values:
            hp.nonnegative("init_norm", norm)

    def _hyper(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    p=self._schedule_p(group), inverse_time=group["decay"] == "inverse_time",
                    q=float(group["q"]))

    def _derived_hyper(self, hyper, plan, stepping):
        return {"decay rate lr²/(2q)": hyper["lr"] * hyper["lr"] / (2.0 * hyper["q"])}

    def _capturable_hyper(self, bucket, group):
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and group["half_life"] is not None):
            return super()._capturable_hyper(bucket, group)
        # α0·p is set by the half-life: p = rate/(T·α0) as half_life_p computes it (one division,
        # on the device), in float64 whatever lr's dtype (the group's checks found it finite at
        # this lr); p = 0 at lr = 0: no step taken
        hyper = super()._capturable_hyper(bucket, {**group, "half_life": None, "p": 0.0})
        product = lr.to(torch.float64) * float(group["half_life"])
        p = torch.full_like(product, half_life_rate(group["decay"])) / product
        hyper["p"] = torch.where(product != 0, p, torch.zeros_like(p))
        return hyper

    def _check_range(self, index, group, hyper, plan, stepping=False):
        narrow = [spec.dtype for spec in plan.specs if spec.dtype not in (torch.float64, torch.complex128)]
        if group["half_life"] is not None and narrow and not abs(hyper["p"]) <= torch.finfo(torch.float32).max:
            raise ValueError(f"{self._name}: param_groups[{index}]: Invalid half_life: {group['half_life']} at "
                             f"lr={hyper['lr']} (the p they give, {hyper['p']:.4g}, is beyond float32's range, "
                             f"in which the step of {narrow[0]} params computes)")
        super()._check_range(index, group, hyper, plan, stepping)

    def _direction(self, p, g, st, step, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return reference.scaled_adam_direction(p, g, st["exp_avg"], st["exp_avg_sq"], step, beta1=beta1,
                                               beta2=beta2, eps=float(group["eps"]))

    def _apply(self, p, st, i, step, theta, m, v, u, u_norm, theta_norm, bucket, group):
        reference.scaled_adam_apply(p, st["exp_avg"], st["exp_avg_sq"], theta, m, v, u, float(u_norm), step,
                                    lr=float(group["lr"]), init_norm=bucket.per_param["init_norm"][i],
                                    p=self._schedule_p(group), decay=group["decay"], q=float(group["q"]))

    def _reference_step(self, bucket, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        for (p, g, st), norm in zip(bucket.each(), bucket.per_param["init_norm"]):
            reference.scaled_adam_step(
                p, g, st["exp_avg"], st["exp_avg_sq"], _advance(st["step"]), lr=float(group["lr"]),
                beta1=beta1, beta2=beta2, eps=float(group["eps"]), init_norm=norm,
                p=self._schedule_p(group), decay=group["decay"], q=float(group["q"]),
            )


class Lamb(_AdamMoments):
    """LAMB (You et al., arXiv:1904.00962): u = m̂/(sqrt(v̂)+ε) + λθ;
    θ ← θ − η·(‖θ‖/‖u‖)·u per tensor, the trust ratio being 1 when either norm is 0
    (or not finite: a NaN/Inf reaches θ only at its own element).
    State: ``step``, ``exp_avg``, ``exp_avg_sq``."""

    algorithm = "lamb"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, backend=None, track_rms=False,
                 bf16_stochastic_round=False, stochastic_round_seed=0, master_weights=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction,
                        **torch_flags(maximize, foreach, capturable, differentiable, fused, backend, track_rms,
                                    bf16_stochastic_round, stochastic_round_seed, master_weights))
        super().__init__(params, defaults)

    def _check_group(self, group):
        hp.adam_group(group)
        hp.flag("bias_correction", group["bias_correction"])

    def _hyper(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    bias_correction=bool(group["bias_correction"]))

    def _direction(self, p, g, st, step, group):
        h = self._hyper(group)
        del h["lr"]
        return reference.lamb_direction(p, g, st["exp_avg"], st["exp_avg_sq"], step, **h)

    def _apply(self, p, st, i, step, theta, m, v, u, u_norm, theta_norm, bucket, group):
        reference.lamb_apply(p, st["exp_avg"], st["exp_avg_sq"], theta, m, v, u, float(theta_norm),
                             float(u_norm), lr=float(group["lr"]))

    def _reference_step(self, bucket, group):
        h = self._hyper(group)
        for p, g, st in bucket.each():
            reference.lamb_step(p, g, st["exp_avg"], st["exp_avg_sq"], _advance(st["step"]), **h)
