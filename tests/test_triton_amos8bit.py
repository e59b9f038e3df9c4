"""Amos8bit on the Triton backend (amos_fused/triton_kernels/amos_fp8.py), on CUDA
tensors when a GPU is visible, otherwise on CPU tensors through Triton's
interpreter.

* Against the CPU kernels: elementwise slots (no sum involved) bitwise — params,
  slots, codes and absmax; reduced slots (rows, one slot, general layouts: the
  means of g² are summed in another order, float32 trees here, float64 blocks on
  the CPU) within an ulp of float32, codes equal or E4M3 neighbours.
* Telemetry and stochastic rounding against the CPU kernels; found_inf and bad
  states write nothing; a failed launch leaves the counters; two runs bitwise
  equal; backend=None on a CUDA device picks Triton (the CUDA kernels have none).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import amos_fused as af  # noqa: E402
from amos_fused import backends  # noqa: E402
from amos_fused.triton_kernels import amos_fp8, ops  # noqa: E402

from test_triton import DEVICE  # noqa: E402
from test_triton_fp8 import FMA_ROUNDS_ONCE, _code_steps  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
HYPER = dict(lr=0.02, momentum=0.9, extra_l2=0.01)
LAYOUTS = {  # (shape, reduce_axes); 4800 elements: a program with 3 of its 4 blocks, the last one partial
    "elementwise": ((48, 100), None),
    "rows": ((48, 100), 1),
    "all": ((48, 100), "all"),
    "columns": ((48, 100), 0),
    "general-3d": ((6, 20, 40), (0, 2)),
}


def _grads(shape, dtype, step):
    gen = torch.Generator().manual_seed(500 + step)
    return (torch.randn(shape, generator=gen) * (1 + step % 2)).to(dtype)


def _run(backend, layout, dtype, steps=3, **kwargs):
    shape, axes = LAYOUTS[layout]
    device = torch.device("cpu") if backend == "cpu" else DEVICE
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(device))
    opt = af.Amos8bit([p], reduce_axes=axes, backend=backend, **{**HYPER, **kwargs})
    for step in range(steps):
        p.grad = _grads(shape, dtype, step).to(device)
        opt.step()
    return p, opt


def _bits(t):
    t = t.detach().cpu()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


@pytest.mark.parametrize("clip", [None, 0.8], ids=["plain", "clip"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_the_cpu_kernels(layout, dtype, clip):
    cpu_p, cpu_opt = _run("cpu", layout, dtype, clip_value=clip)
    tri_p, tri_opt = _run("triton", layout, dtype, clip_value=clip)
    cs, ts = cpu_opt.state[cpu_p], tri_opt.state[tri_p]
    assert set(cs) == set(ts) == {"step", "v", "b", "mu", "mu_absmax"}
    if layout == "elementwise" and FMA_ROUNDS_ONCE:
        assert torch.equal(_bits(tri_p), _bits(cpu_p))
        for key in cs:
            assert torch.equal(_bits(ts[key]), _bits(cs[key])), key
        return
    tol = {F32: 2e-6, BF16: 2**-7, F16: 2**-10}[dtype]
    torch.testing.assert_close(tri_p.detach().cpu().float(), cpu_p.detach().float(), rtol=tol, atol=tol)
    for key in ("v", "b"):
        torch.testing.assert_close(ts[key].cpu().float(), cs[key].float(), rtol=max(tol, 1e-5), atol=1e-12)
    steps = _code_steps(ts["mu"], cs["mu"])
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) <= 0.01
    torch.testing.assert_close(ts["mu_absmax"].cpu(), cs["mu_absmax"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["elementwise", "rows"])
def test_telemetry_and_stochastic_rounding_match_the_cpu_kernels(layout):
    kwargs = dict(track_rms=True, bf16_stochastic_round=True)
    cpu_p, cpu_opt = _run("cpu", layout, BF16, **kwargs)
    tri_p, tri_opt = _run("triton", layout, BF16, **kwargs)
    if layout == "elementwise" and FMA_ROUNDS_ONCE:
        assert torch.equal(_bits(tri_p), _bits(cpu_p))
    else:  # a stochastic rounding of values an ulp of float32 apart: mostly the same bfloat16
        differ = (tri_p.detach().cpu() != cpu_p.detach()).float().mean()
        assert float(differ) <= 0.01
    (w_cpu, u_cpu), (w_tri, u_tri) = cpu_opt.rms()[cpu_p], tri_opt.rms()[tri_p]
    assert w_tri == pytest.approx(w_cpu, rel=1e-3) and u_tri == pytest.approx(u_cpu, rel=2e-2)


def test_two_runs_are_bitwise_equal():
    for layout in ("rows", "columns"):
        (a, opt_a), (b, opt_b) = _run("triton", layout, F32), _run("triton", layout, F32)
        assert torch.equal(_bits(a), _bits(b))
        for key, value in opt_a.state[a].items():
            assert torch.equal(_bits(value), _bits(opt_b.state[b][key])), (layout, key)


def _op_bucket():
    """One Amos bucket as the op takes it: rows slots, FP8 mu, two steps done."""
    p, opt = _run("triton", "rows", F32, steps=2)
    state = opt.state[p]
    grads = [_grads(p.shape, F32, 7).to(DEVICE)]
    return ([p.detach()], grads, [state["mu"]], [state["mu_absmax"]], [state["step"]],
            [state["v"], state["b"]], list(opt.param_groups[0]["eta"]), opt)


def _hyper(opt):
    from amos_fused.contracts import hyper_values
    return hyper_values("amos", opt._hyper(opt.param_groups[0]))


def _kept(*lists):
    return [t.detach().clone() for group in lists for t in group]


def _assert_kept(before, *lists):
    now = [t for group in lists for t in group]
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(before, now))


def test_found_inf_skips_everything():
    params, grads, codes, absmax, steps, slots, etas, opt = _op_bucket()
    kept = _kept(params, codes, absmax, steps, slots)
    ops.step_fp8("amos", params, grads, codes, absmax, steps, _hyper(opt), torch.tensor(1.0, device=DEVICE),
                 torch.tensor(1.0, device=DEVICE), None, None, None, slots, etas)
    _assert_kept(kept, params, codes, absmax, steps, slots)


@pytest.mark.parametrize("spoil", ["slots missing", "slot of another shape", "etas missing", "no momentum"])
def test_bad_calls_raise_before_any_write(spoil):
    params, grads, codes, absmax, steps, slots, etas, opt = _op_bucket()
    originals = list(slots)
    kept = _kept(params, codes, absmax, steps, slots)
    hyper = _hyper(opt)
    if spoil == "slots missing":
        slots = None
    elif spoil == "slot of another shape":
        slots = [slots[0].reshape(-1), slots[1]]
    elif spoil == "etas missing":
        etas = None
    else:
        names = list(opt._hyper(opt.param_groups[0]))
        hyper[names.index("use_momentum")] = 0.0
    with pytest.raises(ValueError):
        ops.step_fp8("amos", params, grads, codes, absmax, steps, hyper, None, None, None, None, None, slots, etas)
    _assert_kept(kept, params, codes, absmax, steps, originals)


def test_a_failed_launch_leaves_the_step_counters(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("launch failed")

    params, grads, codes, absmax, steps, slots, etas, opt = _op_bucket()
    monkeypatch.setattr(amos_fp8, "launch_amos_fp8", fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        ops.step_fp8("amos", params, grads, codes, absmax, steps, _hyper(opt), None, None, None, None, None,
                     slots, etas)
    assert [float(s) for s in steps] == [2.0]


def test_backend_choice(monkeypatch):
    """backend=None on a CUDA device steps Amos8bit's FP8 buckets with Triton (the
    CUDA kernels have no Amos8bit), full-precision Amos with the CUDA kernels."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "_why_unavailable", lambda name: None)
    assert "amos" in backends.fused_fp8_algorithms("triton")
    assert backends.backend_for(None, "amos", cuda, "Amos8bit", fp8=True) == "triton"
    assert backends.backend_for(None, "amos", cuda, "Amos8bit") == "cuda"
    assert backends.backend_for("triton", "amos", cuda, "Amos8bit", fp8=True) == "triton"
