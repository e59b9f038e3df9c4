"""Amos8bit: Amos with its momentum mu kept as block-scaled FP8 codes (state keys
``mu`` and ``mu_absmax``), the slots v and b in full precision.

The CPU kernel is held to:
- the same CPU step of full-precision Amos on the decoded momentum, its new mu
  encoded by the Python codec (amos_fused/fp8_states.py): bitwise, for every slot
  layout (elementwise, rows, general), clipping, float32 params and bf16/fp16
  params with float32 masters (where both step a float32 momentum);
- the eager reference (decode, reference Amos, encode): codes equal up to a
  neighbour in a rare tie, params within an ulp;
- itself at any thread count and on every instruction set, bitwise.
Then: without momentum it is Amos; momentum switched on later makes FP8 codes;
checkpoints move between Amos and Amos8bit; small params keep float momentum; a
corrupt state raises before any write; a NaN grad poisons its block only;
GradScaler; the CUDA kernels' refusal; a hypothesis property.
"""
from __future__ import annotations

import io
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amos_fused as af
from amos_fused import backends, fp8_states
from conftest import CPU_CAPABILITIES, assert_unchanged, raises_naming, snapshot, with_threads

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
pytestmark = pytest.mark.usefixtures("one_thread_outside_the_kernels")
HYPER = dict(lr=0.02, momentum=0.9)
# (shape, reduce_axes): one of each slot layout of the kernels (csrc/amos_layout.h)
LAYOUTS = {
    "elementwise": ((48, 100), None),
    "rows": ((48, 100), 1),          # slots of 100 contiguous elements: rows that straddle blocks
    "all": ((48, 100), "all"),        # one slot
    "columns": ((48, 100), 0),       # general: a slot's elements are 100 apart
    "general-3d": ((6, 20, 40), (0, 2)),
}


def _amos8(params, **kwargs):
    return with_threads(af.Amos8bit(params, **{**HYPER, **kwargs}))


def _grads(p, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(p.dtype)


def _run(backend, shape, axes, dtype=F32, steps=4, **kwargs):
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = _amos8([p], reduce_axes=axes, backend=backend, **kwargs)
    for step in range(steps):
        p.grad = _grads(p, step)
        opt.step()
    return p, opt


def _neighbours(a, b):
    """Codes equal, or E4M3 neighbours (ranks one apart), in at most 0.5% of them."""
    def rank(c):
        c = c.reshape(-1).long()
        return torch.where(c >= 0x80, -(c & 0x7F), c & 0x7F)
    diff = (rank(a) - rank(b)).abs()
    assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= max(1, a.numel() // 200)


@pytest.mark.parametrize("clip", [None, 0.7], ids=["plain", "clip"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, master", [(F32, False), (BF16, True), (F16, True)], ids=["f32", "bf16-master",
                                                                                            "f16-master"])
def test_cpu_is_full_precision_amos_on_the_decoded_momentum(layout, clip, dtype, master):
    shape, axes = LAYOUTS[layout]
    p8, opt8 = _run("cpu", shape, axes, dtype, steps=3, clip_value=clip, master_weights=master)
    pf = torch.nn.Parameter(p8.detach().clone())
    optf = with_threads(af.Amos([pf], reduce_axes=axes, backend="cpu", clip_value=clip, master_weights=master,
                                **HYPER))
    optf.load_state_dict(opt8.state_dict())  # decodes mu into float32 (the master's dtype)
    assert optf.state[pf]["mu"].dtype == F32
    p8.grad = _grads(p8, 9)
    pf.grad = p8.grad.clone()
    opt8.step()
    optf.step()
    s8, sf = opt8.state[p8], optf.state[pf]
    assert torch.equal(p8, pf)
    for key in ("v", "b") + (("master_param",) if master else ()):
        assert torch.equal(s8[key], sf[key]), key
    codes, absmax = fp8_states.new_state(s8.get("master_param", p8))
    fp8_states.store(sf["mu"], codes, absmax, root=False)
    assert torch.equal(s8["mu"], codes)
    assert torch.equal(s8["mu_absmax"], absmax)


def _one_step_each(shape, axes, dtype, steps, values=None, **kwargs):
    """The CPU kernel's state after ``steps`` steps, then one more step of it and one
    of the reference from that same state (the reference's Amos scalars may differ
    from the kernels' in their last bits, so two trajectories can drift apart by a
    code flipped at a tie; one step from one state cannot)."""
    p, opt = _run("cpu", shape, axes, dtype, steps=steps, **kwargs)
    q = torch.nn.Parameter(p.detach().clone())
    ref = _amos8([q], reduce_axes=axes, backend="reference", **kwargs)
    ref.load_state_dict(opt.state_dict())
    p.grad = _grads(p, steps)
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    return (p, opt.state[p]), (q, ref.state[q])


def _assert_matches_reference(cpu, ref, dtype):
    (cp, cs), (rp, rs) = cpu, ref
    tol = {F32: 1e-6, BF16: 2**-7, F16: 2**-10}[dtype]
    torch.testing.assert_close(cp.float(), rp.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cs["v"].float(), rs["v"].float(), rtol=tol, atol=0)
    if "mu_absmax" in rs:
        _neighbours(cs["mu"], rs["mu"])
        torch.testing.assert_close(cs["mu_absmax"], rs["mu_absmax"], rtol=2**-20, atol=0)
    else:
        torch.testing.assert_close(cs["mu"].float(), rs["mu"].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_cpu_matches_reference(layout, dtype, maximize):
    shape, axes = LAYOUTS[layout]
    for steps in (0, 3):
        cpu, ref = _one_step_each(shape, axes, dtype, steps, maximize=maximize, extra_l2=0.01, clip_value=1.5)
        _assert_matches_reference(cpu, ref, dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bitwise_the_same_at_any_thread_count(layout):
    """Thread counts, on each instruction set; across instruction sets too where
    no sum over SIMD lanes is involved (rows' means of g² and the telemetry add
    lanes of each set's width: README, "Bitwise determinism")."""
    shape, axes = LAYOUTS[layout]
    shape = (shape[0] * 4,) + shape[1:]  # several tasks of the block walk
    per_capability = {}
    for capability in CPU_CAPABILITIES:
        torch.ops.amos_fused.set_cpu_capability(capability)
        try:
            results = []
            for threads in (1, 2, 3):
                gen = torch.Generator().manual_seed(7)
                p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(BF16))
                opt = with_threads(af.Amos8bit([p], reduce_axes=axes, backend="cpu", track_rms=True,
                                               bf16_stochastic_round=True, **HYPER), threads)
                for step in range(3):
                    p.grad = _grads(p, step)
                    opt.step()
                results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()},
                                opt.rms()[p]))
        finally:
            torch.ops.amos_fused.set_cpu_capability("best")
        p0, s0, r0 = results[0]
        for p, s, r in results[1:]:
            assert torch.equal(p.view(torch.int16), p0.view(torch.int16))
            for key in s0:
                assert torch.equal(s[key], s0[key]), key
            assert r == r0
        per_capability[capability] = (p0, s0)
    if layout != "rows":
        p0, s0 = per_capability["default"]
        for p, s in per_capability.values():
            assert torch.equal(p.view(torch.int16), p0.view(torch.int16))
            for key in s0:
                assert torch.equal(s[key], s0[key]), key


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_without_momentum_it_is_amos(backend):
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(64, 80, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = af.Amos8bit([a], lr=0.02, reduce_axes=1, backend=backend)
    opt_b = af.Amos([b], lr=0.02, reduce_axes=1, backend=backend)
    for step in range(3):
        a.grad = _grads(a, step)
        b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert sorted(opt_a.state[a]) == ["b", "step", "v"]
    # momentum switched on: the momentum starts as FP8 codes of zeros
    opt_a.param_groups[0]["momentum"] = 0.9
    a.grad = _grads(a, 5)
    opt_a.step()
    state = opt_a.state[a]
    assert state["mu"].dtype == torch.uint8 and state["mu"].shape == a.shape
    assert state["mu_absmax"].shape == (fp8_states.num_blocks(a.numel()),)
    assert bool((state["mu_absmax"] > 0).all())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("axes", [None, 1, "all"])
@pytest.mark.parametrize("cls", [af.Amos, af.Amos8bit])
def test_momentum_switched_off_is_ignored_while_off(cls, axes, backend):
    """momentum set to None after two steps: the step is a momentum-free Amos's from
    the same v, b and step, and the momentum (float or FP8 codes with their absmax)
    is left as it was."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(64, 80, generator=gen) * 0.1)
    opt = cls([p], lr=0.05, eta=0.1, momentum=0.9, reduce_axes=axes, backend=backend)
    for step in range(2):
        p.grad = _grads(p, step)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    twin = af.Amos([q], lr=0.05, eta=0.1, reduce_axes=axes, backend=backend)
    twin.state[q] = {key: opt.state[p][key].clone() for key in ("step", "v", "b")}
    momentum = {key: value.clone() for key, value in opt.state[p].items() if key.startswith("mu")}
    assert sorted(momentum) == (["mu", "mu_absmax"] if cls is af.Amos8bit else ["mu"])
    opt.param_groups[0]["momentum"] = None
    for step in range(2, 4):
        p.grad = q.grad = _grads(p, step)
        opt.step()
        twin.step()
    assert torch.equal(p, q)
    for key, value in momentum.items():
        assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_small_params_keep_a_float_momentum(backend):
    gen = torch.Generator().manual_seed(4)
    small = torch.nn.Parameter(torch.randn(40, 50, generator=gen))  # 2000 < 4096 elements
    big = torch.nn.Parameter(torch.randn(64, 64, generator=gen))
    opt = _amos8([small, big], reduce_axes=1, backend=backend)
    for step in range(2):
        small.grad, big.grad = _grads(small, step), _grads(big, step)
        opt.step()
    assert opt.state[small]["mu"].dtype == F32 and "mu_absmax" not in opt.state[small]
    assert opt.state[big]["mu"].dtype == torch.uint8


def test_state_is_a_quarter_of_amos_momentum():
    p = torch.nn.Parameter(torch.randn(256, 256))
    opt = _amos8([p], reduce_axes=1, backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    coded = state["mu"].numel() * state["mu"].element_size() + state["mu_absmax"].numel() * 4
    assert coded == p.numel() + 4 * p.numel() // 256  # 1.016 B per element instead of 4
    assert state["v"].numel() == state["b"].numel() == 256  # one slot per row


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_checkpoints_move_between_amos_and_amos8bit(backend):
    gen = torch.Generator().manual_seed(5)
    src = torch.nn.Parameter(torch.randn(48, 100, generator=gen))
    full = af.Amos([src], reduce_axes=1, backend=backend, **HYPER)
    for step in range(2):
        src.grad = _grads(src, step)
        full.step()
    # Amos → Amos8bit: the momentum is quantized on load
    dst = torch.nn.Parameter(src.detach().clone())
    coded = af.Amos8bit([dst], reduce_axes=1, backend=backend, **HYPER)
    coded.load_state_dict(full.state_dict())
    codes, absmax = fp8_states.new_state(dst)
    fp8_states.store(full.state[src]["mu"], codes, absmax, root=False)
    assert torch.equal(coded.state[dst]["mu"], codes) and torch.equal(coded.state[dst]["mu_absmax"], absmax)
    # Amos8bit's own checkpoint round-trips bitwise, through torch.save
    dst.grad = _grads(dst, 3)
    coded.step()
    buffer = io.BytesIO()
    torch.save(coded.state_dict(), buffer)
    again = torch.nn.Parameter(dst.detach().clone())
    reloaded = af.Amos8bit([again], reduce_axes=1, backend=backend, **HYPER)
    buffer.seek(0)
    reloaded.load_state_dict(torch.load(buffer))
    for key, value in coded.state[dst].items():
        assert torch.equal(reloaded.state[again][key], value), key
    dst.grad = _grads(dst, 4)
    again.grad = dst.grad.clone()
    coded.step()
    reloaded.step()
    assert torch.equal(dst, again)
    # Amos8bit → Amos: decoded
    back = torch.nn.Parameter(dst.detach().clone())
    plain = af.Amos([back], reduce_axes=1, backend=backend, **HYPER)
    plain.load_state_dict(coded.state_dict())
    expected = fp8_states.decoded(coded.state[dst]["mu"], coded.state[dst]["mu_absmax"], False)
    assert torch.equal(plain.state[back]["mu"], expected)
    assert "mu_absmax" not in plain.state[back]


def _two_groups_stepped(backend, seed):
    """Amos8bit over two groups of one (64, 80) param each (rows slots), stepped once."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.nn.Parameter(torch.randn(64, 80, generator=gen))
    second = torch.nn.Parameter(torch.randn(64, 80, generator=gen))
    opt = _amos8([{"params": [first]}, {"params": [second]}], reduce_axes=1, backend=backend)
    first.grad, second.grad = _grads(first, 0), _grads(second, 0)
    opt.step()
    return opt, first, second


CORRUPTIONS = {
    "codes of another dtype": lambda s: s.__setitem__("mu", s["mu"].float()),
    "codes of another shape": lambda s: s.__setitem__("mu", s["mu"].reshape(-1)),
    "absmax too short": lambda s: s.__setitem__("mu_absmax", s["mu_absmax"][:-1]),
    "absmax missing": lambda s: s.pop("mu_absmax"),
    "slot of another shape": lambda s: s.__setitem__("v", s["v"].reshape(-1)),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_state_raises_before_any_write(corruption, backend):
    opt, first, second = _two_groups_stepped(backend, seed=6)
    CORRUPTIONS[corruption](opt.state[second])
    before = snapshot(opt, [first, second])
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert_unchanged(before, opt, [first, second])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_grad_poisons_its_block_and_nothing_else(backend):
    p = torch.nn.Parameter(torch.randn(40, 256))  # rows of one block each: slots and blocks coincide
    opt = _amos8([p], reduce_axes=1, backend=backend)
    p.grad = _grads(p, 0)
    opt.step()
    grad = _grads(p, 1)
    grad[7, 100] = float("nan")
    p.grad = grad
    opt.step()
    absmax = opt.state[p]["mu_absmax"]
    assert torch.isnan(absmax[7]) and bool(torch.isfinite(absmax[torch.arange(40) != 7]).all())
    assert bool(torch.isfinite(p[torch.arange(40) != 7]).all())


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_non_finite_param_poisons_its_block_through_the_momentum(backend, value):
    """A NaN or Inf param element makes its update, and so its momentum, non-finite:
    the block of 256 it is in turns NaN (its absmax) and so do that block's params
    at the next step; the other blocks stay finite (Amos keeps it to the element)."""
    p = torch.nn.Parameter(torch.randn(40, 256))
    with torch.no_grad():
        p[7, 100] = value
    opt = _amos8([p], reduce_axes=None, backend=backend)
    for step in range(2):
        p.grad = _grads(p, step)
        opt.step()
    others = torch.arange(40) != 7
    assert torch.isnan(opt.state[p]["mu_absmax"][7]) and bool(torch.isnan(p[7]).all())
    assert bool(torch.isfinite(p[others]).all()) and bool(torch.isfinite(opt.state[p]["mu_absmax"][others]).all())


def test_grad_scaler_matches_unscaled_grads():
    results = []
    for scale in (None, 2.0**10 + 3.0):
        gen = torch.Generator().manual_seed(8)
        p = torch.nn.Parameter(torch.randn(48, 100, generator=gen))
        opt = _amos8([p], reduce_axes=1, backend="cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for step in range(3):
            g = _grads(p, step)
            if scaler is None:
                p.grad = g
                opt.step()
            else:
                p.grad = scaler.scale(g)  # (g·scale, as backward gives it)
                scaler.step(opt)
                scaler.update()
        results.append((p.detach().clone(), opt.state[p]["mu"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    _neighbours(results[0][1], results[1][1])


def test_channels_last_param_blocks_follow_memory_order():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(32, 16, 3, 3, generator=gen)
    p = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
    q = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
    opt_cpu = _amos8([p], reduce_axes=(1, 2, 3), backend="cpu")
    opt_ref = _amos8([q], reduce_axes=(1, 2, 3), backend="reference")
    for step in range(3):
        p.grad = _grads(p, step).to(memory_format=torch.channels_last)
        q.grad = p.grad.clone()
        opt_cpu.step()
        opt_ref.step()
    assert opt_cpu.state[p]["mu"].stride() == p.stride()
    _neighbours(opt_cpu.state[p]["mu"], opt_ref.state[q]["mu"])
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_cuda_kernels_refuse_amos8bit_with_a_clear_error():
    assert "amos" in backends.fused_fp8_algorithms("cpu")
    assert "amos" not in backends.fused_fp8_algorithms("cuda")
    raises_naming(NotImplementedError,
                  lambda: backends.backend_for("cuda", "amos", torch.device("cuda"), "Amos8bit", fp8=True),
                  "Amos8bit", "cuda", "8-bit")
    # full precision, or a backend of its own choice: no refusal
    assert backends.backend_for("cuda", "amos", torch.device("cuda"), "Amos8bit") == "cuda"
    assert backends.backend_for(None, "amos", torch.device("cpu"), "Amos8bit", fp8=True) == "cpu"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(16, 90), cols=st.integers(64, 300), axes=st.sampled_from([None, 0, 1, "all"]),
       dtype=st.sampled_from([F32, BF16]), clip=st.sampled_from([None, 0.5]), steps=st.integers(0, 3),
       maximize=st.booleans())
def test_property_cpu_matches_reference(rows, cols, axes, dtype, clip, steps, maximize):
    cpu, ref = _one_step_each((rows, cols), axes, dtype, steps, clip_value=clip, maximize=maximize)
    _assert_matches_reference(cpu, ref, dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("key, value", [("lr", 1e300), ("clip_value", -1e300), ("epsilon", 1e300),
                                        ("extra_l2", 1e39)])
def test_a_hyper_parameter_out_of_float32_range_raises_before_any_write(backend, key, value):
    """A later group's value that float32 cannot hold (the step of float32 params
    computes in float32: the kernels would store it as Inf, the reference could not
    convert it) is refused naming the group and the value, with the first group and
    every step counter as they were."""
    opt, first, second = _two_groups_stepped(backend, seed=10)
    opt.param_groups[1][key] = value
    before = snapshot(opt, [first, second])
    raises_naming(ValueError, opt.step, r"param_groups\[1\]", key, re.escape(str(value)))
    assert_unchanged(before, opt, [first, second])


def test_float64_params_take_hyper_parameters_beyond_float32_range():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    opt = af.Amos8bit([p], lr=1e-3, extra_l2=1e39, momentum=0.9, backend="cpu")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["mu"].dtype == torch.float64  # (float64 params keep a float momentum)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_codes_without_their_absmax_are_refused_even_without_a_step_count(backend):
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = _amos8([p], reduce_axes=1, backend=backend)
    p.grad = _grads(p, 0)
    opt.step()
    for key in ("mu_absmax", "step"):
        del opt.state[p][key]
    before = snapshot(opt, [p])
    raises_naming(ValueError, opt.step, "mu", "mu_absmax", "missing")
    assert_unchanged(before, opt, [p])


@pytest.mark.parametrize("key", ["momentum", "clip_value"])
def test_numeric_strings_are_refused(key):
    """momentum='0.9' or clip_value='0.5' are refused by name, as torch.optim refuses lr='0.1'."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 64 * 80).reshape(64, 80))
    with pytest.raises(ValueError, match=key):
        af.Amos8bit([p], lr=0.02, reduce_axes=1, **{key: "0.5"})


