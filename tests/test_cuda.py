"""The CUDA kernels (``backend='cuda'``, csrc/cuda/) on CUDA tensors: against the
eager reference (``backend='reference'``, same tensors, same device) for every
algorithm and Amos slot layout, against torch.optim.AdamW / Adam (fused=True),
on buckets of hundreds of tensors, on a tensor of more than 2^31 elements, with
torch.amp.GradScaler, and through the cached device tables (new grad addresses,
replaced params, another stream).  Skipped without a GPU or a CUDA build.

Tolerances (10 steps, two groups, an lr schedule for Amos, missing grads on some
steps).  Params and state tensors are compared with ``rtol`` plus an absolute
floor of ``atol × max|reference tensor|`` (v ≈ (1−β)·g² is ~1e-3 while params are
O(1)); ``step`` must be equal.

* float64: rtol=1e-10, atol=1e-12.  Double on both sides; only the order of
  operations differs (FMA contraction, η/bc1 folded into one scalar, block sums).
* float32: rtol=1e-5, atol=1e-6.  The kernels compute per-step scalars in double
  and round them once; sums of g² (Amos) and of u², θ² (LAMB, scale-aware Adam)
  are tree-ordered.  A few ULP (6e-8 relative) per step.
* bfloat16: rtol=2e-2, atol=1e-2; float16: rtol=atol=2e-3.  Both sides compute in
  float32 and round every stored value each step; a one-ULP float32 difference
  can flip one rounding (<= 2 storage ULP after a few steps).
"""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from conftest import (
    SHAPES,
    PairRun,
    assert_moved,
    assert_unchanged,
    clone_params,
    make_grads,
    make_params,
    param_groups,
    set_grads,
    snapshot,
)


def _why_skipped():
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if "cuda" not in af.available_backends():
        return "amos_fused was built without its CUDA kernels ('cuda' not in available_backends())"
    return None


_SKIP_REASON = _why_skipped()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "CUDA is available"),
]

DEVICE = "cuda"
STEPS = 10
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def cuda_params(dtype, shapes, seed=0):
    """make_params on the GPU (drawn on the CPU, so every dtype sees the same values)."""
    return [p.detach().to(DEVICE).requires_grad_(True) for p in make_params(dtype, seed, shapes)]


def cuda_grads(params, step, seed=0, scale=1.0):
    return [g.to(DEVICE) for g in make_grads([p.detach().cpu() for p in params], step, seed, scale)]


def run_cuda_pair(make_a, make_b, *, dtype, shapes=SHAPES, steps=STEPS, seed=0, split=None,
                  second_group=None, none_grads=None, before_step=None):
    """conftest.run_pair on CUDA tensors: two optimizers over identical copies of a
    param set, fed identical grads (None for the indices in none_grads[step])."""
    base = cuda_params(dtype, shapes, seed)
    split = len(base) // 2 if split is None else split
    none_grads = {0: (len(base) - 1,), 5: (0,)} if none_grads is None else none_grads
    params_a, params_b = clone_params(base), clone_params(base)
    opt_a = make_a(param_groups(params_a, second_group or {"lr": 3e-3}, split))
    opt_b = make_b(param_groups(params_b, second_group or {"lr": 3e-3}, split))
    for step in range(steps):
        grads = cuda_grads(base, step, seed)
        if before_step is not None:
            before_step(step, opt_a, opt_b)
        set_grads(params_a, grads, none_grads.get(step, ()))
        set_grads(params_b, grads, none_grads.get(step, ()))
        opt_a.step()
        opt_b.step()
    return PairRun(params_a, opt_a, params_b, opt_b, clone_params(base))


def assert_close_scaled(actual, expected, rtol, atol, what):
    """|a − e| <= atol·max|e| + rtol·|e| elementwise; same dtype, shape and device."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def assert_runs_close(run, tol):
    for i, (pa, pb) in enumerate(zip(run.params_a, run.params_b)):
        assert_close_scaled(pa, pb, what=f"param {i}", **tol)
    for i, (sa, sb) in enumerate(zip(run.states_a(), run.states_b())):
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sorted(sa):
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"param {i}: step {float(sa[key])} != {float(sb[key])}"
                assert sa[key].device.type == "cpu" and sa[key].dtype == torch.float32
            else:
                assert_close_scaled(sa[key], sb[key], what=f"param {i} state {key!r}", **tol)


def _decay_lr(step, opt_a, opt_b):
    """An lr schedule: new lr before every step but the first (coefficients change)."""
    if step == 0:
        return
    for opt in (opt_a, opt_b):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.85


# ---------------------------------------------------------------------------
# every elementwise and norm-scaled algorithm against the reference
# ---------------------------------------------------------------------------

ALGORITHMS = {
    "adamw": (af.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamw-amsgrad": (af.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adamw-no_bias_correction": (af.AdamW, dict(lr=1e-2, weight_decay=0.1, bias_correction=False)),
    "adam-l2": (af.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    "adam-l2-amsgrad": (af.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adam-no_decay": (af.Adam, dict(lr=1e-2)),
    "radam-l2": (af.RAdam, dict(lr=1e-2, weight_decay=0.1)),
    "radam-decoupled": (af.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    # ρ_t > 4 from t = 5 on: both branches within 10 steps
    "radam-threshold4": (af.RAdam, dict(lr=1e-2, weight_decay=0.1, rectify_threshold=4.0)),
    "lion": (af.Lion, dict(lr=1e-2, betas=(0.9, 0.99))),
    "lion-wd": (af.Lion, dict(lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)),
    "scaled_adamw": (af.ScaledAdamW, dict(lr=0.05, p=2.0, decay="inverse_square")),
    "scaled_adamw-time-q": (af.ScaledAdamW, dict(lr=0.05, half_life=4, decay="inverse_time", q=0.5)),
    "lamb": (af.Lamb, dict(lr=1e-2, weight_decay=0.1)),
    "lamb-no_bias_correction": (af.Lamb, dict(lr=1e-2, bias_correction=False, betas=(0.8, 0.9),
                                              weight_decay=0.01)),
}

# SHAPES plus tensors of several chunks (65537 > 65536) and odd row lengths.
ELEMENTWISE_SHAPES = SHAPES + [(65537,), (3, 9000), (1,)]


def _factory(name, backend):
    cls, kwargs = ALGORITHMS[name]
    return lambda groups: cls(groups, backend=backend, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_cuda_matches_reference(name, dtype):
    run = run_cuda_pair(_factory(name, "cuda"), _factory(name, "reference"), dtype=dtype,
                        shapes=ELEMENTWISE_SHAPES)
    assert_moved(run)
    assert_runs_close(run, TOL[dtype])
    for p, state in zip(run.params_a, run.states_a()):
        assert all(v.dtype == p.dtype and v.device == p.device for k, v in state.items() if k != "step")


@pytest.mark.parametrize("name", ["adamw-amsgrad", "radam-l2", "lion-wd", "scaled_adamw", "lamb"])
def test_cuda_matches_reference_float16(name):
    run = run_cuda_pair(_factory(name, "cuda"), _factory(name, "reference"), dtype=torch.float16,
                        shapes=ELEMENTWISE_SHAPES)
    assert_moved(run)
    assert_runs_close(run, TOL[torch.float16])


# ---------------------------------------------------------------------------
# Amos: every slot layout and kernel path
# ---------------------------------------------------------------------------

AMOS_LR = 0.3  # b reaches ~0.3 within the run: using a wrong (old/new) b shows at float32 precision

# reduce_axes -> shapes.  Paths (float32/bfloat16/float16; float64 halves the lengths):
# rows of <= 512 elements: a warp per row; <= 4096: a block per row; longer: two
# phases.  Non-trailing reduced axes: two phases with per-(slot, piece) sums.
AMOS_LAYOUTS = {
    "elementwise": (None, [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (65537,)]),
    "all": ("all", [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (64, 130), (3, 9000)]),
    "rows": ((1,), [(37, 5), (4, 16), (3, 1, 7), (0, 5), (1, 33), (33, 1), (50, 1000),
                    (20, 3000), (3, 9000), (7, 5003)]),
    "dim0": ((0,), [(37, 5), (4, 16), (1, 9), (9, 1), (0, 5), (300, 7), (1000, 3)]),
    "middle": ((1,), [(2, 6, 5), (3, 4, 8), (4, 1, 3), (3, 700, 2)]),
    "outer_and_inner": ((0, 2), [(3, 4, 5), (5, 3, 17), (0, 3, 4), (40, 2, 9)]),
}
AMOS_CONFIGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "clip": dict(clip_value=0.5),
    "everything": dict(momentum=0.8, clip_value=0.7, extra_l2=0.02, beta=0.99, d_coef=0.5, c_coef=0.3),
}


def _amos_factory(backend, reduce_axes, config):
    return lambda groups: af.Amos(groups, lr=AMOS_LR, reduce_axes=reduce_axes, backend=backend, **config)


def _amos_run(layout, config, dtype, **kwargs):
    reduce_axes, shapes = AMOS_LAYOUTS[layout]
    return run_cuda_pair(
        _amos_factory("cuda", reduce_axes, AMOS_CONFIGS[config]),
        _amos_factory("reference", reduce_axes, AMOS_CONFIGS[config]),
        dtype=dtype, shapes=shapes,
        # group 0: η inferred per tensor; group 1: its own lr and one η
        second_group={"lr": 0.1, "eta": 0.7},
        before_step=_decay_lr, **kwargs,
    )


@pytest.mark.parametrize("config", list(AMOS_CONFIGS))
@pytest.mark.parametrize("layout", list(AMOS_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_amos_matches_reference(layout, config, dtype):
    run = _amos_run(layout, config, dtype)
    assert_moved(run)
    assert_runs_close(run, TOL[dtype])
    keys = {"step", "v", "b"} | ({"mu"} if "momentum" in AMOS_CONFIGS[config] else set())
    for state in run.states_a():
        assert set(state) == keys


@pytest.mark.parametrize("layout", list(AMOS_LAYOUTS))
def test_amos_matches_reference_float16(layout):
    run = _amos_run(layout, "everything", torch.float16)
    assert_moved(run)
    assert_runs_close(run, TOL[torch.float16])


def test_amos_param_groups_of_a_model():
    """amos_param_groups on a small transformer-like model: Linear rows, Embedding
    rows, norm scalars and biases in one optimizer."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Embedding(300, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 384),
            torch.nn.GELU(), torch.nn.Linear(384, 96), torch.nn.Conv1d(96, 32, 3),
        ).to(DEVICE)

    models = [model(), model()]
    opts = [af.Amos(af.amos_param_groups(m, lr=0.05, momentum=0.9), lr=0.05, backend=backend)
            for m, backend in zip(models, ("cuda", "reference"))]
    for step in range(6):
        for m, opt in zip(models, opts):
            gen = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert_close_scaled(a, b, what=name, **TOL[torch.float32])


# ---------------------------------------------------------------------------
# against torch.optim's fused CUDA kernels
# ---------------------------------------------------------------------------

_TORCH_PAIRS = {
    "adamw": (lambda g: af.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cuda"),
              lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1, fused=True)),
    "adamw-amsgrad": (lambda g: af.AdamW(g, lr=1e-2, amsgrad=True, backend="cuda"),
                      lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True, fused=True)),
    "adam-l2": (lambda g: af.Adam(g, lr=1e-2, weight_decay=0.1, backend="cuda"),
                lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1, fused=True)),
    "radam": (lambda g: af.RAdam(g, lr=1e-2, weight_decay=0.1, backend="cuda"),
              lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=0.1, foreach=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(_TORCH_PAIRS))
def test_cuda_matches_torch_optim(name, dtype):
    run = run_cuda_pair(*_TORCH_PAIRS[name], dtype=dtype, shapes=ELEMENTWISE_SHAPES,
                        none_grads={0: (2,), 3: (5, 0)})
    assert_moved(run)
    for pa, pb in zip(run.params_a, run.params_b):
        torch.testing.assert_close(pa, pb)  # torch.testing defaults: a few ULP
    for sa, sb in zip(run.states_a(), run.states_b()):
        assert set(sa) == set(sb)
        for key in sa:
            if key == "step":
                assert float(sa[key]) == float(sb[key])
            else:
                torch.testing.assert_close(sa[key], sb[key])


def test_bfloat16_matches_torch_fused_adamw():
    run = run_cuda_pair(*_TORCH_PAIRS["adamw"], dtype=torch.bfloat16, shapes=ELEMENTWISE_SHAPES,
                        none_grads={})
    assert_moved(run)
    for pa, pb in zip(run.params_a, run.params_b):
        assert_close_scaled(pa, pb, what="param", **TOL[torch.bfloat16])


# ---------------------------------------------------------------------------
# big buckets: hundreds of tensors in one launch
# ---------------------------------------------------------------------------

def _many_shapes(count, seed, matrices_only=False):
    """Odd sizes: 0-dim and 0-element tensors, vectors and matrices up to ~20k elements."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 3), (0, 4)] if matrices_only else [(), (0,), (1,), (2, 3)]
    while len(shapes) < count:
        rows, cols = (int(x) for x in torch.randint(1, 200, (2,), generator=gen))
        if not matrices_only and len(shapes) % 3 == 0:
            shapes.append((rows * cols,))
        else:
            shapes.append((rows, cols + len(shapes) % 7))
    return shapes


MANY_CASES = {
    "adamw": (_factory("adamw", "cuda"), _factory("adamw", "reference"), False),
    "adamw-amsgrad": (_factory("adamw-amsgrad", "cuda"), _factory("adamw-amsgrad", "reference"), False),
    "radam": (_factory("radam-threshold4", "cuda"), _factory("radam-threshold4", "reference"), False),
    "lion": (_factory("lion-wd", "cuda"), _factory("lion-wd", "reference"), False),
    "scaled_adamw": (_factory("scaled_adamw", "cuda"), _factory("scaled_adamw", "reference"), False),
    "lamb": (_factory("lamb", "cuda"), _factory("lamb", "reference"), False),
    "amos-all": (_amos_factory("cuda", "all", {"momentum": 0.9}),
                 _amos_factory("reference", "all", {"momentum": 0.9}), False),
    "amos-rows": (_amos_factory("cuda", (1,), {"clip_value": 0.5}),
                  _amos_factory("reference", (1,), {"clip_value": 0.5}), True),
    "amos-dim0": (_amos_factory("cuda", (0,), {}), _amos_factory("reference", (0,), {}), True),
}


@pytest.mark.parametrize("name", list(MANY_CASES))
def test_three_hundred_tensors_in_one_bucket(name):
    make_a, make_b, matrices_only = MANY_CASES[name]
    shapes = _many_shapes(300, seed=5, matrices_only=matrices_only)
    run = run_cuda_pair(make_a, make_b, dtype=torch.float32, shapes=shapes, steps=4,
                        none_grads={1: (0, 7, 150)}, split=150)
    assert_moved(run)
    assert_runs_close(run, TOL[torch.float32])


# ---------------------------------------------------------------------------
# a tensor of more than 2^31 elements (int64 indexing)
# ---------------------------------------------------------------------------

HUGE = 2**31 + 5


def _need_free_gib(gib):
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _windows_close(big, windows, small, tol, what):
    for w, s in zip(windows, small):
        assert_close_scaled(big[w], s.detach(), what=f"{what}[{w.start}:{w.stop}]", **tol)


def test_adamw_on_a_tensor_of_more_than_2_31_elements():
    """bfloat16 param of 2^31 + 5 elements (4 arrays of 4.3 GB): the elements at the
    start, across element 2^31 and at the end step exactly like small copies."""
    _need_free_gib(24)
    torch.manual_seed(0)
    p = torch.empty(HUGE, dtype=torch.bfloat16, device=DEVICE).normal_().requires_grad_(True)
    p.grad = torch.empty_like(p).normal_()
    windows = [slice(0, 5000), slice(2**31 - 4099, 2**31 + 3), slice(HUGE - 3001, HUGE)]
    small = [p.detach()[w].clone().requires_grad_(True) for w in windows]
    for s, w in zip(small, windows):
        s.grad = p.grad[w].clone()
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt = af.AdamW([p], backend="cuda", **kwargs)
    ref = af.AdamW(small, backend="reference", **kwargs)
    for _ in range(2):
        opt.step()
        ref.step()
    tol = TOL[torch.bfloat16]
    _windows_close(p.detach(), windows, small, tol, "param")
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        _windows_close(opt.state[p][key], windows, [ref.state[s][key] for s in small], tol, key)
    assert float(opt.state[p]["step"]) == 2
    del opt, ref, p, small
    torch.cuda.empty_cache()


def test_amos_rows_on_a_tensor_of_more_than_2_31_elements():
    """bfloat16 (2^21 + 1, 1024) with reduce_axes=(1,): one slot per row, rows past
    element 2^31 step like small copies of those rows."""
    _need_free_gib(24)
    torch.manual_seed(1)
    rows = 2**21 + 1
    p = torch.empty(rows, 1024, dtype=torch.bfloat16, device=DEVICE).normal_().requires_grad_(True)
    p.grad = torch.empty_like(p).normal_()
    windows = [slice(0, 3), slice(2**21 - 2, 2**21 + 1)]  # the second holds elements >= 2^31
    small = [p.detach()[w].clone().requires_grad_(True) for w in windows]
    for s, w in zip(small, windows):
        s.grad = p.grad[w].clone()
    kwargs = dict(lr=0.1, eta=0.5, reduce_axes=(1,), momentum=0.9)
    opt = af.Amos([p], backend="cuda", **kwargs)
    ref = af.Amos(small, backend="reference", **kwargs)
    for _ in range(2):
        opt.step()
        ref.step()
    tol = TOL[torch.bfloat16]
    _windows_close(p.detach(), windows, small, tol, "param")
    for key in ("v", "b", "mu"):
        _windows_close(opt.state[p][key], windows, [ref.state[s][key] for s in small], tol, key)
    del opt, ref, p, small
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# torch.amp.GradScaler: grad_scale / found_inf handed to the kernels
# ---------------------------------------------------------------------------

SCALER_CASES = {
    "adamw": (af.AdamW, dict(lr=1e-2, weight_decay=0.1, eps=1e-3)),
    "radam": (af.RAdam, dict(lr=1e-2, weight_decay=0.1, eps=1e-3)),
    "lion": (af.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "amos": (af.Amos, dict(lr=0.1, reduce_axes="all", momentum=0.9, clip_value=0.5)),
    "amos-elementwise": (af.Amos, dict(lr=0.1, clip_value=0.5)),
    "scaled_adamw": (af.ScaledAdamW, dict(lr=0.05, half_life=5, eps=1e-3)),
    "lamb": (af.Lamb, dict(lr=1e-2, weight_decay=0.01, eps=1e-3)),
}
INF_STEPS = {2: float("inf"), 4: float("nan"), 5: float("-inf")}


def _backward(params, grads, scaler):
    """loss = Σ⟨p, g⟩: the grads come through autograd, scaled like a training step."""
    for p in params:
        p.grad = None
    loss = sum((p * g).sum() for p, g in zip(params, grads))
    scaler.scale(loss).backward()


@pytest.mark.parametrize("name", list(SCALER_CASES))
def test_grad_scaler_skips_inf_steps_and_unscales(name):
    """An inf/nan grad skips the whole step (params and every state tensor, `step`
    included, bitwise unchanged; the scale halves); other steps equal the reference
    driven by its own GradScaler."""
    cls, kwargs = SCALER_CASES[name]
    base = cuda_params(torch.float32, SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt = cls(params, backend="cuda", **kwargs)
    ref = cls(ref_params, backend="reference", **kwargs)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    for step in range(9):
        grads = cuda_grads(base, step)
        if step in INF_STEPS:
            grads[2].view(-1)[7] = INF_STEPS[step]
        scale = scalers[0].get_scale()
        before = snapshot(opt, params) if step in INF_STEPS else None
        for ps, o, scaler in ((params, opt, scalers[0]), (ref_params, ref, scalers[1])):
            _backward(ps, grads, scaler)
            scaler.step(o)
            scaler.update()
        if before is not None:
            assert scalers[0].get_scale() == scale / 2, "GradScaler did not back off"
            assert_unchanged(before, opt, params)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        run = PairRun(params, opt, ref_params, ref, base)
        assert_runs_close(run, dict(rtol=1e-5, atol=1e-6))
    assert float(opt.state[params[3]]["step"]) == 9 - len(INF_STEPS)


# ---------------------------------------------------------------------------
# the cached device tables
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw-amsgrad", "lamb"])
def test_new_grad_tensors_every_step(name):
    """Grads at new addresses every step (the old ones kept alive so the allocator
    cannot hand the same memory back): the table's grad addresses are re-uploaded."""
    cls, kwargs = ALGORITHMS[name]
    base = cuda_params(torch.float32, SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt, ref = cls(params, backend="cuda", **kwargs), cls(ref_params, backend="reference", **kwargs)
    keep = []
    for step in range(6):
        grads = cuda_grads(base, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        keep.append([p.grad for p in params])
        opt.step()
        ref.step()
    assert_runs_close(PairRun(params, opt, ref_params, ref, base), TOL[torch.float32])


@pytest.mark.parametrize("name", ["adamw", "amos"])
def test_param_storage_replaced_between_steps(name):
    """p.data of a middle param replaced by a copy (new address, same first and last
    params): the table follows."""
    if name == "amos":
        make = lambda ps, backend: af.Amos(ps, lr=0.1, reduce_axes="all", backend=backend)  # noqa: E731
    else:
        make = lambda ps, backend: af.AdamW(ps, lr=1e-2, backend=backend)  # noqa: E731
    base = cuda_params(torch.float32, SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt, ref = make(params, "cuda"), make(ref_params, "reference")
    for step in range(6):
        if step == 3:
            for ps in (params, ref_params):
                ps[3].data = ps[3].data.clone()
        grads = cuda_grads(base, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
    assert_runs_close(PairRun(params, opt, ref_params, ref, base), TOL[torch.float32])


def test_steps_on_another_stream():
    """A step on a side stream, then on the default stream (a table last used on
    another stream is replaced, not rewritten under a queued kernel)."""
    cls, kwargs = ALGORITHMS["adamw"]
    base = cuda_params(torch.float32, ELEMENTWISE_SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt, ref = cls(params, backend="cuda", **kwargs), cls(ref_params, backend="reference", **kwargs)
    side = torch.cuda.Stream()
    for step in range(6):
        grads = cuda_grads(base, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        if step % 2:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            opt.step()
        ref.step()
    torch.cuda.synchronize()
    assert_runs_close(PairRun(params, opt, ref_params, ref, base), TOL[torch.float32])


@pytest.mark.parametrize("name", ["adamw-amsgrad", "lamb", "amos-dim0", "amos-rows"])
def test_deterministic(name):
    """Two identical runs are bitwise equal (no atomics in any reduction)."""
    def run():
        if name.startswith("amos"):
            make, _, matrices = MANY_CASES[name]
        else:
            make, matrices = _factory(name, "cuda"), False
        return run_cuda_pair(make, make, dtype=torch.float32,
                             shapes=_many_shapes(40, seed=9, matrices_only=matrices) + [(3, 9000)], steps=3)
    first, second = run(), run()
    for a, b in zip(first.params_a, second.params_a):
        assert torch.equal(a, b)
    for sa, sb in zip(first.states_a(), second.states_a()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_misaligned_params_take_the_scalar_path():
    """Params that are views at an odd element offset (not 16-byte aligned): the
    kernels fall back to element-wise loads and still match the reference."""
    storage = torch.randn(1 + 64 * 33 + 1 + 1000, device=DEVICE)
    base = [storage[1:1 + 64 * 33].view(64, 33), storage[2 + 64 * 33:].view(1000)]
    for make in (lambda ps, b: af.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=b),
                 lambda ps, b: af.Amos(ps, lr=0.1, reduce_axes="all", momentum=0.9, backend=b)):
        params = [t.detach().requires_grad_(True) for t in base]  # views into `storage`, leaves
        ref_params = [t.detach().clone().requires_grad_(True) for t in base]
        assert params[0].data_ptr() % 16 != 0
        opt, ref = make(params, "cuda"), make(ref_params, "reference")
        for step in range(4):
            grads = cuda_grads(base, step)
            set_grads(params, grads)
            set_grads(ref_params, grads)
            opt.step()
            ref.step()
        assert_runs_close(PairRun(params, opt, ref_params, ref, base), TOL[torch.float32])
        storage = storage.clone()
        base = [storage[1:1 + 64 * 33].view(64, 33), storage[2 + 64 * 33:].view(1000)]


# ---------------------------------------------------------------------------
# the ops themselves
# ---------------------------------------------------------------------------

def test_ops_dispatch_to_the_cuda_kernels():
    """torch.ops.amos_fused.adam_step on CUDA tensors runs the CUDA kernel (the same
    result as the CPU kernel on CPU copies), whatever the Python routing says."""
    shapes = [(37, 5), (), (1000,)]
    cpu = [p.detach() for p in make_params(torch.float32, 3, shapes)]
    grads = make_grads(cpu, 0)
    gpu = [p.to(DEVICE) for p in cpu]
    for ps, gs in ((cpu, grads), (gpu, [g.to(DEVICE) for g in grads])):
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        steps = [torch.tensor(0.0) for _ in ps]
        torch.ops.amos_fused.adam_step(ps, gs, m, v, [], steps, 1e-2, 0.9, 0.999, 1e-8, 0.1,
                                       True, False, True)
        assert all(float(s) == 1.0 for s in steps)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a)


def test_bad_input_raises_before_any_write():
    p = torch.randn(10, device=DEVICE)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    before = p.clone()
    with pytest.raises(ValueError):
        torch.ops.amos_fused.adam_step([p], [torch.randn(11, device=DEVICE)], [m], [v], [], [step],
                                       1e-2, 0.9, 0.999, 1e-8, 0.0, True, False, True)
    with pytest.raises(ValueError):  # steps must be float32 CPU scalars
        torch.ops.amos_fused.adam_step([p], [torch.randn(10, device=DEVICE)], [m], [v], [],
                                       [torch.tensor(0.0, device=DEVICE)], 1e-2, 0.9, 0.999, 1e-8, 0.0,
                                       True, False, True)
    assert torch.equal(p, before) and float(step) == 0.0
    assert torch.count_nonzero(m) == 0 and torch.count_nonzero(v) == 0


def test_found_inf_skips_without_writing():
    p = torch.randn(100, device=DEVICE)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    before = p.clone()
    torch.ops.amos_fused.adam_step([p], [torch.randn(100, device=DEVICE)], [m], [v], [], [step],
                                   1e-2, 0.9, 0.999, 1e-8, 0.0, True, False, True,
                                   grad_scale=torch.tensor(4.0, device=DEVICE),
                                   found_inf=torch.tensor(1.0, device=DEVICE))
    assert torch.equal(p, before) and float(step) == 0.0 and torch.count_nonzero(m) == 0
