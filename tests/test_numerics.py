"""Numerics of the fused kernels beyond closeness to the reference:

* bitwise determinism of the CPU kernels on every instruction set: results do
  not depend on the thread count, on the order / grouping of params, or on
  whether an element goes through the SIMD body or the scalar tail;
* torch's rounding where torch has the algorithm: torch.lerp's two forms (fma,
  exact for β1 = 0), the L2 term rounded like grad.add(param, alpha=λ);
* one non-finite semantics per algorithm, the same on reference, cpu and triton.
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import amos_fused as af  # noqa: E402

from conftest import CPU_CAPABILITIES  # noqa: E402


@contextlib.contextmanager
def cpu_setup(capability, threads):
    """Forces one instruction set and intra-op thread count, restoring both."""
    before_threads, before_cap = torch.get_num_threads(), torch.ops.amos_fused.cpu_capability()
    torch.ops.amos_fused.set_cpu_capability(capability)
    torch.set_num_threads(threads)
    try:
        assert torch.ops.amos_fused.cpu_capability() == capability
        yield
    finally:
        torch.set_num_threads(before_threads)
        torch.ops.amos_fused.set_cpu_capability(before_cap)


# ---------------------------------------------------------------------------
# 1. Bitwise determinism
# ---------------------------------------------------------------------------

# name -> (constructor over param groups, shape of the big param, elementwise?)
# Elementwise algorithms (every element stepped on its own) also get the
# body-vs-tail check; Amos' row layouts and the norm-scaled rules couple the
# elements of a tensor, so only thread count, order and grouping vary there.
BIG = 100_003
ALGORITHMS = {
    "adamw": (lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cpu"), (BIG,), True),
    "adam_l2": (lambda g: af.Adam(g, lr=1e-2, weight_decay=0.1, backend="cpu"), (BIG,), True),
    "adam_amsgrad": (lambda g: af.AdamW(g, lr=1e-2, betas=(0.3, 0.99), amsgrad=True, backend="cpu"),
                     (BIG,), True),
    # β2 = 0.9: ρ_t > 5 (rectified) from step 6 on; RADAM_STEPS covers both regimes.
    "radam_l2": (lambda g: af.RAdam(g, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, backend="cpu"),
                 (BIG,), True),
    "radam_decoupled": (lambda g: af.RAdam(g, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1,
                                           decoupled_weight_decay=True, backend="cpu"), (BIG,), True),
    "lion": (lambda g: af.Lion(g, lr=1e-3, weight_decay=0.1, backend="cpu"), (BIG,), True),
    "amos": (lambda g: af.Amos(g, lr=0.05, eta=0.5, extra_l2=0.01, backend="cpu"), (BIG,), True),
    "amos_momentum": (lambda g: af.Amos(g, lr=0.05, eta=0.5, momentum=0.9, backend="cpu"),
                      (BIG,), True),
    "amos_trailing": (lambda g: af.Amos(g, lr=0.05, eta=0.5, reduce_axes=(1,), backend="cpu"),
                      (257, 389), False),
    "amos_trailing_momentum": (lambda g: af.Amos(g, lr=0.05, eta=0.5, reduce_axes=(1,),
                                                 momentum=0.9, backend="cpu"), (257, 389), False),
    "amos_general": (lambda g: af.Amos(g, lr=0.05, eta=0.5, reduce_axes=(0,), backend="cpu"),
                     (389, 257), False),
    "amos_general_momentum": (lambda g: af.Amos(g, lr=0.05, eta=0.5, reduce_axes=(0,),
                                                momentum=0.9, backend="cpu"), (389, 257), False),
    "scaled_adamw": (lambda g: af.ScaledAdamW(g, lr=1e-2, p=0.1, sigma=0.1, backend="cpu"),
                     (BIG,), False),
    "lamb": (lambda g: af.Lamb(g, lr=1e-2, weight_decay=0.01, backend="cpu"), (BIG,), False),
}
SMALL = [(7, 1), (13, 3), (1, 1), (3, 11)]
STEPS = 3
RADAM_STEPS = 7


def _steps(name):
    return RADAM_STEPS if name.startswith("radam") else STEPS


def _values(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _run(make, values, grads, groups):
    """Steps copies of ``values`` (param groups: lists of indices) with ``grads``
    (one list per step); returns the params and their state tensors, by index."""
    params = [v.clone().requires_grad_(True) for v in values]
    opt = make([{"params": [params[i] for i in group]} for group in groups])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    out = []
    for p in params:
        st = opt.state[p]
        out.append([p.detach()] + [st[k] for k in sorted(st) if k != "step"])
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(a, b):
    bits = _BITS[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(bits), b.reshape(-1).view(bits))


def _count_differing(a_runs, b_runs):
    """Elements whose bits differ, over every param and state tensor."""
    n = 0
    for ta, tb in zip(a_runs, b_runs):
        for a, b in zip(ta, tb):
            assert a.shape == b.shape
            if not _bitwise_equal(a, b):
                n += int((a.reshape(-1) != b.reshape(-1)).sum()) or 1  # ±0 / NaN bits
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_bitwise_across_threads_and_order(capability, name, dtype):
    make, big, _ = ALGORITHMS[name]
    shapes = [big] + SMALL
    values = _values(shapes, dtype, seed=1)
    grads = [_values(shapes, dtype, seed=100 + s) for s in range(_steps(name))]
    base = None
    for threads in (1, 2, 3):
        with cpu_setup(capability, threads):
            runs = _run(make, values, grads, [list(range(len(shapes)))])
        if base is None:
            base = runs
            assert all(torch.isfinite(t).all() for ts in base for t in ts)
        else:
            assert _count_differing(base, runs) == 0, f"{threads} threads differ from 1"
    # Reversed order, split over two groups (other buckets, other offsets).
    order = list(reversed(range(len(shapes))))
    with cpu_setup(capability, 2):
        runs = _run(make, [values[i] for i in order], [[g[i] for i in order] for g in grads],
                    [[0, 1], [2, 3, 4]])
    runs = [runs[order.index(i)] for i in range(len(shapes))]
    assert _count_differing(base, runs) == 0, "order / grouping changed the result"


TAIL_SIZES = [7, 13, 29, 1000, 3047]  # sums to 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [n for n, (_, _, elementwise) in ALGORITHMS.items() if elementwise])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_bitwise_body_vs_tail(capability, name, dtype):
    """The same 4096 values stepped as one tensor (all SIMD body) and as tensors of
    odd sizes (many elements in scalar tails) end bitwise equal."""
    make = ALGORITHMS[name][0]
    whole = _values([(4096,)], dtype, seed=3)
    grads = [_values([(4096,)], dtype, seed=300 + s) for s in range(_steps(name))]
    with cpu_setup(capability, 1):
        one = _run(make, whole, grads, [[0]])[0]
        parts = _run(make, list(whole[0].split(TAIL_SIZES)),
                     [list(g[0].split(TAIL_SIZES)) for g in grads], [list(range(len(TAIL_SIZES)))])
    joined = [torch.cat([p[k] for p in parts]) for k in range(len(one))]
    assert _count_differing([one], [joined]) == 0


# Steps that round each element on its own, whatever its neighbours: the same bits
# on every instruction set (the 8-bit states' absmax is a max, their codes a
# rounding per element, and stochastic rounding draws per element).  Sums over a
# tensor (Amos's rows, the norm-scaled rules, telemetry) add SIMD lanes of another
# width on each instruction set, so they are held to the reference instead.
CROSS_ISA = {
    **{name: (ALGORITHMS[name][0], (torch.float32, torch.bfloat16))
       for name, (_, _, elementwise) in ALGORITHMS.items() if elementwise},
    "adamw8bit": (lambda g: af.AdamW8bit(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
                  (torch.float32, torch.bfloat16)),
    "radam8bit": (lambda g: af.RAdam8bit(g, lr=1e-2, betas=(0.9, 0.9), backend="cpu"), (torch.float32,)),
    "lion8bit": (lambda g: af.Lion8bit(g, lr=1e-3, weight_decay=0.1, backend="cpu"),
                 (torch.float32, torch.bfloat16)),
    "adamw_bf16_sr": (lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, bf16_stochastic_round=True,
                                         backend="cpu"), (torch.bfloat16,)),
    "lion8bit_bf16_sr": (lambda g: af.Lion8bit(g, lr=1e-3, bf16_stochastic_round=True, backend="cpu"),
                         (torch.bfloat16,)),
    "adamw_master": (lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, master_weights=True, backend="cpu"),
                     (torch.bfloat16, torch.float16)),
}


@pytest.mark.skipif(len(CPU_CAPABILITIES) < 2, reason="this CPU runs one instruction set only")
@pytest.mark.parametrize("name,dtype", [(n, d) for n, (_, dtypes) in CROSS_ISA.items() for d in dtypes],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_bitwise_across_instruction_sets(name, dtype):
    make = CROSS_ISA[name][0]
    shapes = [(BIG,), (4096,), (4099,)] + SMALL
    values = _values(shapes, dtype, seed=5)
    grads = [_values(shapes, dtype, seed=500 + s) for s in range(_steps(name))]
    base = None
    for capability in CPU_CAPABILITIES:
        with cpu_setup(capability, 2):
            runs = _run(make, values, grads, [list(range(len(shapes)))])
        if base is None:
            base = runs
            assert all(torch.isfinite(t.float()).all() for ts in base for t in ts)
        else:
            assert _count_differing(base, runs) == 0, f"{capability} differs from {CPU_CAPABILITIES[0]}"


# The bfloat16 stores that round to nearest, with every kind of value a lane can
# hold: AVX512_BF16's conversion reads a denormal as zero and keeps a NaN's
# payload, so a tile holding either is converted as on every other instruction set.
BF16_NEAREST = {
    "params_and_states": lambda ps: af.AdamW(ps, lr=1e-2, betas=(0.5, 0.5), eps=1e-30, backend="cpu"),
    "states_of_sr": lambda ps: af.AdamW(ps, lr=1e-2, betas=(0.5, 0.5), eps=1e-30, bf16_stochastic_round=True,
                                        backend="cpu"),
    "master_weights": lambda ps: af.AdamW(ps, lr=1e-2, betas=(0.5, 0.5), eps=1e-30, master_weights=True,
                                          backend="cpu"),
}


@pytest.mark.parametrize("name", list(BF16_NEAREST))
def test_bfloat16_denormals_and_nan_round_alike_on_every_instruction_set(name):
    """Denormal params, grads and states (bfloat16 shares float32's exponent range)
    stay denormal where they are not rounded away, and NaN lanes store the same bits,
    on every instruction set and in every lane position (special lanes spread over
    the tiles, plain tiles between them, a scalar tail).  NaN's payload bits differ
    between the baseline's scalar conversion and the SIMD ones (README, "Bitwise
    determinism")."""
    n = 4099
    index = torch.arange(n)
    denormal = 2.0 ** -130
    param = torch.linspace(-1.0, 1.0, n)
    grad = torch.linspace(-0.5, 0.5, n)
    still = index % 37 == 3          # a denormal param that a zero grad leaves in place
    param[still], grad[still] = denormal, 0.0
    small = (index % 41 == 5) & ~still  # a denormal grad: denormal first moment
    grad[small] = -denormal
    nan = (index % 43 == 7) & ~still & ~small
    grad[nan] = float("nan")
    param, grad = param.to(torch.bfloat16), grad.to(torch.bfloat16)
    results = {}
    for capability in CPU_CAPABILITIES:
        with cpu_setup(capability, 2):
            p = torch.nn.Parameter(param.clone())
            opt = BF16_NEAREST[name]([p])
            for _ in range(2):
                p.grad = grad.clone()
                opt.step()
        results[capability] = [p.detach().view(torch.int16)] + [
            v.view(torch.int32 if v.dtype == torch.float32 else torch.int16)
            for k, v in sorted(opt.state[p].items()) if torch.is_tensor(v) and v.numel() == n]
    base_capability = CPU_CAPABILITIES[0]
    base = results[base_capability]
    assert len(base) >= 3  # the param and both moments (and the master)
    stored = base[0].view(torch.bfloat16).float()
    assert torch.equal(stored[still], torch.full_like(stored[still], denormal))
    assert torch.isnan(stored[nan]).all() and torch.isfinite(stored[~nan]).all()
    first_moment = opt.state[p]["exp_avg"].float()
    assert (first_moment[small].abs() < 2.0 ** -126).all() and (first_moment[small] != 0).all()
    for capability, tensors in results.items():
        for got, want in zip(tensors, base):  # NaN's payload bits aside
            as_float = (lambda t: t.view(torch.float32)) if got.dtype == torch.int32 else (
                lambda t: t.view(torch.bfloat16))
            is_nan = torch.isnan(as_float(want))
            assert torch.equal(torch.isnan(as_float(got)), is_nan), f"{capability}: NaN elsewhere"
            assert torch.equal(got[~is_nan], want[~is_nan]), f"{capability} differs from {base_capability}"


def _float32_bit_patterns(n, seed):
    """n float32 values of uniformly random bits (every class: denormals, NaNs of
    any payload, infinities, both zeros), the specials also at fixed lanes."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    small = torch.randint(-2 ** 23, 2 ** 23, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    bits[1::3] = small[1::3]  # a third denormal (or zero), either sign
    specials = torch.tensor([0x00000000, -0x80000000, 0x7f800000, -0x00800000, 0x7fc00000, 0x7f800001,
                             -0x00000001, 0x00000001, 0x007fffff, 0x7f7fffff, 0x7f7f7fff, 0x7f7f8000,
                             0x3f808000, 0x3f818000, 0x00808000, 0x0000ffff], dtype=torch.int32)
    bits[:specials.numel()] = specials
    return bits.view(torch.float32)


@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weights_round_every_float32_to_nearest_as_torch(low_dtype):
    """A param with a float32 master is written as torch's `master.to(dtype)` (round
    to nearest even) for float32 values of every bit pattern, on every instruction
    set: the masters are set by hand and stepped with a zero grad, which leaves them
    as they are.  NaN is NaN (its payload bits may differ)."""
    n = 4096 + 77
    masters = _float32_bit_patterns(n, seed=11)
    want = masters.to(low_dtype)
    want_nan = torch.isnan(want)
    for capability in CPU_CAPABILITIES:
        with cpu_setup(capability, 2):
            p = torch.nn.Parameter(torch.zeros(n, dtype=low_dtype))
            opt = af.AdamW([p], lr=1e-3, weight_decay=0.0, master_weights=True, backend="cpu")
            p.grad = torch.zeros_like(p)
            opt.step()
            opt.state[p]["master_param"].copy_(masters)
            opt.step()
        master = opt.state[p]["master_param"]
        assert torch.equal(master.view(torch.int32)[~torch.isnan(masters)],
                           masters.view(torch.int32)[~torch.isnan(masters)]), capability
        got = p.detach()
        assert torch.equal(torch.isnan(got), want_nan), capability
        assert torch.equal(got.view(torch.int16)[~want_nan], want.view(torch.int16)[~want_nan]), capability


REFERENCE_EXACT = {
    "adamw": (lambda p, b: af.AdamW(p, lr=1e-2, weight_decay=0.1, backend=b), torch.float32),
    "adam_l2_amsgrad": (lambda p, b: af.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=b), torch.float32),
    "adamw_maximize_no_bias_correction": (lambda p, b: af.AdamW(p, lr=1e-2, maximize=True, bias_correction=False,
                                                                backend=b), torch.float32),
    "radam": (lambda p, b: af.RAdam(p, lr=1e-2, weight_decay=0.1, backend=b), torch.float32),
    "radam_decoupled": (lambda p, b: af.RAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                              backend=b), torch.float32),
    "adamw8bit": (lambda p, b: af.AdamW8bit(p, lr=1e-2, weight_decay=0.1, backend=b), torch.float32),
    "radam8bit": (lambda p, b: af.RAdam8bit(p, lr=1e-2, backend=b), torch.float32),
    "adamw_bf16_sr": (lambda p, b: af.AdamW(p, lr=1e-2, weight_decay=0.1, bf16_stochastic_round=True, backend=b),
                      torch.bfloat16),
    "radam_bf16_sr": (lambda p, b: af.RAdam(p, lr=1e-2, bf16_stochastic_round=True, backend=b), torch.bfloat16),
}


@pytest.mark.parametrize("name", list(REFERENCE_EXACT))
def test_adam_family_cpu_is_bitwise_the_reference(name):
    """The Adam-family rules round op by op in the same order on the reference and
    the kernels (torch's addcdiv order for Adam's θ update, torch's RAdam order,
    correctly rounded square roots), so params and states agree bitwise over steps
    through both RAdam branches (ρt ≤ 5 for the first steps, then rectified), also
    where stochastic rounding would turn a last-bit difference into another bf16."""
    make, dtype = REFERENCE_EXACT[name]
    shapes = [(20011,), (4096,), (64, 70)]
    values = _values(shapes, dtype, seed=7)
    grads = [[g * 10.0 ** (s % 3 - 1) for g in _values(shapes, dtype, seed=700 + s)] for s in range(7)]
    fused = _run(lambda groups: make(groups, "cpu"), values, grads, [list(range(len(shapes)))])
    reference = _run(lambda groups: make(groups, "reference"), values, grads, [list(range(len(shapes)))])
    assert _count_differing(fused, reference) == 0


def _grads_over_the_float_range(n, low, high, seed):
    """n float32 grads of random sign and significand, their exponents uniform in
    [low, high], and every 97th a zero."""
    gen = torch.Generator().manual_seed(seed)
    significand = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64)
    exponent = torch.randint(low, high + 1, (n,), generator=gen).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    grads = (sign * significand * torch.exp2(exponent)).to(torch.float32)
    grads[::97] = 0.0
    return grads


@pytest.mark.parametrize("name, high", [("adamw", 100), ("adam_l2_amsgrad", 100), ("adamw8bit", 60)])
def test_adam_denominator_over_the_whole_range_of_v_on_every_instruction_set(name, high):
    """sqrt(v)/sqrt(1 − β2^t) is taken with a reciprocal and two FMAs on AVX2 and
    AVX-512 (csrc/cpu/root_division.h): grads from 2^-80 (v rounds to 0 or a
    subnormal) to 2^100 (v overflows: sqrt(v) = +Inf, and m/denom = ±0 leaves θ
    where decay put it), over steps whose bias corrections have all kinds of
    significands (β2 = 0.999 and 0.37), give bitwise the reference's params and
    states on every instruction set, at 1, 2 and 3 threads.  (8-bit: up to 2^60,
    where v stays finite.)"""
    make, _ = REFERENCE_EXACT[name]
    sizes = [4096 + 77, 8192]
    values = _values([(n,) for n in sizes], torch.float32, seed=3)
    grads = [[_grads_over_the_float_range(n, -80, high, seed=31 * s + k) for k, n in enumerate(sizes)]
             for s in range(4)]
    for betas in ((0.9, 0.999), (0.5, 0.37)):
        def build(groups, backend):
            opt = make(groups, backend)
            for group in opt.param_groups:
                group["betas"] = betas
            return opt
        reference = _run(lambda groups: build(groups, "reference"), values, grads, [[0, 1]])
        for capability in CPU_CAPABILITIES:
            for threads in (1, 2, 3):
                with cpu_setup(capability, threads):
                    fused = _run(lambda groups: build(groups, "cpu"), values, grads, [[0, 1]])
                assert _count_differing(fused, reference) == 0, (capability, threads, betas)


JUST_ABOVE_A_HALF = [0.5 + 1e-9, 0.5 + 2.0 ** -27, 0.5 + 2.0 ** -26, 0.5 + 2.0 ** -25, 0.5]
LERP_FORM_MAKERS = {
    "adamw": lambda p, b, beta1: af.AdamW(p, lr=1e-2, betas=(beta1, 0.999), weight_decay=0.1, backend=b),
    "adam_l2": lambda p, b, beta1: af.Adam(p, lr=1e-2, betas=(beta1, 0.999), weight_decay=0.1, backend=b),
    "radam": lambda p, b, beta1: af.RAdam(p, lr=1e-2, betas=(beta1, 0.999), backend=b),
    "adamw8bit": lambda p, b, beta1: af.AdamW8bit(p, lr=1e-2, betas=(beta1, 0.999), backend=b),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(LERP_FORM_MAKERS))
def test_a_beta1_just_above_a_half_takes_the_lerp_form_of_torchs_float32_weight(name, dtype):
    """torch.lerp picks its form, a + w·(b − a) for |w| < ½ or b + (w − 1)·(b − a),
    from the weight w = 1 − β1 as its math type holds it: for β1 in (½, ½ + 2^-26]
    w is below ½ as a double but ½ as a float32, so float32, bfloat16 and float16
    params take the second form and float64 ones the first.  The kernels (every
    instruction set, 1, 2 and 3 threads) round m as the reference does (and all
    else, but float64 θ, whose square roots the reference takes from torch), and
    the reference as torch.optim."""
    make = LERP_FORM_MAKERS[name]
    shapes = [(4096 + 77,), (300,)]
    values = _values(shapes, dtype, seed=11)
    grads = [[g * 10.0 ** (s - 1) for g in _values(shapes, dtype, seed=110 + s)] for s in range(3)]
    for beta1 in JUST_ABOVE_A_HALF:
        reference = _run(lambda groups: make(groups, "reference", beta1), values, grads, [[0, 1]])
        for capability in CPU_CAPABILITIES:
            for threads in (1, 2, 3):
                with cpu_setup(capability, threads):
                    fused = _run(lambda groups: make(groups, "cpu", beta1), values, grads, [[0, 1]])
                if dtype != torch.float64:
                    assert _count_differing(fused, reference) == 0, (beta1, capability, threads)
                elif name in ("adamw", "radam"):  # (float64 θ: to the last bit or so; m here takes no θ)
                    assert all(_bitwise_equal(f[1], r[1]) for f, r in zip(fused, reference)), (beta1, capability)
        if name in ("adamw", "adam_l2") and dtype != torch.bfloat16:  # (torch's for-loop: m in the param's dtype)
            theirs = {"adamw": torch.optim.AdamW, "adam_l2": torch.optim.Adam}[name]
            p = torch.nn.Parameter(values[1].clone())
            opt = theirs([p], lr=1e-2, betas=(beta1, 0.999), weight_decay=0.1, foreach=False)
            for step_grads in grads:
                p.grad = step_grads[1].clone()
                opt.step()
            assert _bitwise_equal(opt.state[p]["exp_avg"], reference[1][1]), beta1  # (states sorted: exp_avg first)


@pytest.mark.parametrize("name", ["lion", "lion8bit"])
def test_lion_sign_of_zero_nan_and_inf_on_every_instruction_set(name):
    """sign(c) of c = ±0, NaN, ±Inf, subnormal and normal, every SIMD lane and the
    scalar tail: θ moves by ∓η, or not at all for ±0 and NaN (torch.sign(±0) = 0;
    the reference's NaN rule), bitwise the same on every instruction set and as the
    reference."""
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-40, -1e-40, 2.5, -3.0])
    grad = specials.repeat(4096 // specials.numel() + 2)[:4099]  # every lane position; a scalar tail
    param = torch.linspace(-1.0, 1.0, grad.numel())
    make = {"lion": af.Lion, "lion8bit": af.Lion8bit}[name]
    results = {}
    for backend, capabilities in (("reference", [None]), ("cpu", CPU_CAPABILITIES)):
        for capability in capabilities:
            with contextlib.ExitStack() as stack:
                if capability is not None:
                    stack.enter_context(cpu_setup(capability, 2))
                p = param.clone().requires_grad_(True)
                opt = make([p], lr=0.5, betas=(0.0, 0.99), weight_decay=0.0, backend=backend)
                p.grad = grad.clone()
                opt.step()
                results[capability or backend] = p.detach().clone()
    moved = torch.where(torch.isnan(grad) | (grad == 0), 0.0, -0.5 * torch.sign(grad))
    assert torch.equal(results["reference"], param + moved)
    for where, got in results.items():
        assert _bitwise_equal(got, results["reference"]), f"{where} differs from the reference"


# ---------------------------------------------------------------------------
# 2. torch's rounding: lerp forms and the L2 term
# ---------------------------------------------------------------------------

def _against_torch(ours, theirs, values, grads):
    a = [v.clone().requires_grad_(True) for v in values]
    b = [v.clone().requires_grad_(True) for v in values]
    opt_a, opt_b = ours(a), theirs(b)
    for step_grads in grads:
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    return a, b, opt_a, opt_b


# Sizes: multiples of every SIMD width and odd ones (torch's own scalar tail).
TORCH_SHAPES = [(4096,), (37,), (5, 7)]


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.3, 0.999), (0.9, 0.999)])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_adam_matches_torch(backend, decoupled, betas):
    """Adam(W) in fp32 against torch.optim's single-tensor path.  m and v are
    bitwise torch's: lerp and addcmul are one fma each in torch's kernels, and so is
    the L2 term grad.add(param, alpha=λ).  θ is only close: torch's CPU sqrt (VML)
    is not correctly rounded, ours is; so with L2 (θ feeds g) m, v stay bitwise
    equal only for the first step."""
    cls, tcls = (af.AdamW, torch.optim.AdamW) if decoupled else (af.Adam, torch.optim.Adam)
    h = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1)
    values = _values(TORCH_SHAPES, torch.float32, seed=5)
    grads = [_values(TORCH_SHAPES, torch.float32, seed=500 + s) for s in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for steps in (1, len(grads)):
            a, b, opt_a, opt_b = _against_torch(lambda p: cls(p, backend=backend, **h),
                                                lambda p: tcls(p, foreach=False, **h), values,
                                                grads[:steps])
            for pa, pb in zip(a, b):
                for key in ("exp_avg", "exp_avg_sq"):
                    sa, sb = opt_a.state[pa][key], opt_b.state[pb][key]
                    if steps == 1 or decoupled:
                        assert torch.equal(sa, sb), (steps, key)
                    else:
                        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-6, atol=1e-7)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_params_are_torchs_but_for_the_square_root(backend, name, monkeypatch):
    """With torch's float32 square root made correctly rounded (ours is; torch's CPU
    one is not always), params follow torch.optim's single-tensor step bit for bit
    over 30 steps, RAdam's rectified update included: torch computes sqrt(bc2)/denom
    as a number over a tensor, i.e. denom's reciprocal times the number, and so do
    the kernels and the reference."""
    values = _values(TORCH_SHAPES, torch.float32, seed=7)
    grads = [_values(TORCH_SHAPES, torch.float32, seed=700 + s) for s in range(30)]
    sqrt = torch.Tensor.sqrt
    monkeypatch.setattr(torch.Tensor, "sqrt",
                        lambda t: t.double().sqrt().float() if t.dtype == torch.float32 else sqrt(t))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        h = dict(lr=0.1, weight_decay=0.01)
        a, b, _, _ = _against_torch(lambda p: getattr(af, name)(p, backend=backend, **h),
                                    lambda p: getattr(torch.optim, name)(p, foreach=False, **h), values, grads)
    finally:
        torch.set_num_threads(threads)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb), (pa - pb).abs().max()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_beta1_zero_gives_m_equal_g(backend):
    """lerp(m, g, 1) = g exactly: with betas (0, 0), m = g and v = g² after any step."""
    values = _values([(40,)], torch.float32, seed=6)
    grads = [_values([(40,)], torch.float32, seed=600 + s) for s in range(3)]
    a, _, opt, _ = _against_torch(
        lambda p: af.AdamW(p, lr=1e-2, betas=(0.0, 0.0), backend=backend),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.0, 0.0), foreach=False), values, grads)
    assert torch.equal(opt.state[a[0]]["exp_avg"], grads[-1][0])
    assert torch.equal(opt.state[a[0]]["exp_avg_sq"], grads[-1][0] * grads[-1][0])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_signed_zeros_of_m_and_params_match_reference_at_every_position(backend, beta1, maximize):
    """m = lerp(m, g, 1 − β1) keeps a zero's sign as the fma form does (with β1 = 0 a
    grad of −0 gives m = −0) in every element, also where torch's own lerp takes its
    scalar loop (small tensors, the last elements): params and states bit for bit
    the reference's, sizes 1…20 and 37."""
    sizes = list(range(1, 21)) + [37]
    values = [torch.where(torch.arange(n) % 3 == 0, torch.tensor(-0.0), torch.linspace(-1, 1, n))
              for n in sizes]
    grads = [[torch.where(torch.arange(n) % 2 == s % 2, torch.tensor(-0.0 if s else 0.0),
                          torch.linspace(-0.5, 0.5, n)) for n in sizes] for s in range(3)]
    # (maker, params bitwise too): the norm-scaled rules' params are held to the
    # reference within a tolerance (test_cpu.py), their moments bitwise.
    makers = [
        (lambda p, b: af.AdamW(p, lr=1e-2, betas=(beta1, 0.99), maximize=maximize, backend=b), True),
        (lambda p, b: af.Adam(p, lr=1e-2, betas=(beta1, 0.99), weight_decay=0.1, maximize=maximize,
                              backend=b), True),
        (lambda p, b: af.RAdam(p, lr=1e-2, betas=(beta1, 0.9), maximize=maximize, backend=b), True),
        (lambda p, b: af.ScaledAdamW(p, lr=1e-2, betas=(beta1, 0.99), p=0.1, sigma=0.1, backend=b), False),
        (lambda p, b: af.Lamb(p, lr=1e-2, betas=(beta1, 0.99), backend=b), False),
    ]
    for make, params_bitwise in makers:
        a, r, opt_a, opt_r = _against_torch(lambda p: make(p, backend), lambda p: make(p, "reference"),
                                            values, grads[:1 if not params_bitwise else 3])
        for pa, pr in zip(a, r):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_a.state[pa][key].view(torch.int32),
                                   opt_r.state[pr][key].view(torch.int32)), (type(opt_a).__name__, key)
            if params_bitwise:
                assert torch.equal(pa.detach().view(torch.int32), pr.detach().view(torch.int32)), \
                    type(opt_a).__name__


def _ulp(x):
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_l2_term_rounds_like_torch(backend):
    """g ≈ −λθ: g + λθ cancels, so its rounding dominates m.  Like torch's
    grad.add(param, alpha=λ), it must be rounded once (an fma)."""
    lam = 0.1
    theta = _values([(4099,)], torch.float32, seed=7)[0]
    noise = _values([(4099,)], torch.float32, seed=8)[0] * 1e-6
    grad = (-lam * theta.double() + noise.double()).float()
    a, b, opt_a, opt_b = _against_torch(
        lambda p: af.Adam(p, lr=1e-3, betas=(0.0, 0.0), weight_decay=lam, backend=backend),
        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.0, 0.0), weight_decay=lam, foreach=False),
        [theta], [[grad]])
    ours, theirs = opt_a.state[a[0]]["exp_avg"], opt_b.state[b[0]]["exp_avg"]
    assert torch.all((ours - theirs).abs() <= _ulp(theirs)), float(((ours - theirs).abs() / _ulp(theirs)).max())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.9])
def test_lerp_form_matches_reference(backend, beta1):
    """m of Adam, RAdam, ScaledAdamW and LAMB equals torch.lerp(m, g, 1 − β1)
    bitwise in fp32 (the reference computes it with torch.lerp, or for 1 − β1 ≥ ½
    in the same fma form with torch.add, whose rounding is the same everywhere)."""
    values = _values([(300,)], torch.float32, seed=9)
    grads = [_values([(300,)], torch.float32, seed=900 + s) for s in range(3)]
    makers = [
        lambda p, b: af.Adam(p, lr=1e-2, betas=(beta1, 0.99), backend=b),
        lambda p, b: af.RAdam(p, lr=1e-2, betas=(beta1, 0.99), backend=b),
        lambda p, b: af.ScaledAdamW(p, lr=1e-2, betas=(beta1, 0.99), p=0.1, sigma=0.1, backend=b),
        lambda p, b: af.Lamb(p, lr=1e-2, betas=(beta1, 0.99), backend=b),
    ]
    for make in makers:
        a, r, opt_a, opt_r = _against_torch(lambda p: make(p, backend), lambda p: make(p, "reference"),
                                            values, grads[:1])
        assert torch.equal(opt_a.state[a[0]]["exp_avg"], opt_r.state[r[0]]["exp_avg"])


# ---------------------------------------------------------------------------
# 3. Non-finite values: one semantics on every backend
# ---------------------------------------------------------------------------

def test_torch_sign_of_nan_and_zero():
    """What af_sign mirrors: torch.sign(NaN) = sign(±0) = +0."""
    s = torch.sign(torch.tensor([math.nan, -0.0, 0.0, -2.0, 3.0] * 7))  # body and tail
    assert s.tolist() == [0.0, 0.0, 0.0, -1.0, 1.0] * 7
    assert not torch.signbit(s[s == 0]).any()


NONFINITE_BACKENDS = ["reference", "cpu", "triton"]
NONFINITE_ALGORITHMS = {
    "adamw": lambda p, b, eps: af.AdamW(p, lr=1e-2, eps=eps, weight_decay=0.1, backend=b),
    "adam_l2_amsgrad": lambda p, b, eps: af.Adam(p, lr=1e-2, eps=eps, weight_decay=0.1, amsgrad=True,
                                                 backend=b),
    "radam": lambda p, b, eps: af.RAdam(p, lr=1e-2, eps=eps, betas=(0.9, 0.9), backend=b),
    "lion": lambda p, b, eps: af.Lion(p, lr=1e-2, weight_decay=0.1, backend=b),
    "amos": lambda p, b, eps: af.Amos(p, lr=0.05, eta=0.5, backend=b),
    "amos_rows": lambda p, b, eps: af.Amos(p, lr=0.05, eta=0.5, reduce_axes=(1,), momentum=0.9,
                                           backend=b),
    "scaled_adamw": lambda p, b, eps: af.ScaledAdamW(p, lr=1e-2, eps=eps, p=0.1, sigma=0.1, backend=b),
    "lamb": lambda p, b, eps: af.Lamb(p, lr=1e-2, eps=eps, weight_decay=0.01, backend=b),
}


def _nonfinite_case(case, steps):
    """(params, grads per step, eps) of a non-finite scenario on a (5, 8) and a (3, 8)
    tensor; the second stays finite."""
    values = _values([(5, 8), (3, 8)], torch.float32, seed=11)
    grads = [_values([(5, 8), (3, 8)], torch.float32, seed=1100 + s) for s in range(steps)]
    eps = 1e-8
    if case == "nan_grad":
        grads[0][0][1, 3] = math.nan
    elif case == "inf_grad":
        grads[0][0][2, 5] = math.inf
        grads[1][0][0, 0] = -math.inf
    elif case == "nan_param":
        values[0][4, 7] = math.nan
    elif case == "inf_param":
        values[0][1, 2] = math.inf
    elif case == "zero_grad_eps0":
        grads = [[torch.zeros_like(g) for g in step] for step in grads]
        eps = 0.0
    return values, grads, eps


@pytest.mark.parametrize("case", ["nan_grad", "inf_grad", "nan_param", "inf_param", "zero_grad_eps0"])
@pytest.mark.parametrize("name", list(NONFINITE_ALGORITHMS))
def test_nonfinite_semantics_agree(name, case):
    make = NONFINITE_ALGORITHMS[name]
    values, grads, eps = _nonfinite_case(case, 7 if name == "radam" else 2)
    results = {}
    for backend in NONFINITE_BACKENDS:
        params = [v.clone().requires_grad_(True) for v in values]
        opt = make(params, backend, eps)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[backend] = [p.detach() for p in params]
    ref = results["reference"]
    for backend in NONFINITE_BACKENDS[1:]:
        for i, (x, r) in enumerate(zip(results[backend], ref)):
            assert torch.equal(torch.isnan(x), torch.isnan(r)), f"{backend} param {i}: NaN pattern"
            assert torch.equal(torch.isinf(x), torch.isinf(r)), f"{backend} param {i}: Inf pattern"
            finite = torch.isfinite(r)
            torch.testing.assert_close(x[finite], r[finite], rtol=1e-5, atol=1e-6)
    if name == "lion" and case == "nan_grad":  # sign(NaN) = 0: θ only decays there
        assert torch.isfinite(ref[0]).all()
    if name == "lamb" and case.endswith("_param"):  # (λ > 0: ‖θ‖ and ‖u‖ both non-finite)
        assert int((~torch.isfinite(ref[0])).sum()) == 1, "a non-finite θ reached other elements"


@pytest.mark.parametrize("epsilon", [3e-39, 1e-38])
def test_amos_denormal_epsilon_floors_v_alike_on_every_backend(epsilon):
    """r = (1 − β^t)/max(v, ε) is one division on every backend: with a zero-grad
    row (v = 0) and a denormal ε whose reciprocal fits float32 (smaller ones are
    refused), r stays finite as 1 − β^t grows, γ = r·0 = 0, and the row stays
    where it was, step after step."""
    runs = []
    for backend in ("reference", "cpu"):
        p = torch.nn.Parameter(torch.ones(3, 3))
        opt = af.Amos([p], lr=0.01, eta=0.5, reduce_axes=(1,), epsilon=epsilon, beta=0.5, backend=backend)
        for _ in range(30):
            p.grad = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
            opt.step()
        runs.append(p.detach().clone())
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0][0], torch.ones(3))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("make", [
    lambda ps, b: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes=(1,), backend=b),
    lambda ps, b: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all", momentum=0.9, backend=b),
    lambda ps, b: af.Amos8bit(ps, lr=0.01, eta=0.5, reduce_axes=(1,), momentum=0.9, backend=b),
], ids=["rows", "all-momentum", "Amos8bit-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_amos_slot_sums_of_huge_finite_grads_stay_finite_on_cpu(make, dtype, capabilities):
    """Σg² of a row of finite grads past ~2.3e18 overflows float32 lanes; the CPU
    kernels sum such a block again in double, as the reference does, so the slot
    stays finite (its mean g², 2.5e37, fits float32) and the step matches."""
    value = torch.linspace(-1, 1, 3 * 4100).reshape(3, 4100)
    grad = torch.full((3, 4100), 5e18)
    grad[1] = -3e18
    grad[2] = torch.linspace(-1, 1, 4100)  # an ordinary row beside them
    runs = []
    for backend in ("reference", "cpu"):
        p = torch.nn.Parameter(value.to(dtype))
        opt = make([p], backend)
        for _ in range(2):
            p.grad = grad.to(dtype)
            opt.step()
        runs.append(p.detach().float())
    assert torch.isfinite(runs[0]).all() and torch.isfinite(runs[1]).all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(runs[1], runs[0], **tol)
