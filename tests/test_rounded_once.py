"""The reference backend's multiply-adds (amos_fused/rounded_once.py) round once
whatever torch's own CPU kernels do: fma32 against torch's vectorized lerp,
addcmul and add(alpha=…) (single roundings on AVX2 and AVX-512 builds), and the
Adam family's cpu and reference steps bitwise alike, and bitwise the same as here,
in a process where torch runs its baseline kernels (ATEN_CPU_CAPABILITY=default:
there torch's ops round twice)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from amos_fused import rounded_once

VECTORIZED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _wide_values(n, seed):
    """float32 values over 2^-60 … 2^60 of both signs, with exact zeros, ±0 and ties."""
    gen = torch.Generator().manual_seed(seed)
    mantissa = torch.rand(n, generator=gen) + 0.5
    exponent = torch.randint(-60, 61, (n,), generator=gen).float()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    x = sign * mantissa * torch.exp2(exponent)
    x[::97] = 0.0
    x[1::97] = -0.0
    return x


@pytest.mark.skipif(not VECTORIZED, reason="the oracle is torch's vectorized kernels (AVX2 / AVX-512)")
def test_fma32_rounds_like_torchs_vectorized_multiply_adds():
    """fma32 is bitwise torch's single-rounded lerp (both forms), addcmul and
    add(alpha) on values over a wide range, in vector lanes and scalar tails, and
    on products whose two roundings differ (1 + 2^-12)² − 1; the probe says so."""
    x, y, z = (_wide_values(20011, seed) for seed in (1, 2, 3))
    near = torch.full((37,), 1 + 2.0**-12)
    assert not torch.equal(near * near - 1, rounded_once.fma32(near, near, -torch.ones(37)))
    assert torch.equal(torch.add(-torch.ones(37), near, alpha=1 + 2.0**-12), rounded_once.fma32(1 + 2.0**-12, near, -torch.ones(37)))
    for w in (0.1, 0.001, 0.9, 0.75):
        assert torch.equal(rounded_once.lerp(x, y, w), torch.lerp(x, y, w)), w
        small = abs(w) < 0.5
        emulated = (rounded_once.fma32(w, y - x, x) if small
                    else rounded_once.fma32(torch.tensor(w, dtype=torch.float32) - 1, y - x, y))
        assert torch.equal(emulated.view(torch.int32), torch.lerp(x, y, w).view(torch.int32)), w
    for value in (0.3, 1e-3, 7.0):
        assert torch.equal(rounded_once.fma32(x * value, y, z).view(torch.int32),
                           torch.addcmul(z, x, y, value=value).view(torch.int32)), value
        assert torch.equal(rounded_once.fma32(value, x, z).view(torch.int32),
                           torch.add(z, x, alpha=value).view(torch.int32)), value
    assert rounded_once.torch_rounds_once()


def test_fma32_of_non_finite_values_is_a_fused_multiply_adds():
    """Inf and NaN go through as a fused multiply-add takes them: inf·1 + 1 = inf,
    inf·0 + 1 = NaN, 1·1 + NaN = NaN, a float32 overflow rounds to inf."""
    a = torch.tensor([float("inf"), float("inf"), 1.0, 3e38, -3e38])
    b = torch.tensor([1.0, 0.0, 1.0, 3e38, 3e38])
    c = torch.tensor([1.0, 1.0, float("nan"), 0.0, 0.0])
    got = rounded_once.fma32(a, b, c)
    assert got[0] == float("inf") and got[1].isnan() and got[2].isnan()
    assert got[3] == float("inf") and got[4] == float("-inf")


_STEPS = r"""
import random, torch, amos_fused as af
from amos_fused import rounded_once
print("rounds_once", rounded_once.torch_rounds_once())
rng = random.Random(0)  # (torch.randn's values depend on its CPU kernels)
normal = lambda: torch.tensor([rng.gauss(0.0, 1.0) for _ in range(4099)], dtype=torch.float32)
start = normal()
grads = [normal() * 10.0 ** (k - 1) for k in range(3)]
makers = {
    "AdamW": lambda ps, b: af.AdamW(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "Adam-L2": lambda ps, b: af.Adam(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "RAdam": lambda ps, b: af.RAdam(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "AdamW8bit": lambda ps, b: af.AdamW8bit(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "AdamW-bf16": lambda ps, b: af.AdamW(ps, lr=1e-3, weight_decay=0.1, backend=b),
}
for name, make in makers.items():
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    out = {}
    for backend in ("cpu", "reference"):
        p = torch.nn.Parameter(start.clone().to(dtype))
        opt = make([p], backend)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        tensors = [p.detach()] + [opt.state[p][k] for k in sorted(opt.state[p]) if k != "step"]
        out[backend] = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    print(name, out["cpu"] == out["reference"], hash(out["cpu"]))
"""


def _run_steps(env_extra):
    env = {**os.environ, **env_extra, "PYTHONHASHSEED": "0"}
    run = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split("\n")


def test_cpu_steps_are_the_reference_and_the_same_under_torchs_baseline_kernels():
    """In a process whose torch runs its baseline kernels (lerp, addcmul and
    add(alpha) rounded twice there), the reference still rounds each multiply-add
    once, so AdamW, Adam with L2 decay, RAdam, AdamW8bit and bfloat16 AdamW on cpu
    are bitwise the reference, and bitwise what they are under torch's vectorized
    kernels."""
    baseline = _run_steps({"ATEN_CPU_CAPABILITY": "default"})
    if baseline[0] != "rounds_once False":
        pytest.skip("torch's baseline kernels round these multiply-adds once on this build")
    usual = _run_steps({})
    for line, other in zip(baseline[1:], usual[1:]):
        if line:
            name, same, digest = line.split()
            assert same == "True", f"{name}: cpu differs from the reference under torch's baseline kernels"
            assert other.split()[2] == digest, f"{name}: results depend on torch's CPU kernels"


def test_the_probe_of_torchs_rounding_answers_alike_under_any_default_dtype_or_mode():
    """The probe (cached for the process) runs on real float32 tensors: first asked
    under a float64 default dtype, a meta default device or FakeTensorMode, it gives
    the answer it gives plainly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plain = rounded_once.torch_rounds_once()
    contexts = [lambda: torch.device("meta"), FakeTensorMode]
    try:
        rounded_once.torch_rounds_once.cache_clear()
        torch.set_default_dtype(torch.float64)
        try:
            assert rounded_once.torch_rounds_once() == plain
        finally:
            torch.set_default_dtype(torch.float32)
        for context in contexts:
            rounded_once.torch_rounds_once.cache_clear()
            with context():
                assert rounded_once.torch_rounds_once() == plain
    finally:
        rounded_once.torch_rounds_once.cache_clear()
