"""``python -m amos_fused.demo``: train a small byte-level GPT on the Python standard
library's own sources with nine optimizers, on the same data order from the same
init, and plot what happened.

Runs (``--optimizers`` picks a subset; ``--lr NAME=VALUE`` changes one):

=============  ======================================  ======  ==========================
name           optimizer                                 lr    decay / schedule
=============  ======================================  ======  ==========================
torch-adamw    torch.optim.AdamW(fused=True)            3e-3   λ=1.0 on dim ≥ 2, β=(0.9, 0.99)
adamw          amos_fused.AdamW                         3e-3   same as torch-adamw
amos           amos_fused.Amos, amos_param_groups       0.02   its own adaptive decay; no momentum
lion           amos_fused.Lion                          1e-3   λ=3.0 on dim ≥ 2 (same ηλ as AdamW)
radam          amos_fused.RAdam(decoupled)              3e-3   λ=1.0 on dim ≥ 2
scaled-adamw   amos_fused.ScaledAdamW                   7e-3   its ρ_t; rate halves once over the run
lamb           amos_fused.Lamb                          7e-3   λ=0.1 on dim ≥ 2
adamw8bit      amos_fused.AdamW8bit                     3e-3   as adamw; FP8 moments
lion8bit       amos_fused.Lion8bit                      1e-3   as lion; FP8 momentum
=============  ======================================  ======  ==========================

Not run by default (name them in ``--optimizers``): ``amos-momentum`` and
``amos8bit``, amos_fused.Amos and amos_fused.Amos8bit as ``amos`` with momentum 0.9
(a float32 momentum, and one in FP8); ``adamw-bf16`` and ``adamw-bf16-sr``, amos_fused.AdamW as ``adamw`` on a bfloat16 copy of the model
(params, grads and states in bfloat16; the loss in float32), rounding the params to
nearest or stochastically (``bf16_stochastic_round=True``); and ``bnb-adamw8bit``,
bitsandbytes' AdamW8bit with adamw's hyper-parameters and min_8bit_size=4096 (the
threshold of AdamW8bit: smaller params keep float32 states), the reference point of
the 8-bit runs (it needs bitsandbytes, ``pip install bitsandbytes==0.50.2``; on CPU
its step is eager torch code, several times slower than the fused one).  The 8-bit
runs keep block-scaled FP8 states (amos_fused/fp8_states.py) for the params of at
least 4096 elements: every matrix and embedding of the default model.

Every run uses the same linear warm-up (``--warmup`` steps) and then a constant
learning rate, so AdamW's weight and update RMS can be held to their steady-state
predictions (``amos_fused.theory``): update RMS sqrt((1−β1)/(1+β1)) (Su Jianlin,
《为什么Adam的Update RMS是0.2?》 "Why is Adam's update RMS 0.2?", kexue.fm) and weight
RMS sqrt(η/(2λ)) (Su Jianlin, 《AdamW的Weight RMS的渐近估计》 "Asymptotic estimation
of AdamW's weight RMS", kexue.fm; Kosson et al., "Rotational Equilibrium",
arXiv:2305.17212).  The weight RMS approaches its equilibrium on a timescale of
1/(ηλ) steps; the default λ = 1.0 with η = 3e-3 (1/(ηλ) ≈ 333 steps, 1.5 of them
in the default 500 steps; ``--steps 2000`` for 6) is chosen large so that a short
CPU run gets near it, larger than the 0.1 of long GPT runs (Wang & Aitchison, "How
to set AdamW's weight decay as you scale model and dataset size",
arXiv:2405.13698, set the EMA timescale 1/(ηλ) as a fraction of the run).
The learning rates are the best of a coarse sweep (steps of about 3× around the
usual values, 200-step runs of the default model, lowest val loss; the numbers are
in bench/results/demo/lr_sweep.json): AdamW and RAdam 3e-3 (a model this small
takes a larger lr than GPT-2's 6e-4); Lion 1e-3, 3× smaller, with 3× the decay, as
Chen et al. (arXiv:2302.06675) advise; Amos's ξ 0.02 and ScaledAdamW's α0 7e-3 are
relative step sizes (per step the update moves a tensor by about that fraction of
its scale η or ‖ε0‖); LAMB's 7e-3 is relative too (trust ratio ‖θ‖/‖u‖).
β2 = 0.99 for the Adam family: short runs need a second moment that forgets its
first steps.

Writes to ``--out``: ``loss.png`` (train loss vs step and vs wall time, val loss),
``rms.png`` (weight RMS and update RMS/lr per layer kind, all runs), ``rms_adamw.png``
(AdamW's 2-D weights against theory), ``state_bytes.png`` and ``demo.json`` (every
number the plots show, and the checks).  Needs the ``demo`` extra
(``pip install -e .[demo]``: matplotlib, tqdm).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import amos_fused as af
from amos_fused import theory

from .bench import MAX_THREADS
from .demo_model import GPT, KINDS, GPTConfig, batch_offsets, get_batch, layer_kind, load_corpus

MATRIX_KINDS = ("attention", "mlp")  # the 2-D weights held to the AdamW theory


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------

@dataclass
class RunSpec:
    name: str
    label: str
    lr: float
    build: Callable[[GPT, float, "DemoConfig"], torch.optim.Optimizer]
    hparams: Callable[["DemoConfig"], dict]
    decoupled_decay: bool = False  # θ ← θ(1−ηλ) − η·u: the RMS of u is measured without the decay term
    dtype: torch.dtype = torch.float32  # of the model's params (and so of grads and states)
    default: bool = True                # part of the default set of runs
    requires: Optional[str] = None      # a package the run needs (checked before anything is trained)


def decay_groups(model: GPT, weight_decay: float) -> List[dict]:
    """Weight decay on matrices and embeddings (dim ≥ 2), none on biases and norms."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _adam_hparams(cfg):
    return {"betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "eps": 1e-8, "decay_on": "dim >= 2"}


def _lion_decay(cfg, lr):
    # Same ηλ as AdamW at its default lr, as Chen et al. advise (lr 3-10× smaller, λ larger by as much).
    return cfg.weight_decay * cfg.lrs["adamw"] / lr


def _lion_hparams(name):
    return lambda c: {"betas": [0.9, 0.99], "weight_decay": _lion_decay(c, c.lrs[name]), "decay_on": "dim >= 2"}


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default, and the size from which AdamW8bit keeps FP8 states
REQUIRES_HINT = {"bitsandbytes": "pip install bitsandbytes==0.50.2"}


def _build_bnb_adamw8bit(model, lr, cfg):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(decay_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas, eps=1e-8,
                                        min_8bit_size=BNB_MIN_8BIT_SIZE)


def _build_amos(model, lr, cfg, cls=af.Amos, **options):
    groups = af.amos_param_groups(model, lr=lr, overrides=model.residual_scale_overrides(), **options)
    return cls(groups, lr=lr)


AMOS_MOMENTUM = 0.9  # of the amos-momentum and amos8bit runs


RUNS: Dict[str, RunSpec] = {}
DEFAULT_LRS = {"torch-adamw": 3e-3, "adamw": 3e-3, "amos": 0.02, "lion": 1e-3, "radam": 3e-3,
               "scaled-adamw": 7e-3, "lamb": 7e-3, "adamw-bf16": 3e-3, "adamw-bf16-sr": 3e-3}
# The 8-bit runs take the lr of their full-precision run.
DEFAULT_LRS.update({"adamw8bit": DEFAULT_LRS["adamw"], "lion8bit": DEFAULT_LRS["lion"],
                    "bnb-adamw8bit": DEFAULT_LRS["adamw"], "amos-momentum": DEFAULT_LRS["amos"],
                    "amos8bit": DEFAULT_LRS["amos"]})


def _register(spec: RunSpec):
    RUNS[spec.name] = spec


_register(RunSpec(
    "torch-adamw", "torch.optim.AdamW (fused)", DEFAULT_LRS["torch-adamw"],
    lambda m, lr, c: torch.optim.AdamW(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas, fused=True),
    _adam_hparams, decoupled_decay=True))
_register(RunSpec(
    "adamw", "af.AdamW", DEFAULT_LRS["adamw"],
    lambda m, lr, c: af.AdamW(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas),
    _adam_hparams, decoupled_decay=True))
_register(RunSpec(
    "amos", "af.Amos (factored, no momentum)", DEFAULT_LRS["amos"], _build_amos,
    lambda c: {"reduce_axes": "amos_param_groups", "momentum": None, "beta": 0.999}))
_register(RunSpec(
    "lion", "af.Lion", DEFAULT_LRS["lion"],
    lambda m, lr, c: af.Lion(decay_groups(m, _lion_decay(c, lr)), lr=lr, betas=(0.9, 0.99)),
    _lion_hparams("lion"), decoupled_decay=True))
_register(RunSpec(
    "radam", "af.RAdam (decoupled decay)", DEFAULT_LRS["radam"],
    lambda m, lr, c: af.RAdam(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas, decoupled_weight_decay=True),
    _adam_hparams, decoupled_decay=True))
_register(RunSpec(
    "scaled-adamw", "af.ScaledAdamW", DEFAULT_LRS["scaled-adamw"],
    lambda m, lr, c: af.ScaledAdamW(m.parameters(), lr=lr, betas=c.betas, half_life=c.steps),
    lambda c: {"betas": list(c.betas), "half_life": c.steps, "decay": "inverse_square", "q": 1.0}))
_register(RunSpec(
    "lamb", "af.Lamb", DEFAULT_LRS["lamb"],
    lambda m, lr, c: af.Lamb(decay_groups(m, 0.1), lr=lr, betas=c.betas),
    lambda c: {"betas": list(c.betas), "weight_decay": 0.1, "decay_on": "dim >= 2"}))
# bfloat16 params, grads and states (not run by default): round-to-nearest against stochastic rounding
_register(RunSpec(
    "adamw-bf16", "af.AdamW, bf16 params", DEFAULT_LRS["adamw-bf16"],
    lambda m, lr, c: af.AdamW(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas),
    _adam_hparams, decoupled_decay=True, dtype=torch.bfloat16, default=False))
_register(RunSpec(
    "adamw-bf16-sr", "af.AdamW, bf16 params, stochastic rounding", DEFAULT_LRS["adamw-bf16-sr"],
    lambda m, lr, c: af.AdamW(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas, bf16_stochastic_round=True),
    _adam_hparams, decoupled_decay=True, dtype=torch.bfloat16, default=False))
# 8-bit states (block-scaled FP8 moments), with the hyper-parameters of adamw and lion
_register(RunSpec(
    "adamw8bit", "af.AdamW8bit", DEFAULT_LRS["adamw8bit"],
    lambda m, lr, c: af.AdamW8bit(decay_groups(m, c.weight_decay), lr=lr, betas=c.betas),
    _adam_hparams, decoupled_decay=True))
_register(RunSpec(
    "lion8bit", "af.Lion8bit", DEFAULT_LRS["lion8bit"],
    lambda m, lr, c: af.Lion8bit(decay_groups(m, _lion_decay(c, lr)), lr=lr, betas=(0.9, 0.99)),
    _lion_hparams("lion8bit"), decoupled_decay=True))
# Amos with momentum, float32 and FP8 (not run by default)
_register(RunSpec(
    "amos-momentum", "af.Amos (factored, momentum 0.9)", DEFAULT_LRS["amos-momentum"],
    lambda m, lr, c: _build_amos(m, lr, c, momentum=AMOS_MOMENTUM),
    lambda c: {"reduce_axes": "amos_param_groups", "momentum": AMOS_MOMENTUM, "beta": 0.999}, default=False))
_register(RunSpec(
    "amos8bit", "af.Amos8bit (factored, FP8 momentum 0.9)", DEFAULT_LRS["amos8bit"],
    lambda m, lr, c: _build_amos(m, lr, c, af.Amos8bit, momentum=AMOS_MOMENTUM),
    lambda c: {"reduce_axes": "amos_param_groups", "momentum": AMOS_MOMENTUM, "beta": 0.999}, default=False))
# bitsandbytes' AdamW8bit, the reference point of adamw8bit (not run by default)
_register(RunSpec(
    "bnb-adamw8bit", "bitsandbytes AdamW8bit", DEFAULT_LRS["bnb-adamw8bit"], _build_bnb_adamw8bit,
    lambda c: {**_adam_hparams(c), "min_8bit_size": BNB_MIN_8BIT_SIZE},
    decoupled_decay=True, default=False, requires="bitsandbytes"))
DEFAULT_RUNS = [name for name, spec in RUNS.items() if spec.default]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class DemoConfig:
    steps: int = 500
    out: str = "bench/results/demo"
    optimizers: List[str] = field(default_factory=lambda: list(DEFAULT_RUNS))
    seed: int = 0
    threads: Optional[int] = None
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    seq_len: int = 128
    batch: int = 16
    warmup: int = 30
    weight_decay: float = 1.0
    betas: tuple = (0.9, 0.99)
    rms_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    data_bytes: int = 8_000_000
    lrs: Dict[str, float] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        unknown = [n for n in self.optimizers if n not in RUNS]
        if unknown:
            raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {list(RUNS)}")
        for name in self.optimizers:
            package = RUNS[name].requires
            if package is not None and importlib.util.find_spec(package) is None:
                raise SystemExit(f"{name} needs {package}, which is not installed: {REQUIRES_HINT[package]}")
        self.lrs = {**DEFAULT_LRS, **self.lrs}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then 1."""
        return min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor (step counters included); a tensor that several
    params share (bitsandbytes' quantization maps) once."""
    seen = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                seen[(value.data_ptr(), value.numel(), value.dtype)] = value.numel() * value.element_size()
    return sum(seen.values())


class RMSMeter:
    """Weight RMS and update RMS / lr per layer kind, pooled over the kind's
    entries (sqrt of the mean of squares), from snapshots taken before and after
    ``opt.step()``.  For decoupled weight decay (θ ← θ(1−ηλ) − η·u) it also
    records RMS(u) without the decay term: (Δθ + ηλ·θ_before)/η."""

    def __init__(self, model: GPT, opt: torch.optim.Optimizer, decoupled: bool):
        self.decoupled = decoupled
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        self.entries = [(layer_kind(n, p), p, group_of[id(p)]) for n, p in model.named_parameters()]
        keys = KINDS + ("matrices",)  # matrices: attention and MLP weights pooled
        self.series = {"step": [], **{s: {k: [] for k in keys} for s in ("weight", "update", "update_no_decay")}}
        self.initial = self._weights()

    def _weights(self) -> Dict[str, float]:
        sums = {k: [0.0, 0] for k in KINDS + ("matrices",)}
        with torch.no_grad():
            for kind, p, _ in self.entries:
                for key in (kind, "matrices") if kind in MATRIX_KINDS else (kind,):
                    sums[key][0] += float(p.double().pow(2).sum())
                    sums[key][1] += p.numel()
        return {k: math.sqrt(s / n) if n else float("nan") for k, (s, n) in sums.items()}

    def snapshot(self) -> List[torch.Tensor]:
        return [p.detach().clone() for _, p, _ in self.entries]

    def record(self, step: int, before: List[torch.Tensor]) -> None:
        keys = KINDS + ("matrices",)
        w = {k: 0.0 for k in keys}
        u = {k: 0.0 for k in keys}
        und = {k: 0.0 for k in keys}
        n = {k: 0 for k in keys}
        with torch.no_grad():
            for (kind, p, group), old in zip(self.entries, before):
                lr = float(group["lr"])
                delta = (p.detach() - old).double()
                sq_w = float(p.detach().double().pow(2).sum())
                sq_u = float(delta.pow(2).sum()) / lr**2
                if self.decoupled and group.get("weight_decay", 0.0):
                    sq_und = float((delta + lr * group["weight_decay"] * old.double()).pow(2).sum()) / lr**2
                else:
                    sq_und = sq_u
                for key in (kind, "matrices") if kind in MATRIX_KINDS else (kind,):
                    w[key] += sq_w
                    u[key] += sq_u
                    und[key] += sq_und
                    n[key] += p.numel()
        self.series["step"].append(step + 1)  # state after this many steps
        for key in keys:
            self.series["weight"][key].append(math.sqrt(w[key] / n[key]))
            self.series["update"][key].append(math.sqrt(u[key] / n[key]))
            self.series["update_no_decay"][key].append(math.sqrt(und[key] / n[key]))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine slows the wall times)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def evaluate(model: GPT, data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for row in offsets:
            x, y = get_batch(data, row, seq_len)
            losses.append(float(model(x, y)))
    model.train()
    return sum(losses) / len(losses)


class _Progress:
    """tqdm when installed, else a line every tenth of the run."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.bar = None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float):
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.n % 10 == 0 or self.n == self.total:
                self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.enabled and (self.n % max(1, self.total // 10) == 0 or self.n == self.total):
            print(f"{self.desc}: step {self.n}/{self.total} loss {loss:.3f}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train_one(spec: RunSpec, init_model: GPT, cfg: DemoConfig, corpus, offsets, val_offsets) -> dict:
    model = copy.deepcopy(init_model).to(spec.dtype)
    lr = cfg.lrs[spec.name]
    opt = spec.build(model, lr, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    meter = RMSMeter(model, opt, spec.decoupled_decay)
    losses, times, step_ms, val = [], [], [], {"step": [0], "loss": [evaluate(model, corpus.val, val_offsets,
                                                                            cfg.seq_len)]}
    elapsed = 0.0
    load_start = _load_average()
    progress = _Progress(cfg.steps, spec.name, cfg.progress)
    for step in range(cfg.steps):
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * cfg.lr_factor(step)
        x, y = get_batch(corpus.train, offsets[step], cfg.seq_len)
        measure = step % cfg.rms_every == 0 or step == cfg.steps - 1
        before = meter.snapshot() if measure else None
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        elapsed += t2 - t0
        step_ms.append((t2 - t1) * 1e3)
        value = float(loss.detach())
        if not math.isfinite(value):
            progress.close()
            raise SystemExit(f"{spec.name}: the loss is {value} at step {step + 1} (lr {lr}); try a smaller --lr")
        losses.append(value)
        times.append(elapsed)
        if measure:
            meter.record(step, before)
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            val["step"].append(step + 1)
            val["loss"].append(evaluate(model, corpus.val, val_offsets, cfg.seq_len))
        progress.update(value)
    progress.close()
    tail = max(1, cfg.steps // 10)
    step_sorted = sorted(step_ms)
    return {
        "label": spec.label,
        "lr": lr,
        "hparams": spec.hparams(cfg),
        "final_train_loss": sum(losses[-tail:]) / tail,
        "final_train_loss_window": tail,
        "final_val_loss": val["loss"][-1],
        "wall_time_s": elapsed,
        "load_average_1min": {"start": load_start, "end": _load_average()},
        "optimizer_step_ms_median": step_sorted[len(step_sorted) // 2],
        "state_bytes": state_bytes(opt),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "train_loss": losses,
        "train_time_s": times,
        "val": val,
        "rms": {"initial_weight": meter.initial, **meter.series},
    }


# ---------------------------------------------------------------------------
# Theory checks
# ---------------------------------------------------------------------------

def adamw_weight_rms_transient(cfg: DemoConfig, lr: float, initial_rms: float, steps: List[int],
                               update_rms: Optional[List[float]] = None) -> List[float]:
    """Mean-field weight RMS after t steps of AdamW with this warm-up schedule:
    RMS² = e^{−2κ_t}·RMS0² + Σ_{i≤t} e^{−2(κ_t−κ_i)}·η_i²·s_i, κ_t = Σ_{i≤t} η_i·λ.
    The initial weights decay as e^{−κ}; the updates add up like a random walk
    whose variance per step is s_i = 1 for zero-mean gradients, whatever β1 (the
    kexue.fm derivation cited above), so the limit is η/(2λ).  With
    ``update_rms`` (measured at ``steps``) s_i = (RMS(u_i)/sqrt((1−β1)/(1+β1)))²
    instead: the same walk, scaled by how far the measured update RMS is from
    its prediction (the last measurement at or before step i, the first one
    before any)."""
    lam = cfg.weight_decay
    u_pred = theory.adamw_update_rms(cfg.betas[0])
    out, kappa, noise, want, k = [], 0.0, 0.0, set(steps), 0
    for t in range(1, max(steps) + 1):
        eta = lr * cfg.lr_factor(t - 1)
        kappa += eta * lam
        scale = 1.0
        if update_rms is not None:
            while k + 1 < len(steps) and steps[k + 1] <= t:
                k += 1
            scale = (update_rms[k] / u_pred) ** 2
        noise = noise * math.exp(-2 * eta * lam) + eta**2 * scale
        if t in want:
            out.append(math.sqrt(math.exp(-2 * kappa) * initial_rms**2 + noise))
    return out


def steps_to_equilibrium(lr: float, weight_decay: float, initial_rms: float, within: float = 0.1) -> int:
    """Steps (constant lr) until the mean-field weight RMS is within ``within`` of
    sqrt(η/(2λ)), starting from ``initial_rms``."""
    eq2 = lr / (2 * weight_decay)
    gap = abs(initial_rms**2 - eq2)
    target = ((1 + within) ** 2 - 1) * eq2 if initial_rms**2 > eq2 else (1 - (1 - within) ** 2) * eq2
    if gap <= target:
        return 0
    return math.ceil(math.log(gap / target) / (2 * lr * weight_decay))


# The runs whose weight RMS the report predicts (theory.adamw_weight_rms and its transient).
THEORY_RUNS = ("adamw", "torch-adamw", "radam")


def theory_checks(cfg: DemoConfig, results: Dict[str, dict]) -> dict:
    checks = {}
    beta1 = cfg.betas[0]
    for name in THEORY_RUNS:
        if name not in results:
            continue
        r = results[name]
        lr, rms = r["lr"], r["rms"]
        tail = max(1, len(rms["step"]) // 10)
        mean = lambda xs: sum(xs[-tail:]) / tail  # noqa: E731
        w_pred = theory.adamw_weight_rms(lr, cfg.weight_decay)
        u_pred = theory.adamw_update_rms(beta1)
        w0 = rms["initial_weight"]["matrices"]
        transient = adamw_weight_rms_transient(cfg, lr, w0, rms["step"])
        refined = adamw_weight_rms_transient(cfg, lr, w0, rms["step"], rms["update_no_decay"]["matrices"])
        w_meas, u_meas, u_nd = (mean(rms[k]["matrices"]) for k in ("weight", "update", "update_no_decay"))
        checks[name] = {
            "kinds": list(MATRIX_KINDS),
            "averaged_over_last_measurements": tail,
            "weight_rms_initial": w0,
            "weight_rms_measured": w_meas,
            "weight_rms_equilibrium_predicted": w_pred,
            "weight_rms_ratio_to_equilibrium": w_meas / w_pred,
            "weight_rms_transient_predicted": transient[-1],
            "weight_rms_ratio_to_transient": rms["weight"]["matrices"][-1] / transient[-1],
            "weight_rms_transient_series": transient,
            "weight_rms_transient_measured_update_predicted": refined[-1],
            "weight_rms_ratio_to_transient_measured_update": rms["weight"]["matrices"][-1] / refined[-1],
            "weight_rms_transient_measured_update_series": refined,
            "update_rms_measured": u_meas,
            "update_rms_without_decay_measured": u_nd,
            "update_rms_predicted": u_pred,
            "update_rms_ratio": u_meas / u_pred,
            "update_rms_without_decay_ratio": u_nd / u_pred,
            "timescale_steps_1_over_eta_lambda": 1.0 / (lr * cfg.weight_decay),
            "eta_lambda_times_steps": lr * cfg.weight_decay * cfg.steps,
            "steps_to_within_10pct_of_equilibrium": steps_to_equilibrium(lr, cfg.weight_decay, w0),
        }
    for low, full in (("adamw8bit", "adamw"), ("lion8bit", "lion"), ("bnb-adamw8bit", "adamw"),
                      ("adamw8bit", "bnb-adamw8bit"), ("amos8bit", "amos-momentum")):
        if low in results and full in results:
            a, w = results[low], results[full]
            checks[f"{low}_vs_{full}"] = {
                "val_loss_relative_difference": a["final_val_loss"] / w["final_val_loss"] - 1,
                "train_loss_relative_difference": a["final_train_loss"] / w["final_train_loss"] - 1,
                "state_bytes_ratio": a["state_bytes"] / w["state_bytes"],
                "within_1pct_loss": bool(abs(a["final_val_loss"] / w["final_val_loss"] - 1) <= 0.01
                                         and abs(a["final_train_loss"] / w["final_train_loss"] - 1) <= 0.01),
            }
    if "amos" in results and "adamw" in results:
        a, w = results["amos"], results["adamw"]
        checks["amos_vs_adamw"] = {
            "val_loss_ratio": a["final_val_loss"] / w["final_val_loss"],
            "train_loss_ratio": a["final_train_loss"] / w["final_train_loss"],
            "state_bytes_ratio": a["state_bytes"] / w["state_bytes"],
            "within_2pct_loss_with_at_most_1pct_state": bool(
                a["final_val_loss"] <= 1.02 * w["final_val_loss"] and a["state_bytes"] <= 0.01 * w["state_bytes"]),
        }
    return checks


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def require_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("python -m amos_fused.demo needs matplotlib (and tqdm for a progress bar): "
                         "install the demo extra, pip install --no-build-isolation -e .[demo]")


def run(cfg: DemoConfig, command: Optional[str] = None) -> dict:
    """Trains every optimizer in ``cfg.optimizers``, writes the plots and
    ``demo.json`` to ``cfg.out`` and returns the JSON's contents."""
    require_matplotlib()
    from . import demo_plots

    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(cfg.data_bytes)
    gpt = GPTConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, seq_len=cfg.seq_len)
    torch.manual_seed(cfg.seed)
    init_model = GPT(gpt)
    offsets = batch_offsets(len(corpus.train), cfg.seq_len, cfg.batch, cfg.steps, cfg.seed)
    val_offsets = batch_offsets(len(corpus.val), cfg.seq_len, cfg.batch, cfg.eval_batches, cfg.seed + 1)
    n_params = sum(p.numel() for p in init_model.parameters())
    print(f"GPT {gpt.as_dict()}: {n_params:,} params; {corpus.info['files']} stdlib files, "
          f"{corpus.info['train_bytes']:,} train / {corpus.info['val_bytes']:,} val bytes; "
          f"{cfg.steps} steps of {cfg.batch}×{cfg.seq_len} tokens; {torch.get_num_threads()} threads",
          file=sys.stderr)
    results = {}
    for name in cfg.optimizers:
        results[name] = train_one(RUNS[name], init_model, cfg, corpus, offsets, val_offsets)
    checks = theory_checks(cfg, results)
    report = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "device": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                   "os_cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                   "amos_fused": af.__version__},
        "config": {k: v for k, v in vars(cfg).items() if k not in ("progress",)},
        "model": {**gpt.as_dict(), "params": n_params, "vocab": 256},
        "data": corpus.info,
        "theory": {"adamw_update_rms": theory.adamw_update_rms(cfg.betas[0]),
                   "adamw_weight_rms": theory.adamw_weight_rms(cfg.lrs["adamw"], cfg.weight_decay)},
        "checks": checks,
        "results": results,
    }
    demo_plots.plot_all(report, out)
    report["total_time_s"] = time.perf_counter() - started
    (out / "demo.json").write_text(dump_json(report))
    print_summary(report)
    return report


def _rounded(value):
    """Floats to 6 significant digits (the JSON stays small; no result needs more)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def dump_json(report: dict) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(_rounded(report), indent=1, default=str)
    text = re.sub(r"\[\s*((?:-?[0-9.eE+-]+,\s*)*-?[0-9.eE+-]+)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return text + "\n"


def print_summary(report: dict) -> None:
    rows = [("optimizer", "lr", "train loss", "val loss", "wall s", "step ms", "state bytes")]
    for name, r in report["results"].items():
        rows.append((name, f"{r['lr']:g}", f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}",
                     f"{r['wall_time_s']:.1f}", f"{r['optimizer_step_ms_median']:.2f}", f"{r['state_bytes']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    for name, c in report["checks"].items():
        if "weight_rms_measured" in c:
            print(f"{name}, attention+MLP matrices: weight RMS {c['weight_rms_measured']:.4f} "
                  f"({c['weight_rms_ratio_to_equilibrium']:.3f}× sqrt(η/2λ) = {c['weight_rms_equilibrium_predicted']:.4f}; "
                  f"mean-field transient {c['weight_rms_transient_predicted']:.4f}, with the measured update RMS "
                  f"{c['weight_rms_transient_measured_update_predicted']:.4f}); update RMS/lr "
                  f"{c['update_rms_measured']:.4f}, {c['update_rms_without_decay_measured']:.4f} without the decay "
                  f"term ({c['update_rms_ratio']:.3f}× sqrt((1−β1)/(1+β1)) = {c['update_rms_predicted']:.4f})")
        else:
            print(f"{name}: {c}")
    print(f"total {report['total_time_s']:.0f} s; wrote {report['config']['out']}")


def parse_args(argv=None) -> DemoConfig:
    defaults = DemoConfig()
    ap = argparse.ArgumentParser(prog="python -m amos_fused.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--out", default=defaults.out)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_RUNS),
                    help=f"comma-separated runs of {','.join(RUNS)} (default: {','.join(DEFAULT_RUNS)})")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                    help="learning rate of one run (repeatable), e.g. --lr amos=0.01")
    for name in ("d_model", "n_layer", "n_head", "seq_len", "batch", "warmup", "rms_every", "eval_every",
                 "eval_batches", "data_bytes"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    ap.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                    help="λ of the AdamW and RAdam runs (Lion: the same ηλ)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            lrs[name] = None
        if name not in RUNS or lrs[name] is None or not 0 < lrs[name] < math.inf:
            ap.error(f"--lr {item!r}: expected NAME=VALUE with NAME in {list(RUNS)} and VALUE a finite number > 0")
    for name in ("steps", "d_model", "n_layer", "n_head", "seq_len", "batch", "rms_every", "eval_every",
                 "eval_batches", "data_bytes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        ap.error(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if not 0 <= args.seed < 2**63:
        ap.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if not 0 < args.weight_decay < math.inf:  # (the report's equilibrium RMS √(η/2λ) needs λ > 0)
        ap.error(f"--weight-decay must be a finite number > 0, got {args.weight_decay}")
    if args.d_model % args.n_head:
        ap.error(f"--d-model ({args.d_model}) must be a multiple of --n-head ({args.n_head})")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir() or any(parent.exists() and not parent.is_dir() for parent in out.parents):
        ap.error(f"--out {args.out!r}: not a directory (the demo writes its plots and demo.json into it)")
    optimizers = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not optimizers:
        ap.error(f"--optimizers {args.optimizers!r}: name at least one of {','.join(RUNS)}")
    unused = sorted(set(lrs) - set(optimizers))
    if unused:
        ap.error(f"--lr {unused[0]}=...: {unused[0]!r} is not among the runs ({','.join(optimizers)})")
    # (β3 = 1 − ηλ of the report's predictions must lie in (0, 1): AdamW's lr always, and the
    # lr of each run whose weight RMS it predicts)
    for name in ["adamw"] + [n for n in THEORY_RUNS if n in optimizers and n != "adamw"]:
        lr = lrs.get(name, DEFAULT_LRS[name])
        if not lr * args.weight_decay < 1:
            ap.error(f"--weight-decay {args.weight_decay} times the lr of {name} ({lr}) must be < 1")
    return DemoConfig(
        steps=args.steps, out=args.out, optimizers=optimizers, seed=args.seed, threads=args.threads,
        d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, seq_len=args.seq_len, batch=args.batch,
        warmup=args.warmup, weight_decay=args.weight_decay, rms_every=args.rms_every, eval_every=args.eval_every,
        eval_batches=args.eval_batches, data_bytes=args.data_bytes, lrs=lrs, progress=not args.no_progress,
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)  # (--help works without matplotlib)
    require_matplotlib()  # before anything is trained
    run(cfg, command=" ".join(["python -m amos_fused.demo", *argv]))


if __name__ == "__main__":
    main()
