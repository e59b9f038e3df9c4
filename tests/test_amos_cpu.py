"""Amos: the fused C++ CPU kernel (``backend='cpu'``) against the eager
reference (``backend='reference'``) on both CPU instruction-set paths, the param-group
helper ``amos_param_groups`` (the table in amos_fused/amos_helpers.py), checkpoints,
optimizer-state memory, and bad input.

The reference itself is checked against an independent implementation and against
pytorch_optimizer.Amos in test_amos_reference.py; here it is the ground truth.

Tolerances.  Every state tensor and every param is compared with
``rtol`` plus an absolute floor of ``atol × max|reference tensor|`` (the floor is
relative to the tensor's own scale, because v ≈ (1−β)·g² lives around 1e-3 while
params are O(1): one absolute atol for both would either be meaningless for v or
too strict for params).  ``step`` must be equal.

* float64: rtol=1e-10, atol=1e-12.  Both sides compute in double; they differ only
  in operation order (the kernel folds the slot math into Δ = w·θ − a·g, sums g² in
  blocks, and the AVX2 path contracts multiply-adds into FMAs): a few ULP per step.
  Measured over 12 steps: <= 9e-16 absolute on params of magnitude <= 4.
* float32: rtol=1e-5, atol=1e-6.  The kernel computes its per-step scalars in
  double and rounds them once to float, the reference multiplies float32 tensors by
  Python scalars in another order; each step adds a few float32 ULP (6e-8 relative)
  of disagreement, r = (1−β^t)/v amplifies relative errors of v by at most 1 and
  sqrt(r) by 1/2, and 10–12 steps accumulate them: measured <= 4e-7 absolute on
  params of magnitude <= 4 (1e-7 relative), so 1e-5 leaves ~100x headroom while
  still catching any formula slip (those show up at >= 1e-3).
* bfloat16: rtol=2e-2, atol=1e-2.  Both sides compute in float32 and round each
  stored value (θ, v, b, mu) to bf16 every step.  A one-ULP float32 difference can
  flip one bf16 rounding (a bf16 ULP is 2^-8..2^-7 relative, <= 7.8e-3); a flipped
  v or b moves later updates only by ~lr·η·2^-7, below a param ULP, so stored values
  stay within ~2 ULP: rtol 2e-2 ~ 2.5 ULP.  Measured: 1 ULP at most.
* float16: rtol=2e-3, atol=2e-3: the same argument with fp16's ULP 2^-10 ≈ 9.8e-4.
  Measured: 1 ULP (4.9e-4 on params of magnitude 0.5..1).
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import amos_fused as af
from conftest import (
    with_threads,
    assert_moved,
    assert_unchanged,
    clone_params,
    make_grads,
    make_params,
    run_pair,
    set_grads,
    snapshot,
)

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
STEPS = 12

# reduce_axes -> shapes it is valid for: odd sizes, size-1 dims, 0-dim, 0 elements.
REDUCE_CASES = {
    "elementwise": (None, [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (2, 3, 5)]),
    "all": ("all", [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (2, 3, 5)]),
    # trailing axis: contiguous rows, the one-pass row path; (3,1,7) reduces a size-1 dim
    "rows": ((1,), [(37, 5), (4, 16), (3, 1, 7), (0, 5), (5, 0), (1, 33), (33, 1)]),
    "last": ((-1,), [(37, 5), (4, 16), (2, 3, 9), (6, 1), (1, 1)]),
    # non-trailing: the two-pass general path ((9,1) and (1,9) degenerate to rows / elementwise)
    "dim0": ((0,), [(37, 5), (4, 16), (1, 9), (9, 1), (0, 5), (6, 0)]),
    "outer_and_inner": ((0, 2), [(3, 4, 5), (2, 1, 7), (5, 3, 17), (4, 6, 1), (0, 3, 4)]),
    "trailing_two": ((1, 2), [(3, 4, 5), (6, 7, 11), (2, 1, 7), (1, 3, 3), (5, 0, 2)]),
}

CONFIGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "clip": dict(clip_value=0.5),
    "extra_l2": dict(extra_l2=0.01),
    "everything": dict(momentum=0.8, clip_value=0.7, extra_l2=0.02, beta=0.99, d_coef=0.5, c_coef=0.3),
}

LR = 0.3  # large enough that b reaches ~0.3 within the run: c and d differ from 1 by a few %,
          # so using the updated b where the old one is due would show at float32 precision


pytestmark = pytest.mark.usefixtures("one_thread_outside_the_kernels")


def _amos(params, backend, **kwargs):
    opt = af.Amos(params, backend=backend, **kwargs)
    return with_threads(opt) if backend == "cpu" else opt


def _amos_factory(backend, reduce_axes, config):
    return lambda groups: _amos(groups, backend, lr=LR, reduce_axes=reduce_axes, **config)


def _decay_lr(step, opt_a, opt_b):
    """An lr schedule: both optimizers get the same new lr before every step but the first."""
    if step == 0:
        return
    for opt in (opt_a, opt_b):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.85


def assert_close_scaled(actual, expected, rtol, atol, what):
    """|a − e| <= atol·max|e| + rtol·|e|, elementwise; same dtype and shape."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_amos_run_close(run, dtype, momentum):
    tol = TOL[dtype]
    for i, (pa, pb) in enumerate(zip(run.params_a, run.params_b)):
        assert_close_scaled(pa, pb, what=f"param {i}", **tol)
    expected_keys = {"step", "v", "b"} | ({"mu"} if momentum else set())
    for i, (sa, sb, p) in enumerate(zip(run.states_a(), run.states_b(), run.params_b)):
        assert set(sa) == set(sb) == expected_keys, f"param {i}: keys {sorted(sa)} / {sorted(sb)}"
        assert float(sa["step"]) == float(sb["step"]), f"param {i}: step {float(sa['step'])} != {float(sb['step'])}"
        for key in sorted(expected_keys - {"step"}):
            assert_close_scaled(sa[key], sb[key], what=f"param {i} state {key!r}", **tol)


def _run(reduce_axes, shapes, dtype, config, steps=STEPS, split=None):
    n = len(shapes)
    return run_pair(
        _amos_factory("cpu", reduce_axes, config),
        _amos_factory("reference", reduce_axes, config),
        dtype=dtype,
        steps=steps,
        shapes=shapes,
        # group 0: η inferred per tensor (eta=None); group 1: its own lr and a float η
        second_group={"lr": 0.1, "eta": 0.7},
        split=n // 2 if split is None else split,
        # a grad missing on the first step (late state) and one missing later (lagging step)
        none_grads={0: (n - 1,), 5: (0,)},
        before_step=_decay_lr,
    )


# ---------------------------------------------------------------------------
# cpu vs reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(REDUCE_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_matches_reference(case, config, dtype, capabilities):
    reduce_axes, shapes = REDUCE_CASES[case]
    run = _run(reduce_axes, shapes, dtype, CONFIGS[config])
    assert_moved(run)
    assert_amos_run_close(run, dtype, "momentum" in CONFIGS[config])
    # the missing grads really left their marks: late state / lagging step counter
    steps = [float(s["step"]) for s in run.states_a()]
    assert steps[0] == STEPS - 1 and steps[-1] == STEPS - 1 and all(s == STEPS for s in steps[1:-1])


@pytest.mark.parametrize("case", list(REDUCE_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cpu_matches_reference_low_precision(case, dtype, capabilities):
    reduce_axes, shapes = REDUCE_CASES[case]
    config = CONFIGS["everything"]
    run = _run(reduce_axes, shapes, dtype, config)
    assert_moved(run)
    assert_amos_run_close(run, dtype, True)


# Rows longer than the SIMD tile and the parallel grain (32768 elements), many short
# rows, and a bucket whose rows straddle the per-thread chunk boundaries at odd offsets.
BIG_CASES = {
    "wide_rows": ((1,), [(3, 50_000)]),
    "many_rows": ((1,), [(40_000, 3)]),
    "mixed_rows_bucket": ((1,), [(5, 11), (3, 50_000), (40_000, 3), (33, 1)]),
    "general_many_slots": ((0,), [(40_000, 3), (3, 20_001)]),
    "scalar_slot_big": ("all", [(7,), (100_003,)]),
}


@pytest.mark.parametrize("case", list(BIG_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_big_tensors_match_reference(case, dtype, capabilities):
    reduce_axes, shapes = BIG_CASES[case]
    config = CONFIGS["everything"]
    run = run_pair(
        _amos_factory("cpu", reduce_axes, config),
        _amos_factory("reference", reduce_axes, config),
        dtype=dtype, steps=10, shapes=shapes, split=len(shapes),
        none_grads={}, before_step=_decay_lr,
    )
    assert_moved(run)
    assert_amos_run_close(run, dtype, True)


def test_cpu_bitwise_deterministic(capabilities):
    """Two identical runs of the cpu backend (rows spread over threads) agree bitwise."""
    reduce_axes, shapes = BIG_CASES["mixed_rows_bucket"]
    make = _amos_factory("cpu", reduce_axes, CONFIGS["everything"])
    run = run_pair(make, make, dtype=torch.float32, steps=4, shapes=shapes, split=len(shapes),
                   none_grads={}, before_step=_decay_lr)
    for pa, pb in zip(run.params_a, run.params_b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(run.states_a(), run.states_b()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------
# amos_param_groups
# ---------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.block = _Block()
        self.conv = nn.Conv2d(3, 6, 3)
        self.gconv = nn.Conv2d(4, 8, (3, 5), groups=2, bias=False)
        self.conv1d = nn.Conv1d(3, 4, 5, bias=False)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: must appear once
        self.gain = nn.Parameter(torch.full((5,), 2.0))  # bare vector: η = its RMS
        self.offset = nn.Parameter(torch.zeros(4))  # bare zero vector: η = 0.5
        self.table = nn.Parameter(torch.randn(4, 6))  # bare matrix: sqrt(1/prod(shape[1:]))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


# name -> (η, reduce_axes, slot shape), by the table in amos_fused/amos_helpers.py
EXPECTED = {
    "emb.weight": (math.sqrt(1 / 8), (1,), (50, 1)),
    "block.fc.weight": (math.sqrt(1 / 16), (1,), (32, 1)),
    "block.fc.bias": (0.5, "all", ()),
    "block.ln.weight": (1.0, "all", ()),
    "block.ln.bias": (0.5, "all", ()),
    "conv.weight": (math.sqrt(1 / 27), (1, 2, 3), (6, 1, 1, 1)),
    "conv.bias": (0.5, "all", ()),
    "gconv.weight": (math.sqrt(1 / 30), (1, 2, 3), (8, 1, 1, 1)),  # in/groups · kh · kw = 2·3·5
    "conv1d.weight": (math.sqrt(1 / 15), (1, 2), (4, 1, 1)),
    "gain": (2.0, "all", ()),
    "offset": (0.5, "all", ()),
    "table": (math.sqrt(1 / 6), (1,), (4, 1)),
}


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return _Model().to(dtype)


def _by_name(groups):
    """name -> (η, reduce_axes, param, group) over all groups."""
    out = {}
    for group in groups:
        assert len(group["params"]) == len(group["param_names"]) == len(group["eta"])
        for name, param, eta in zip(group["param_names"], group["params"], group["eta"]):
            assert name not in out, f"{name} is in two groups"
            out[name] = (eta, group["reduce_axes"], param, group)
    return out


def _set_named_grads(model, step, seed=0):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = make_grads([p for _, p in named], step, seed)
    for (_, p), g in zip(named, grads):
        p.grad = g


def test_param_groups_follow_the_table():
    model = _model()
    groups = af.amos_param_groups(model, lr=0.02, momentum=0.9)
    found = _by_name(groups)
    assert set(found) == set(EXPECTED)  # tied weight once, frozen param left out
    for name, (eta, axes, _slot) in EXPECTED.items():
        got_eta, got_axes, param, _ = found[name]
        assert got_eta == eta, f"{name}: eta {got_eta} != {eta}"
        assert got_axes == axes, f"{name}: reduce_axes {got_axes} != {axes}"
        assert param is dict(model.named_parameters())[name]
    # one group per distinct reduce_axes, each carrying the lr and the group options
    assert sorted(map(str, (g["reduce_axes"] for g in groups))) == sorted({str(a) for _, a, _ in EXPECTED.values()})
    for group in groups:
        assert group["lr"] == 0.02 and group["momentum"] == 0.9
        assert isinstance(group["eta"], tuple)

    # the slots Amos creates have the table's shapes (and mu is full-size)
    opt = _amos(groups, "cpu", lr=0.02)
    _set_named_grads(model, 0)
    opt.step()
    for name, (_eta, _axes, slot) in EXPECTED.items():
        param = found[name][2]
        state = opt.state[param]
        assert tuple(state["v"].shape) == slot and tuple(state["b"].shape) == slot, name
        assert state["mu"].shape == param.shape, name


def test_param_groups_overrides():
    model = _model()
    groups = af.amos_param_groups(
        model, lr=0.01,
        overrides={
            "block.*.weight": {"eta": 0.3},
            "block.fc.weight": {"eta": 0.2, "reduce_axes": None},  # later pattern wins
            "emb.weight": {"reduce_axes": "all"},
            "*bias": {"eta": 0.1},
            "table": {"reduce_axes": (-1,)},  # normalized to (1,)
            "no.such.param": {"eta": 9.0},  # matches nothing: harmless
        },
    )
    found = _by_name(groups)
    assert found["block.fc.weight"][:2] == (0.2, None)
    assert found["block.ln.weight"][:2] == (0.3, "all")
    assert found["emb.weight"][:2] == (math.sqrt(1 / 8), "all")
    for name in ("block.fc.bias", "block.ln.bias", "conv.bias"):
        assert found[name][:2] == (0.1, "all"), name
    assert found["table"][:2] == (math.sqrt(1 / 6), (1,))
    assert found["conv.weight"][:2] == (math.sqrt(1 / 27), (1, 2, 3))  # untouched
    # the overridden slots are what Amos creates
    opt = af.Amos(groups, lr=0.01, backend="reference")
    _set_named_grads(model, 0)
    opt.step()
    fc = model.block.fc.weight
    assert opt.state[fc]["v"].shape == fc.shape
    assert opt.state[model.emb.weight]["v"].shape == ()


@pytest.mark.parametrize("override", [
    {"eta": 0.1, "lr": 0.5},
    {"reduce_axis": (1,)},
    {"weight_decay": 0.0},
])
def test_param_groups_unknown_override_key(override):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown"):
        af.amos_param_groups(model, lr=0.01, overrides={"block.fc.weight": override})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("override", [{"eta": 0.0}, {"eta": -1.0}, {"reduce_axes": (2,)}, {"reduce_axes": "rows"}])
def test_param_groups_bad_override_value(override):
    with pytest.raises(ValueError):
        af.amos_param_groups(_model(), lr=0.01, overrides={"block.fc.weight": override})


def _state_equal(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_param_groups_both_backends_agree(capabilities):
    model_cpu, model_ref = _model(), _model()
    opts = {}
    for backend, model in (("cpu", model_cpu), ("reference", model_ref)):
        groups = af.amos_param_groups(model, lr=0.05, momentum=0.9, clip_value=1.0)
        opts[backend] = _amos(groups, backend, lr=0.05)
    initial = [p.detach().clone() for p in model_cpu.parameters()]
    for step in range(10):
        for backend, model in (("cpu", model_cpu), ("reference", model_ref)):
            if step == 6:
                for group in opts[backend].param_groups:
                    group["lr"] = 0.02
            _set_named_grads(model, step)
            opts[backend].step()
    tol = TOL[torch.float64]
    named_ref = dict(model_ref.named_parameters())
    moved = 0
    for (name, pc), p0 in zip(model_cpu.named_parameters(), initial):
        pr = named_ref[name]
        assert_close_scaled(pc, pr, what=name, **tol)
        if not pc.requires_grad:
            continue
        moved += int(not torch.equal(pc.detach(), p0))
        sc, sr = opts["cpu"].state[pc], opts["reference"].state[pr]
        assert set(sc) == set(sr) == {"step", "v", "b", "mu"}
        assert float(sc["step"]) == float(sr["step"]) == 10.0
        for key in ("v", "b", "mu"):
            assert_close_scaled(sc[key], sr[key], what=f"{name} {key}", **tol)
    assert moved == len(initial) - 1  # every param but the frozen one


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_param_groups_state_dict_roundtrip(backend):
    model = _model()
    opt = _amos(af.amos_param_groups(model, lr=0.05, momentum=0.9), backend, lr=0.05)
    for step in range(4):
        _set_named_grads(model, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    twin = copy.deepcopy(model)  # the same (trained) weights, fresh optimizer built the same way
    twin_opt = _amos(af.amos_param_groups(twin, lr=0.05, momentum=0.9), backend, lr=0.05)
    # built from the trained weights, the bare vector's inferred η differs ...
    assert _by_name(twin_opt.param_groups)["gain"][0] != 2.0
    twin_opt.load_state_dict(saved)
    # ... and the checkpoint restores every group's η (and reduce_axes)
    for ga, gb in zip(opt.param_groups, twin_opt.param_groups):
        assert ga["eta"] == gb["eta"] and ga["reduce_axes"] == gb["reduce_axes"]
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    _state_equal(opt, params, twin_opt, twin_params)
    for step in range(4, 10):
        for m, o in ((model, opt), (twin, twin_opt)):
            _set_named_grads(m, step)
            o.step()
    _state_equal(opt, params, twin_opt, twin_params)
    assert float(twin_opt.state[twin.emb.weight]["step"]) == 10.0
    # the loaded state is a copy: stepping the twin never touched the original's tensors
    assert all(
        twin_opt.state[tp]["v"].data_ptr() != opt.state[p]["v"].data_ptr()
        for p, tp in zip(params, twin_params)
    )


# ---------------------------------------------------------------------------
# Optimizer-state memory
# ---------------------------------------------------------------------------

class _TransformerBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class _TinyTransformer(nn.Module):
    def __init__(self, vocab=512, context=64, d=128, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_TransformerBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _state_bytes(opt):
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _step_once(opt, model):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
    opt.step()


@pytest.mark.parametrize("momentum,limit", [(None, 0.02), (0.9, 0.51)])
def test_state_bytes_vs_adamw(momentum, limit):
    """AdamW keeps 2 full-size tensors; Amos keeps 2 slots per tensor, (out, 1) for
    the matrices, i.e. a fraction ~1/in of them (1/128 here), plus a full-size mu
    with momentum: 1/2 + ~1/256 of AdamW's bytes."""
    torch.manual_seed(0)
    model = _TinyTransformer()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    _step_once(adamw, model)
    adamw_bytes = _state_bytes(adamw)
    numel = sum(p.numel() for p in model.parameters())
    assert adamw_bytes == 2 * 4 * numel

    torch.manual_seed(0)
    model = _TinyTransformer()
    groups = af.amos_param_groups(model, lr=0.01, momentum=momentum)
    amos = _amos(groups, "cpu", lr=0.01)
    _step_once(amos, model)
    amos_bytes = _state_bytes(amos)
    # exactly the table's slots: (out, 1) for Linear/Embedding weights, scalars for
    # biases and LayerNorm, plus a full-size mu with momentum
    expected = 0
    for p in model.parameters():
        slot = p.shape[0] if p.dim() == 2 else 1
        expected += 4 * (2 * slot + (p.numel() if momentum is not None else 0))
    assert amos_bytes == expected
    assert amos_bytes <= limit * adamw_bytes, f"Amos state is {amos_bytes / adamw_bytes:.2%} of AdamW's"


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def _bad_input_params():
    return [p.requires_grad_(True) for p in make_params(torch.float32, 3, [(4, 3), (3,)])]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kwargs", [
    dict(eta=0.0), dict(eta=-1.0), dict(eta=(0.5, 0.0)), dict(eta=(0.5, -2.0)),
    dict(reduce_axes=(2,)), dict(reduce_axes=(-3,)), dict(reduce_axes=(1, 1)),
    dict(reduce_axes=(0, -2)), dict(reduce_axes="rows"), dict(reduce_axes="ALL"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_input_raises_at_construction(kwargs, backend):
    params = _bad_input_params()
    if "reduce_axes" in kwargs:
        params = params[:1]  # a 2-D param: only the bad value itself is at fault
    for i, p in enumerate(params):
        p.grad = torch.ones_like(p) * (i + 1)
    before = [p.detach().clone() for p in params]
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        af.Amos(params, lr=0.01, backend=backend, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("group", [
    dict(eta=0.0), dict(eta=(0.5, 0.5)),  # eta: a bad value; a tuple of the wrong length
    dict(reduce_axes=(1,)),  # out of range for the 1-D param of the new group
    dict(reduce_axes="rows"),
])
def test_bad_param_group_leaves_the_optimizer_as_it_was(group, backend):
    """add_param_group with a bad value raises, writes nothing, and leaves an
    optimizer that steps exactly like one that never saw the bad group."""
    params = _bad_input_params()
    twin = clone_params(params)
    opts = [_amos([ps[0]], backend, lr=0.1, reduce_axes=(1,), momentum=0.9) for ps in (params, twin)]
    for ps, opt in zip((params, twin), opts):
        set_grads(ps, make_grads(ps, 0))
        opt.step()
    before = snapshot(opts[0], params)
    with pytest.raises(ValueError):
        opts[0].add_param_group({"params": [params[1]], "reduce_axes": "all", **group})
    assert_unchanged(before, opts[0], params)
    groups = len(opts[0].param_groups)
    assert groups == 1, f"the rejected group was kept: {groups} param groups"
    assert params[1] not in opts[0].state
    for ps, opt in zip((params, twin), opts):
        set_grads(ps, make_grads(ps, 1))
        opt.step()
    assert torch.equal(params[0], twin[0])
