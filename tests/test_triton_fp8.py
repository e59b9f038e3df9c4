"""The 8-bit optimizers (AdamW8bit, Adam8bit, RAdam8bit, Lion8bit: block-scaled FP8 states,
amos_fused/fp8_states.py) on the Triton backend (amos_fused/triton_kernels/fp8.py),
on CUDA tensors when a GPU is visible, otherwise on CPU tensors through Triton's
interpreter.

* Against the CPU kernels (backend='cpu'): float32 / bfloat16 / float16 params, a
  partial last block, a program with missing blocks, a transposed (dense,
  non-contiguous) param and a small param with full-precision states in the same
  group: params, codes and absmax BITWISE equal.  Both sides decode to the same
  float32 values and run the same per-element float32 math (the Triton kernels'
  elementwise rules already match the CPU kernels bit for bit,
  tests/test_triton_stochastic_round.py), so no code may differ by ±1: over 8
  steps of 3 tensors (16,448 + 5,000 + 8,192 elements), both Adam weight decays,
  Lion and the 3 dtypes, 0 of 444,600 codes differed.
* The encoder against amos_fused.fp8_states.encode (torch's own float8_e4m3fn
  conversion): every E4M3 value, every tie, the neighbours of every tie,
  subnormal codes, zero / tiny / NaN / ±Inf blocks, through the op (Lion with
  β2 = 0 and Adam with β1 = β2 = 0 store m = g and sqrt(v) = sqrt(g²)) and
  through the helper over every float32 exponent; the decoder over every code.
* Telemetry and stochastic rounding of bfloat16 params with FP8 states against
  the CPU kernels; found_inf; bad FP8 states and a failed launch write nothing;
  which backend steps an FP8 bucket.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import amos_fused as af  # noqa: E402
from amos_fused import backends, fp8_states  # noqa: E402
from amos_fused.telemetry import new_table  # noqa: E402
from amos_fused.triton_kernels import fp8, ops  # noqa: E402

from registry import seeded_grads, seeded_params  # noqa: E402
from test_triton import DEVICE  # noqa: E402

CPU = torch.device("cpu")
CLASSES = {"AdamW8bit": af.AdamW8bit, "Adam8bit": af.Adam8bit, "RAdam8bit": af.RAdam8bit,
           "Lion8bit": af.Lion8bit}
KWARGS = {"AdamW8bit": dict(lr=1e-2, weight_decay=0.1), "Adam8bit": dict(lr=1e-2, weight_decay=0.1),
          "RAdam8bit": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
          "Lion8bit": dict(lr=1e-2, weight_decay=0.1)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# 17.5 blocks (a partial last block; its program has 2 of its 4 blocks), a
# transposed param of 18.75 blocks, and a small param (full-precision states).
SHAPES = [(64, 70), (80, 60), (10,)]
STEPS = 2
ADAM_HYPER = dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=1.0,
                  amsgrad=0.0,
                  bias_correction=1.0)
LION_HYPER = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).view(torch.uint8)


def _params(dtype, device):
    params = seeded_params(SHAPES, dtype, device)
    params[1] = torch.nn.Parameter(params[1].detach().t())  # dense, not contiguous
    return params


@pytest.fixture
def launches(monkeypatch):
    """Counts the FP8 launches (each Triton FP8 step makes one per bucket)."""
    calls = []
    launch = fp8.launch_fp8

    def counted(*args, **kwargs):
        calls.append(args[0])
        return launch(*args, **kwargs)

    monkeypatch.setattr(fp8, "launch_fp8", counted)
    return calls


def _run(name, backend, dtype, steps=STEPS, **extra):
    device = DEVICE if backend == "triton" else CPU
    params = _params(dtype, device)
    opt = CLASSES[name](params, backend=backend, **{**KWARGS[name], **extra})
    for step in range(steps):
        for p, g in zip(params, seeded_grads(params, step)):
            p.grad = g
        opt.step()
    return params, opt


@triton.jit
def _fma_kernel(out):
    x = tl.full((1,), 1.0 + 2.0**-12, tl.float32)
    tl.store(out + tl.arange(0, 1), tl.fma(x, x, tl.full((1,), -(1.0 + 2.0**-11), tl.float32)))


def _fma_rounds_once() -> bool:
    """Whether tl.fma rounds a·b + c once, as the CPU kernels' fma does: true on a
    GPU and in triton 3.9's interpreter; triton 3.6's interpreter computes a·b + c
    with two float32 roundings (its full-precision Adam then differs from the CPU
    kernels by an ulp here and there too).  (1 + 2^-12)² − (1 + 2^-11) is 2^-24
    rounded once, 0 rounded twice."""
    out = torch.zeros(1, device=DEVICE)
    _fma_kernel[(1,)](out)
    return float(out) == 2.0**-24


FMA_ROUNDS_ONCE = _fma_rounds_once()


def _code_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many E4M3 steps apart two codes are (same sign: magnitude difference)."""
    signed = lambda c: torch.where(c >= 128, -(c - 128), c)  # noqa: E731
    return (signed(a.cpu().int()) - signed(b.cpu().int())).abs()


def _assert_bitwise(run_a, run_b):
    """Params, codes and absmax bit for bit equal where tl.fma rounds once; with an
    fma rounded twice (triton 3.6's interpreter) the update differs by an ulp at
    times, so: params and absmax within 1e-5 (reduced-precision params: a
    neighbouring value), codes at most one E4M3 step apart in at most 1% of them."""
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.stride() == b.stride(), f"param {i}"
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert set(state_a) == set(state_b)
        if FMA_ROUNDS_ONCE:
            assert torch.equal(_bits(a), _bits(b)), f"param {i}"
            for key in state_a:
                assert torch.equal(_bits(state_a[key]), _bits(state_b[key])), f"param {i} state {key!r}"
            continue
        tol = 1e-5 if a.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.detach().cpu().float(), b.detach().cpu().float(), rtol=tol, atol=tol)
        for key in state_a:
            x, y = state_a[key].cpu(), state_b[key].cpu()
            if x.dtype == torch.uint8:
                steps = _code_steps(x, y)
                assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) <= 0.01, f"param {i} {key!r}"
            else:
                torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Against the CPU kernels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CLASSES))
def test_matches_the_cpu_kernels(name, dtype, launches):
    got = _run(name, "triton", DTYPES[dtype])
    assert launches == [got[1].algorithm] * STEPS  # the FP8 bucket ran on the Triton kernels
    assert "exp_avg_absmax" in got[1].state[got[0][0]] and "exp_avg_absmax" not in got[1].state[got[0][2]]
    _assert_bitwise(got, _run(name, "cpu", DTYPES[dtype]))


def test_radam8bit_rectified_steps_match_the_cpu_kernels(launches):
    """RAdam8bit past step 5 (β2 = 0.99: ρ_t > 5 from step 6), where the update takes
    the rectified branch, with L2 decay."""
    kwargs = dict(decoupled_weight_decay=False, betas=(0.9, 0.99))
    got = _run("RAdam8bit", "triton", torch.float32, steps=7, **kwargs)
    assert launches == ["radam"] * 7
    _assert_bitwise(got, _run("RAdam8bit", "cpu", torch.float32, steps=7, **kwargs))


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_telemetry_matches_the_cpu_kernels(name):
    """opt.rms() of backend='triton' against backend='cpu' (same stored params; sums
    taken in another order) and against the RMS of the stored params."""
    got, expected = _run(name, "triton", torch.float32, track_rms=True), _run(name, "cpu", torch.float32,
                                                                               track_rms=True)
    _assert_bitwise(got, expected)
    rms, cpu_rms = got[1].rms(), expected[1].rms()
    for p, q in zip(got[0], expected[0]):
        weight, update = rms[p]
        assert weight == pytest.approx(float(p.detach().double().square().mean()) ** 0.5, rel=1e-5)
        assert weight == pytest.approx(cpu_rms[q][0], rel=1e-5)
        assert update == pytest.approx(cpu_rms[q][1], rel=1e-4) and update > 0


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_stochastic_rounding_matches_the_cpu_kernels(name):
    """bfloat16 params stored with stochastic rounding (and telemetry of the rounded
    values): the CPU kernels' bits; not round-to-nearest."""
    rounded = dict(bf16_stochastic_round=True, stochastic_round_seed=3, track_rms=True)
    got = _run(name, "triton", torch.bfloat16, **rounded)
    expected = _run(name, "cpu", torch.bfloat16, **rounded)
    _assert_bitwise(got, expected)
    rms, cpu_rms = got[1].rms(), expected[1].rms()
    for p, q in zip(got[0], expected[0]):
        assert rms[p][0] == pytest.approx(cpu_rms[q][0], rel=1e-5)
        assert rms[p][1] == pytest.approx(cpu_rms[q][1], rel=1e-4)
    nearest = _run(name, "cpu", torch.bfloat16)
    assert not torch.equal(got[0][0].detach().cpu(), nearest[0][0].detach())


# ---------------------------------------------------------------------------
# The format against amos_fused/fp8_states.py (torch's float8_e4m3fn)
# ---------------------------------------------------------------------------

def _e4m3_values() -> torch.Tensor:
    """The 127 non-negative finite E4M3 values (codes 0 … 126), float32."""
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _block(values, fill=0.0) -> torch.Tensor:
    out = torch.full((fp8_states.BLOCK,), fill)
    out[:len(values)] = values
    return out


def _format_grads() -> torch.Tensor:
    """One grad per block of 256 (448 in a block makes its factor 448/absmax = 1, so
    its values are encoded as they are), and a partial last block."""
    gen = torch.Generator().manual_seed(5)
    e4m3 = _e4m3_values()
    ties = (e4m3[:-1] + e4m3[1:]) / 2  # every tie (exact in float32), normal and subnormal
    limit = torch.tensor(448.0)
    blocks = [
        _block(torch.cat([e4m3[1:], -e4m3[1:], limit.view(1)])),                    # every code
        _block(torch.cat([ties, -ties, limit.view(1)])),                             # ties to even
        _block(torch.cat([ties.nextafter(limit), -ties.nextafter(-limit), limit.view(1)])),
        _block(torch.cat([ties.nextafter(torch.tensor(0.0)), limit.view(1)])),
        torch.randn(fp8_states.BLOCK, generator=gen) * 3.7,                          # a factor ≠ 1
        torch.exp2(-40 * torch.rand(fp8_states.BLOCK, generator=gen))                # subnormal codes, 0
        * torch.randn(fp8_states.BLOCK, generator=gen).sign(),
        torch.zeros(fp8_states.BLOCK),                                              # zero
        torch.rand(fp8_states.BLOCK, generator=gen) * 2.0**-97,                      # absmax < 2^-96: zeros
        _block(torch.tensor([2.0**-96, -2.0**-100]), 2.0**-120),                     # absmax = 2^-96: coded
        _block(torch.tensor([float("nan"), 1.0])),                                   # NaN
        _block(torch.tensor([2.0, float("inf")])),                                   # ±Inf
        _block(torch.tensor([float("-inf"), 3.0])),
        torch.full((fp8_states.BLOCK,), 1e-40),                                      # float32 subnormals
        torch.randn(100, generator=gen),                                             # partial
    ]
    return torch.cat(blocks)


@pytest.mark.parametrize("algorithm", ["lion", "adam"])
def test_encoder_matches_the_reference(algorithm):
    """One step from zero states with m = g (Lion: β2 = 0; Adam: β1 = 0) and, for
    Adam, v = g² (β2 = 0): codes and absmax bitwise equal to fp8_states.encode of g
    and of g² (stored as sqrt), and to the CPU kernels'."""
    g = _format_grads()
    if algorithm == "lion":
        hyper, expected = dict(LION_HYPER, beta2=0.0), [fp8_states.encode(g, root=False)]
    else:
        hyper = dict(ADAM_HYPER, beta1=0.0, beta1_weight=1.0, beta2=0.0)
        expected = [fp8_states.encode(g, root=False), fp8_states.encode(g * g, root=True)]
    results = []
    for step_fp8, device in ((ops.step_fp8, DEVICE), (torch.ops.amos_fused.step_fp8, CPU)):
        params, grads = [torch.zeros_like(g, device=device)], [g.to(device)]
        codes = [torch.zeros_like(g, dtype=torch.uint8, device=device) for _ in expected]
        absmax = [torch.zeros(fp8_states.num_blocks(g.numel()), device=device) for _ in expected]
        step_fp8(algorithm, params, grads, codes, absmax, [torch.tensor(0.0)], list(hyper.values()),
                 None, None, None, None)
        results.append((codes, absmax))
    for codes, absmax in results:
        for (c, a), (want_c, want_a) in zip(zip(codes, absmax), expected):
            assert torch.equal(_bits(c), want_c), f"{int((c.cpu() != want_c).sum())} codes differ"
            assert torch.equal(_bits(a), _bits(want_a))
    assert torch.isnan(results[0][1][0][9:12].cpu()).all() and (results[0][1][0][6:8] == 0).all()


@pytest.mark.parametrize("algorithm", ["adam", "lion"])
def test_an_absmax_no_encode_stores_decodes_as_nan_like_the_cpu_kernel(algorithm):
    """Blocks whose absmax no encode stores (negative, ±Inf: an edited state) decode
    as NaN, and so do E4M3's NaN codes (0x7f, 0xff: never encoded), as on the CPU
    kernel: one step from the same state gives bitwise the same params, codes and
    absmax on both (NaN where the CPU has NaN; with an fma rounded twice, triton
    3.6's interpreter: the finite values as _assert_bitwise allows), those blocks'
    absmax NaN after it."""
    gen = torch.Generator().manual_seed(11)
    n = 8 * fp8_states.BLOCK + 40
    g = torch.randn(n, generator=gen)
    states = 1 if algorithm == "lion" else 2
    codes0 = [torch.randint(0, 0x7F, (n,), generator=gen, dtype=torch.uint8) for _ in range(states)]
    absmax0 = [torch.rand(fp8_states.num_blocks(n), generator=gen) + 0.5 for _ in range(states)]
    absmax0[0][[1, 3, 5]] = torch.tensor([-absmax0[0][1].item(), float("inf"), -float("inf")])
    if states == 2:
        codes0[1] &= 0x7F  # a root state's codes are ≥ +0
        absmax0[1][6] = -2.0
        codes0[1][7 * fp8_states.BLOCK + 3] = 0x7F
    codes0[0][[2 * fp8_states.BLOCK + 5, n - 3]] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)
    hyper = LION_HYPER if algorithm == "lion" else ADAM_HYPER
    results = []
    for step_fp8, device in ((ops.step_fp8, DEVICE), (torch.ops.amos_fused.step_fp8, CPU)):
        params, grads = [torch.linspace(-1.0, 1.0, n, device=device)], [g.to(device)]
        codes = [c.clone().to(device) for c in codes0]
        absmax = [a.clone().to(device) for a in absmax0]
        step_fp8(algorithm, params, grads, codes, absmax, [torch.tensor(1.0)], list(hyper.values()),
                 None, None, None, None)
        results.append([t.cpu() for t in params + codes + absmax])
    for got, want in zip(*results):
        assert torch.equal(got.isnan(), want.isnan())
        if FMA_ROUNDS_ONCE:
            assert torch.equal(_bits(got.nan_to_num()), _bits(want.nan_to_num()))
        elif got.dtype == torch.uint8:
            steps = _code_steps(got, want)
            assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) <= 0.01
        else:
            torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-6)
    assert torch.isnan(results[1][1 + states][[1, 2, 3, 5, 8]]).all()
    if states == 2:
        assert torch.isnan(results[1][2 + states][[6, 7]]).all()


@triton.jit
def _encode_kernel(x, factor, out, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, fp8.fp8_encode(tl.load(x + offs), tl.load(factor)).to(tl.uint8))


@triton.jit
def _decode_kernel(codes, factor, out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out + offs, fp8.fp8_decode(tl.load(codes + offs), tl.load(factor)))


def test_encoder_over_every_exponent():
    """fp8_encode (factor 1) of every float32 sign, exponent and top 7 mantissa bits
    (random low bits), and of every E4M3 tie, against torch's RNE conversion of
    the value clamped to ±448."""
    gen = torch.Generator().manual_seed(7)
    high = torch.arange(2**16, dtype=torch.int64) << 16
    bits = high | torch.randint(0, 2**16, (2**16,), generator=gen)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    ties = (_e4m3_values()[:-1] + _e4m3_values()[1:]) / 2
    x = torch.cat([x[torch.isfinite(x)], ties, -ties])
    x = torch.cat([x, torch.zeros(-len(x) % 1024)])
    out = torch.empty(len(x), dtype=torch.uint8, device=DEVICE)
    _encode_kernel[(len(x) // 1024,)](x.to(DEVICE), torch.ones(1, device=DEVICE), out, BLOCK=1024)
    expected = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("absmax", [3.5, 448.0, 2.0**-96, 0.0, float("nan")])
def test_decoder_over_every_code(absmax):
    """fp8_decode of every code at factor absmax/448, against fp8_states.decode: the
    same bits (−0 included), NaN where it has NaN (the two NaN codes 0x7f and 0xff,
    never encoded, and a NaN absmax: a NaN's payload is the hardware's, 0x7fffffff
    on NVIDIA GPUs, 0x7fc00000 on x86; the stored absmax is written as 0x7fc00000
    by store_fp8 whatever the decoded values' bits)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    factor = torch.tensor([absmax]).div(448.0)
    out = torch.empty(256, device=DEVICE)
    _decode_kernel[(1,)](codes.to(DEVICE), factor.to(DEVICE), out, BLOCK=256)
    expected = fp8_states.decode(codes, torch.tensor([absmax]), root=False)
    got = out.cpu()
    assert torch.equal(got.isnan(), expected.isnan())
    assert got[[0x7F, 0xFF]].isnan().all()
    number = ~expected.isnan()
    assert torch.equal(got[number].view(torch.int32), expected[number].view(torch.int32))


# ---------------------------------------------------------------------------
# The op: found_inf, bad inputs and failed launches write nothing
# ---------------------------------------------------------------------------

def _op_bucket(device=DEVICE):
    params = [torch.randn(300, device=device), torch.randn(20, 30, device=device)]
    grads = [torch.randn_like(p) for p in params]
    codes = [torch.randint(0, 120, p.shape, dtype=torch.uint8, device=device) for _ in range(2) for p in params]
    absmax = [torch.rand(fp8_states.num_blocks(p.numel()), device=device) for _ in range(2) for p in params]
    return params, grads, codes, absmax, [torch.tensor(3.0) for _ in params]


def _kept(*lists):
    return [t.clone() for tensors in lists for t in tensors]


def _assert_kept(kept, *lists):
    for old, new in zip(kept, [t for tensors in lists for t in tensors]):
        assert torch.equal(_bits(old), _bits(new))


def _bad_codes(codes):
    codes[3] = codes[3].to(torch.int8)


def _bad_layout(codes):
    codes[3] = codes[3].t().contiguous().t()


def _bad_absmax(absmax):
    absmax[2] = absmax[2][:-1]


@pytest.mark.parametrize("spoil, which, message", [(_bad_codes, "codes", "exp_avg_sq codes\\[1\\]"),
                                                   (_bad_layout, "codes", "exp_avg_sq codes\\[1\\]"),
                                                   (_bad_absmax, "absmax", "exp_avg_sq absmax\\[0\\]")],
                         ids=["dtype", "strides", "absmax"])
def test_bad_fp8_states_raise_before_any_write(spoil, which, message, launches):
    params, grads, codes, absmax, steps = _op_bucket()
    spoil(codes if which == "codes" else absmax)
    kept = _kept(params, codes, absmax, steps)
    table = new_table(len(params), DEVICE)
    with pytest.raises(ValueError, match=message):
        ops.step_fp8("adam", params, grads, codes, absmax, steps, list(ADAM_HYPER.values()), None, None, table)
    _assert_kept(kept, params, codes, absmax, steps)
    assert launches == []


def test_found_inf_skips_everything():
    params, grads, codes, absmax, steps = _op_bucket()
    kept = _kept(params, codes, absmax, steps)
    table = torch.ones(len(params), 2, dtype=torch.float64, device=DEVICE)
    ops.step_fp8("adam", params, grads, codes, absmax, steps, list(ADAM_HYPER.values()),
                 torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE), table)
    _assert_kept(kept, params, codes, absmax, steps)
    assert table[:, 0].eq(1).all() and table[:, 1].eq(0).all()


def test_a_failed_launch_leaves_the_step_counters(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(fp8, "launch_fp8", fail)
    params, grads, codes, absmax, steps = _op_bucket()
    with pytest.raises(RuntimeError, match="launch failed"):
        ops.step_fp8("lion", params, grads, codes[:2], absmax[:2], steps, list(LION_HYPER.values()))
    assert [float(s) for s in steps] == [3.0, 3.0]


# ---------------------------------------------------------------------------
# Which backend steps an FP8 bucket
# ---------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    """FP8 buckets are stepped by every fused backend: backend=None picks 'cuda' on a
    CUDA device (then 'triton' when the CUDA kernels are missing), 'cpu' on the CPU;
    backend='triton' is accepted by the 8-bit optimizers."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "_why_unavailable", lambda name: None)
    assert backends.backend_for(None, "adam", cuda, "AdamW8bit") == "cuda"
    assert backends.backend_for(None, "adam", CPU, "AdamW8bit") == "cpu"
    monkeypatch.setattr(backends, "_why_unavailable", lambda name: None if name != "cuda" else "no CUDA kernels")
    assert backends.backend_for(None, "lion", cuda, "Lion8bit") == "triton"
    monkeypatch.undo()
    p = torch.nn.Parameter(torch.zeros(4096, device=DEVICE))
    af.Lion8bit([p], backend="triton")
