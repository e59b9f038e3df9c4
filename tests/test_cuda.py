"""The CUDA kernels (``backend='cuda'``, csrc/cuda/) on CUDA tensors: against the
eager reference (``backend='reference'``, same tensors, same device) for every
algorithm and Amos slot layout, against torch.optim.AdamW / Adam (fused=True),
on buckets of hundreds of tensors, on a tensor of more than 2^31 elements, with
torch.amp.GradScaler, and through the cached device tables (new grad addresses,
replaced params, another stream), and the 8-bit optimizers' FP8 states against
the cpu backend.  Skipped without a GPU or a CUDA build.

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

import dataclasses
import math

import pytest
import torch

import amos_fused as af
from amos_fused.contracts import call_step
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

import registry  # noqa: E402
from conftest import run_pair  # noqa: E402
from registry import (  # noqa: E402
    AMOS_LR,
    AMOS_REDUCE_AXES,
    AMOS_SECOND_GROUP,
    CASES,
    CLASS_CASES,
    DTYPE_IDS,
    amos_case,
    assert_bitwise_equal,
    assert_close_scaled,
    decay_lr,
    tolerance,
)

DEVICE = "cuda"
STEPS = 10
TOL = {dtype: tolerance("cuda", "elementwise", dtype) for dtype in DTYPE_IDS}  # the same for every family
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


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
    n = len(shapes)
    return run_pair(
        make_a, make_b, device=DEVICE, dtype=dtype, shapes=shapes, steps=steps, seed=seed,
        split=n // 2 if split is None else split, second_group=second_group or {"lr": 3e-3},
        none_grads={0: (n - 1,), 5: (0,)} if none_grads is None else none_grads, before_step=before_step)


def assert_runs_close(run, tol):
    """Params and states agree with the scaled floor (registry.assert_runs_close): same
    keys, ``step`` equal and a float32 CPU scalar, tensors in the param's dtype and on
    its device."""
    registry.assert_runs_close(run, tol, scaled=True)


# ---------------------------------------------------------------------------
# every elementwise and norm-scaled algorithm against the reference
# ---------------------------------------------------------------------------

# test id -> registry case
ALGORITHMS = {
    "adamw": "adamw-ams0-bc1-wd0.1",
    "adamw-amsgrad": "adamw-wd-amsgrad",
    "adamw-no_bias_correction": "adamw-wd-no_bias_correction",
    "adam-l2": "adam-l2-ams0",
    "adam-l2-amsgrad": "adam-l2-amsgrad",
    "adam-no_decay": "adam-no_decay",
    "radam-l2": "radam",
    "radam-decoupled": "radam-decoupled",
    "radam-threshold4": "radam-threshold4",
    "lion": "lion",
    "lion-wd": "lion-wd",
    "scaled_adamw": "scaled-square-p",
    "scaled_adamw-time-q": "scaled-time-half_life-q",
    "lamb": "lamb-lr1e-2-wd0.1",
    "lamb-no_bias_correction": "lamb-lr1e-2-no_bias_correction",
}
# every optimizer class of the registry (its first row), whatever is listed above
ALGORITHMS.update({f"class-{name}": case for name, case in registry.CLASS_CASES.items()})

# SHAPES plus tensors of several chunks (65537 > 65536) and odd row lengths.
ELEMENTWISE_SHAPES = SHAPES + [(65537,), (3, 9000), (1,)]


def _factory(name, backend):
    return CASES[ALGORITHMS[name]].factory(backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_cuda_matches_reference(name, dtype):
    run = run_cuda_pair(_factory(name, "cuda"), _factory(name, "reference"), dtype=dtype,
                        shapes=ELEMENTWISE_SHAPES)
    if dtype == torch.bfloat16:
        # The second group (lr 3e-3) holds the 65537- and 27000-element tensors, where most
        # bfloat16 steps of some algorithms (ScaledAdamW's, Amos's) are under half an ulp
        # of the param and round back: the cpu backend and the reference move exactly the
        # same elements.  The first group, at the case's lr, must move.
        first = len(ELEMENTWISE_SHAPES) // 2
        assert_moved(dataclasses.replace(run, params_a=run.params_a[:first], initial=run.initial[:first]))
    else:
        assert_moved(run)
    assert_runs_close(run, TOL[dtype])  # state tensors in the param's dtype, on its device


@pytest.mark.parametrize("name", ["adamw-amsgrad", "radam-l2", "lion-wd", "scaled_adamw", "lamb"])
def test_cuda_matches_reference_float16(name):
    run = run_cuda_pair(_factory(name, "cuda"), _factory(name, "reference"), dtype=torch.float16,
                        shapes=ELEMENTWISE_SHAPES)
    assert_moved(run)
    assert_runs_close(run, TOL[torch.float16])


# ---------------------------------------------------------------------------
# Amos: every slot layout and kernel path
# ---------------------------------------------------------------------------

# reduce_axes -> shapes.  Paths (float32/bfloat16/float16; float64 halves the lengths):
# rows of <= 512 elements: a warp per row; <= 4096: a block per row; longer: two
# phases.  Non-trailing reduced axes: two phases with per-(slot, piece) sums.
AMOS_LAYOUTS = {
    "elementwise": (AMOS_REDUCE_AXES["elementwise"], [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (65537,)]),
    "all": (AMOS_REDUCE_AXES["all"], [(), (0,), (1,), (37,), (1000,), (3, 1, 7), (4, 16), (64, 130), (3, 9000)]),
    "rows": (AMOS_REDUCE_AXES["rows"], [(37, 5), (4, 16), (3, 1, 7), (0, 5), (1, 33), (33, 1), (50, 1000),
                    (20, 3000), (3, 9000), (7, 5003)]),
    "dim0": (AMOS_REDUCE_AXES["dim0"], [(37, 5), (4, 16), (1, 9), (9, 1), (0, 5), (300, 7), (1000, 3)]),
    "middle": (AMOS_REDUCE_AXES["middle"], [(2, 6, 5), (3, 4, 8), (4, 1, 3), (3, 700, 2)]),
    "outer_and_inner": (AMOS_REDUCE_AXES["outer_and_inner"], [(3, 4, 5), (5, 3, 17), (0, 3, 4), (40, 2, 9)]),
}
AMOS_CONFIG_NAMES = ["plain", "momentum", "clip", "everything"]  # of registry.AMOS_CONFIGS


def _amos_factory(backend, reduce_axes, config):
    return amos_case(reduce_axes, config, AMOS_LR).factory(backend)


def _amos_run(layout, config, dtype, **kwargs):
    reduce_axes, shapes = AMOS_LAYOUTS[layout]
    return run_cuda_pair(
        _amos_factory("cuda", reduce_axes, config),
        _amos_factory("reference", reduce_axes, config),
        dtype=dtype, shapes=shapes,
        # group 0: η inferred per tensor; group 1: its own lr and one η
        second_group=AMOS_SECOND_GROUP,
        before_step=decay_lr, **kwargs,
    )


@pytest.mark.parametrize("config", AMOS_CONFIG_NAMES)
@pytest.mark.parametrize("layout", list(AMOS_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_amos_matches_reference(layout, config, dtype):
    run = _amos_run(layout, config, dtype)
    assert_moved(run)
    assert_runs_close(run, TOL[dtype])
    keys = amos_case(None, config).state_keys()
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

# test id -> (ours on cuda, torch.optim's fused (RAdam: foreach) twin), from the registry
_TORCH_PAIRS = {
    key: (CASES[name].factory("cuda"), CASES[name].torch_factory(**extra))
    for key, name, extra in [("adamw", "adamw", dict(fused=True)), ("adamw-amsgrad", "adamw-amsgrad", dict(fused=True)),
                             ("adam-l2", "adam-l2", dict(fused=True)), ("radam", "radam", dict(foreach=True))]
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


# test id -> (ours on cuda, ours on the reference, matrices only)
MANY_CASES = {
    **{key: (_factory(name, "cuda"), _factory(name, "reference"), False)
       for key, name in [("adamw", "adamw"), ("adamw-amsgrad", "adamw-amsgrad"), ("radam", "radam-threshold4"),
                         ("lion", "lion-wd"), ("scaled_adamw", "scaled_adamw"), ("lamb", "lamb")]},
    **{key: (_amos_factory("cuda", axes, config), _amos_factory("reference", axes, config), matrices)
       for key, axes, config, matrices in [("amos-all", "all", "momentum", False), ("amos-rows", (1,), "clip", True),
                                           ("amos-dim0", (0,), "plain", True)]},
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

# test id -> registry case (the cases of test_grad_scaler.py, and Amos with elementwise slots)
SCALER_CASES = {
    "adamw": "adamw-eps1e-3", "radam": "radam-eps1e-3", "lion": "lion-lr1e-3", "amos": "amos-all-momentum-clip",
    "amos-elementwise": "amos-clip", "scaled_adamw": "scaled-half_life5-eps1e-3", "lamb": "lamb-eps1e-3",
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
    case = CASES[SCALER_CASES[name]]
    base = cuda_params(torch.float32, SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt = case.make(params, "cuda")
    ref = case.make(ref_params, "reference")
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
    case = CASES[ALGORITHMS[name]]
    base = cuda_params(torch.float32, SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt, ref = case.make(params, "cuda"), case.make(ref_params, "reference")
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
    case = CASES[ALGORITHMS["adamw"]]
    base = cuda_params(torch.float32, ELEMENTWISE_SHAPES)
    params, ref_params = clone_params(base), clone_params(base)
    opt, ref = case.make(params, "cuda"), case.make(ref_params, "reference")
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
    assert_bitwise_equal([run(), run()])


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

ADAMW_HYPER = dict(lr=1e-2, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                   amsgrad=False, bias_correction=True)


def test_ops_dispatch_to_the_cuda_kernels():
    """torch.ops.amos_fused.step on CUDA tensors runs the CUDA kernel (the same
    result as the CPU kernel on CPU copies), whatever the Python routing says."""
    shapes = [(37, 5), (), (1000,)]
    cpu = [p.detach() for p in make_params(torch.float32, 3, shapes)]
    grads = make_grads(cpu, 0)
    gpu = [p.to(DEVICE) for p in cpu]
    for ps, gs in ((cpu, grads), (gpu, [g.to(DEVICE) for g in grads])):
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        steps = [torch.tensor(0.0) for _ in ps]
        call_step(torch.ops.amos_fused, "adam", ps, gs, {"exp_avg": m, "exp_avg_sq": v}, steps,
                  dict(ADAMW_HYPER, weight_decay=0.1))
        assert all(float(s) == 1.0 for s in steps)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a)


def test_bad_input_raises_before_any_write():
    p = torch.randn(10, device=DEVICE)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    before = p.clone()
    with pytest.raises(ValueError):
        call_step(torch.ops.amos_fused, "adam", [p], [torch.randn(11, device=DEVICE)],
                  {"exp_avg": [m], "exp_avg_sq": [v]}, [step], ADAMW_HYPER)
    with pytest.raises(ValueError):  # steps must be float32 CPU scalars
        call_step(torch.ops.amos_fused, "adam", [p], [torch.randn(10, device=DEVICE)],
                  {"exp_avg": [m], "exp_avg_sq": [v]}, [torch.tensor(0.0, device=DEVICE)], ADAMW_HYPER)
    assert torch.equal(p, before) and float(step) == 0.0
    assert torch.count_nonzero(m) == 0 and torch.count_nonzero(v) == 0


def test_found_inf_skips_without_writing():
    p = torch.randn(100, device=DEVICE)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    before = p.clone()
    call_step(torch.ops.amos_fused, "adam", [p], [torch.randn(100, device=DEVICE)],
              {"exp_avg": [m], "exp_avg_sq": [v]}, [step], ADAMW_HYPER,
              grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert torch.equal(p, before) and float(step) == 0.0 and torch.count_nonzero(m) == 0


# ---------------------------------------------------------------------------
# telemetry: track_rms=True and opt.rms() (the step op's Σθ², Σ(Δθ)² per param)
# ---------------------------------------------------------------------------
# The kernels sum θ² and (Δθ)² of the stored values per thread in the math type
# (float32 for float32 / bfloat16 / float16), then in double per block and per
# tensor, in a fixed order; the reference sums in float64 from a copy of its own
# params taken before the step.
# * Against float64 sums of the cuda run's own params (same values, another
#   summation): rtol 1e-5 on the RMS (a float32 thread sum of at most a few
#   hundred squares: <= ~1e-5 relative in the worst case, ~1e-6 typically; the
#   RMS halves it); float64: 1e-12.
# * Against the reference's rms(): each side measures its own params, which differ
#   within TOL; the weight RMS by as much as the params, the update RMS more:
#   Δθ = θ_after − θ_before ~ lr·|θ| loses ~log10(1/lr) digits to cancellation,
#   and in bfloat16 an element whose rounding flips changes its Δθ by a storage ULP.
TELEMETRY_OWN_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
#   The CPU kernels against the reference with these helpers (the same structure,
#   float32 lanes over blocks of 4096): weight ≤ 5e-7, update ≤ 2e-6 in float32;
#   ≤ 4e-6 / 6e-5 in bfloat16; ≤ 2e-14 in float64.  The CUDA params differ from the
#   reference's a little more (FMA contraction): rtol TELEMETRY_REF_RTOL.
TELEMETRY_REF_RTOL = {  # (weight RMS, update RMS)
    torch.float32: (2e-5, 2e-4), torch.bfloat16: (1e-2, 5e-2), torch.float64: (1e-10, 1e-7),
}
TELEMETRY_STEPS = 6


def _measured_rms(opt, params, before):
    """(weight RMS, update RMS per unit of lr) of each param in float64, from the
    params after a step and their copies ``before`` it (telemetry.py's definition)."""
    lr = {p: float(group["lr"]) for group in opt.param_groups for p in group["params"]}
    out = []
    for p, b in zip(params, before):
        after = p.detach().double()
        n = max(p.numel(), 1)
        out.append((math.sqrt(after.square().sum().item() / n),
                    math.sqrt((after - b.double()).square().sum().item() / n) / lr[p]))
    return out


def _telemetry_run(make_cuda, make_reference, dtype, shapes, steps=TELEMETRY_STEPS, second_group=None,
                   before_step=None):
    """A cuda and a reference optimizer, both built with track_rms=True, over copies
    of one param set in two groups, fed the same grads.  Per step: (cuda rms(),
    the same measured in float64 from the cuda params, reference rms()), each a
    list of (weight, update) in param order."""
    base = cuda_params(dtype, shapes)
    params_a, params_b = clone_params(base), clone_params(base)
    second = {"lr": 3e-3} if second_group is None else second_group
    opt_a = make_cuda(param_groups(params_a, second, len(shapes) // 2))
    opt_b = make_reference(param_groups(params_b, second, len(shapes) // 2))
    log = []
    for step in range(steps):
        if before_step is not None:
            before_step(step, opt_a, opt_b)
        grads = cuda_grads(base, step)
        set_grads(params_a, grads)
        set_grads(params_b, grads)
        before = [p.detach().clone() for p in params_a]
        opt_a.step()
        opt_b.step()
        rms_a, rms_b = opt_a.rms(), opt_b.rms()
        log.append(([tuple(rms_a[p]) for p in params_a], _measured_rms(opt_a, params_a, before),
                    [tuple(rms_b[p]) for p in params_b]))
    return log


def _assert_rms_close(actual, expected, rtols, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        for column, (x, y, rtol) in enumerate(zip(a, e, rtols)):
            assert math.isclose(x, y, rel_tol=rtol, abs_tol=0.0), (
                f"{what}: param {i}: {('weight', 'update')[column]} RMS {x!r} vs {y!r} (rtol {rtol})")


def _assert_telemetry_matches(log, dtype):
    for step, (cuda, own, reference) in enumerate(log):
        _assert_rms_close(cuda, own, (TELEMETRY_OWN_RTOL[dtype],) * 2, f"step {step}: against its own params")
        _assert_rms_close(cuda, reference, TELEMETRY_REF_RTOL[dtype], f"step {step}: against the reference")
        assert any(update > 0 for _, update in cuda), "no param moved"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_telemetry_matches_reference(name, dtype):
    """rms() of the cuda backend against the reference backend, every optimizer
    class (its first registry row), tensors of several blocks included."""
    case = CASES[CLASS_CASES[name]]
    log = _telemetry_run(case.factory("cuda", track_rms=True), case.factory("reference", track_rms=True),
                         dtype, ELEMENTWISE_SHAPES)
    _assert_telemetry_matches(log, dtype)


@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("layout", list(AMOS_LAYOUTS))
def test_amos_telemetry_matches_reference(layout, momentum):
    """Amos on every slot layout: the one-pass kernels (elementwise chunks, warp and
    block rows) and the two-phase ones (long rows, general layouts) all measure."""
    reduce_axes, shapes = AMOS_LAYOUTS[layout]
    config = "momentum" if momentum else "plain"
    log = _telemetry_run(amos_case(reduce_axes, config).factory("cuda", track_rms=True),
                         amos_case(reduce_axes, config).factory("reference", track_rms=True),
                         torch.float32, shapes, second_group=AMOS_SECOND_GROUP, before_step=decay_lr)
    _assert_telemetry_matches(log, torch.float32)


TELEMETRY_BITWISE_CASES = {
    **{name: CASES[case] for name, case in CLASS_CASES.items()},
    "Amos-rows": amos_case((1,), "momentum"),
    "Amos-dim0": amos_case((0,), "plain"),
}


@pytest.mark.parametrize("name", list(TELEMETRY_BITWISE_CASES))
def test_telemetry_is_deterministic(name):
    """Two identical runs give bitwise the same telemetry (no atomics: block sums
    combined per tensor in a fixed order), on a bucket of many tensors."""
    case = TELEMETRY_BITWISE_CASES[name]
    matrices = name != "Amos" and name.startswith("Amos")
    shapes = _many_shapes(40, seed=9, matrices_only=matrices) + [(3, 9000), (65537, 2)]

    def run():
        params = clone_params(cuda_params(torch.float32, shapes))
        opt = case.make(params, "cuda", track_rms=True)
        out = []
        for step in range(3):
            set_grads(params, cuda_grads(params, step))
            opt.step()
            rms = opt.rms()
            out.append([tuple(rms[p]) for p in params])
        return out

    first, second = run(), run()
    assert first == second  # floats compared exactly: the sums agree bitwise


@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_telemetry_of_a_step_skipped_by_found_inf(name):
    """A step GradScaler skips (an inf grad) writes Σ(Δθ)² = 0 and leaves Σθ²
    unmeasured: rms() gives update 0 and weight nan for every param."""
    case = CASES[CLASS_CASES[name]]
    params = clone_params(cuda_params(torch.float32, SHAPES))
    opt = case.make(params, "cuda", track_rms=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for step in range(2):
        grads = cuda_grads(params, step)
        if step == 1:
            grads[2].view(-1)[7] = float("inf")
        _backward(params, grads, scaler)
        scaler.step(opt)
        scaler.update()
        rms = opt.rms()
        if step == 0:
            assert all(math.isfinite(rms[p].weight) for p in params)
            assert any(rms[p].update > 0 for p in params)
        else:
            assert all(rms[p].update == 0.0 for p in params)
            assert all(math.isnan(rms[p].weight) for p in params)


def test_telemetry_op_output():
    """The op's telemetry output itself: row t = (Σθ², Σ(Δθ)²) of param t as
    stored, for a bucket with empty tensors and a tensor of several blocks; a
    bucket of empty tensors writes zeros; found_inf writes 0 into column 1 only."""
    shapes = [(37, 5), (0,), (), (70001,)]
    params = [p.detach() for p in cuda_params(torch.bfloat16, shapes)]
    grads = cuda_grads(params, 0)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    before = [p.clone() for p in params]
    table = torch.full((len(params), 2), math.nan, dtype=torch.float64, device=DEVICE)
    call_step(torch.ops.amos_fused, "adam", params, grads, {"exp_avg": m, "exp_avg_sq": v}, steps,
              dict(ADAMW_HYPER, weight_decay=0.1), telemetry=table)
    expected = torch.tensor([[p.double().square().sum().item(), (p.double() - b.double()).square().sum().item()]
                             for p, b in zip(params, before)], dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(table, expected, rtol=1e-5, atol=0.0)
    assert table[1].tolist() == [0.0, 0.0]

    empty = [torch.zeros(0, device=DEVICE), torch.zeros(0, 3, device=DEVICE)]
    table = torch.full((2, 2), math.nan, dtype=torch.float64, device=DEVICE)
    call_step(torch.ops.amos_fused, "adam", empty, [torch.zeros_like(p) for p in empty],
              {"exp_avg": [torch.zeros_like(p) for p in empty], "exp_avg_sq": [torch.zeros_like(p) for p in empty]},
              [torch.tensor(0.0) for _ in empty], ADAMW_HYPER, telemetry=table)
    assert torch.equal(table, torch.zeros(2, 2, dtype=torch.float64, device=DEVICE))

    table = torch.full((len(params), 2), math.nan, dtype=torch.float64, device=DEVICE)
    call_step(torch.ops.amos_fused, "adam", params, grads, {"exp_avg": m, "exp_avg_sq": v}, steps, ADAMW_HYPER,
              found_inf=torch.tensor(1.0, device=DEVICE), telemetry=table)
    assert torch.all(table[:, 1] == 0) and torch.all(table[:, 0].isnan())


# ---------------------------------------------------------------------------
# stochastic rounding: bf16_stochastic_round=True
# ---------------------------------------------------------------------------
# The CUDA kernels draw csrc/stochastic_round.h's bits, like the CPU kernels: from
# the same params, grads and seed the bfloat16 params are bitwise equal wherever
# the float32 results are — every elementwise rule and Amos with a slot per
# element (step_math.h: one rounding per operation on both).  Where the kernels sum
# over several elements in another order (norm-scaled rules, Amos slots over rows
# or other axes) a float32 result may differ in its last bits and round to the
# other neighbour: stepped in lockstep (each step from the cpu run's params and
# states, copied into the cuda run's), every param equal or a neighbouring bfloat16
# value — or, where the update cancels most of θ, within SR_CANCEL_ULPS float32
# ulps of |θ before the step| (the float32 results' own difference, then many of
# the small result's bfloat16 steps) — and at most SR_DIFFER_FRACTION of them
# differing.  (Run freely, a
# differing element keeps its absolute difference while Amos's decay shrinks θ, so
# it can end several of the smaller binade's steps apart.)
SR_STEPS = 5
SR_DIFFER_FRACTION = 0.01
SR_CANCEL_ULPS = 8
SR_SHAPES = ELEMENTWISE_SHAPES + [(70001,)]


def _sr_exact(case):
    return case.family != "norm" and not (case.cls is af.Amos and case.kwargs.get("reduce_axes") is not None)


def _sr_run(case, device, shapes, second_group=None, decay=False, **extra):
    """SR_STEPS steps of ``case`` with bf16_stochastic_round=True on ``device`` (the
    cpu backend on the CPU), from make_params in two groups, the lr decayed before
    every step but the first when ``decay``; returns (params, opt)."""
    backend = "cuda" if device == DEVICE else "cpu"
    params = [p.detach().to(device).requires_grad_(True) for p in make_params(torch.bfloat16, 0, shapes)]
    second = {"lr": 3e-3} if second_group is None else second_group
    opt = case.make(param_groups(params, second, len(shapes) // 2), backend, bf16_stochastic_round=True,
                    stochastic_round_seed=77, **extra)
    for step in range(SR_STEPS):
        if decay and step > 0:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.85
        set_grads(params, [g.to(device) for g in make_grads([p.detach().cpu() for p in params], step, 0)])
        opt.step()
    return params, opt


def _copy_run(params_src, opt_src, params_dst, opt_dst):
    """Lockstep: the params and every state tensor of one run copied into the other's."""
    with torch.no_grad():
        for p_dst, p_src in zip(params_dst, params_src):
            p_dst.copy_(p_src)
            for key, value in opt_src.state[p_src].items():
                if torch.is_tensor(value):
                    opt_dst.state[p_dst][key].copy_(value)


def _sr_lockstep(case, shapes, second_group=None, decay=False):
    """A cuda and a cpu optimizer with bf16_stochastic_round=True stepped together
    from make_params; before every step but the first the cpu run's params and
    states are copied into the cuda run's.  Per step: (cuda params, cpu params,
    the params before the step)."""
    runs = []
    for device in (DEVICE, "cpu"):
        params = [p.detach().to(device).requires_grad_(True) for p in make_params(torch.bfloat16, 0, shapes)]
        second = {"lr": 3e-3} if second_group is None else second_group
        opt = case.make(param_groups(params, second, len(shapes) // 2), "cuda" if device == DEVICE else "cpu",
                        bf16_stochastic_round=True, stochastic_round_seed=77)
        runs.append((params, opt))
    (params_g, opt_g), (params_c, opt_c) = runs
    log = []
    for step in range(SR_STEPS):
        if step > 0:
            _copy_run(params_c, opt_c, params_g, opt_g)
        grads = make_grads([p.detach().cpu() for p in params_c], step, 0)
        before = [p.detach().clone() for p in params_c]
        for params, opt in runs:
            if decay and step > 0:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * 0.85
            set_grads(params, [g.to(params[0].device) for g in grads])
            opt.step()
        log.append(([p.detach().clone() for p in params_g], [p.detach().clone() for p in params_c], before))
    return log


def _assert_sr_lockstep(log, exact, what):
    for step, (cuda, cpu, before) in enumerate(log):
        _assert_sr_equal(cuda, cpu, exact, f"{what}: step {step}", before)


def _bf16_ordered(t):
    bits = t.detach().cpu().contiguous().view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)  # ±0 both 0


def _assert_sr_equal(cuda, cpu, exact, what, before=None):
    """Bitwise equal, or (not exact) equal or neighbours — or within SR_CANCEL_ULPS
    float32 ulps of |θ| in ``before`` (the params before one step) when given."""
    differ = total = 0
    for i, (a, c) in enumerate(zip(cuda, cpu)):
        assert a.dtype == torch.bfloat16 and a.device.type == "cuda"
        if exact:
            assert torch.equal(a.detach().cpu(), c.detach()), (
                f"{what}: param {i} {tuple(c.shape)}: {int((a.detach().cpu() != c.detach()).sum())} elements differ")
            continue
        if c.numel() == 0:
            continue
        gap = (_bf16_ordered(a) - _bf16_ordered(c)).abs()
        if before is not None:
            cancelled = ((a.detach().cpu().float() - c.detach().float()).abs()
                         <= SR_CANCEL_ULPS * 2.0**-23 * before[i].detach().cpu().float().abs())
            gap = torch.where(cancelled, gap.clamp(max=1), gap)
        assert int(gap.max()) <= 1, f"{what}: param {i}: {int(gap.max())} bfloat16 steps apart"
        differ += int((gap != 0).sum())
        total += c.numel()
    assert differ <= SR_DIFFER_FRACTION * max(total, 1), f"{what}: {differ} of {total} params differ"


@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_stochastic_rounding_matches_cpu(name):
    """Every optimizer class (its first registry row): the cuda backend's bfloat16
    params against the cpu backend's, tensors of several blocks and odd lengths."""
    case = CASES[CLASS_CASES[name]]
    _assert_sr_lockstep(_sr_lockstep(case, SR_SHAPES), _sr_exact(case), name)
    if _sr_exact(case):  # run freely too: bitwise equal throughout
        cuda, _ = _sr_run(case, DEVICE, SR_SHAPES)
        cpu, _ = _sr_run(case, "cpu", SR_SHAPES)
        _assert_sr_equal(cuda, cpu, True, name)


@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("layout", list(AMOS_LAYOUTS))
def test_amos_stochastic_rounding_matches_cpu(layout, momentum):
    """Amos on every slot layout (one-pass kernels: elementwise chunks, warp and block
    rows; two-phase: long rows, general layouts), with an lr schedule and two groups."""
    reduce_axes, shapes = AMOS_LAYOUTS[layout]
    case = amos_case(reduce_axes, "momentum" if momentum else "plain")
    _assert_sr_lockstep(_sr_lockstep(case, shapes, AMOS_SECOND_GROUP, decay=True), reduce_axes is None,
                        f"Amos {layout}")
    if reduce_axes is None:
        cuda, _ = _sr_run(case, DEVICE, shapes, AMOS_SECOND_GROUP, decay=True)
        cpu, _ = _sr_run(case, "cpu", shapes, AMOS_SECOND_GROUP, decay=True)
        _assert_sr_equal(cuda, cpu, True, f"Amos {layout}")


@pytest.mark.parametrize("name", ["AdamW", "Lamb", "Amos"])
def test_stochastic_rounding_rounds_and_is_deterministic(name):
    """Two runs bitwise equal; the params differ from round-to-nearest's; with
    track_rms=True the params are the same and rms() measures the stored (rounded)
    values."""
    case = CASES[CLASS_CASES[name]]
    first, _ = _sr_run(case, DEVICE, SR_SHAPES)
    second, _ = _sr_run(case, DEVICE, SR_SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    params = [p.detach().to(DEVICE).requires_grad_(True) for p in make_params(torch.bfloat16, 0, SR_SHAPES)]
    opt = case.make(param_groups(params, {"lr": 3e-3}, len(SR_SHAPES) // 2), "cuda")
    for step in range(SR_STEPS):
        set_grads(params, [g.to(DEVICE) for g in make_grads([p.detach().cpu() for p in params], step, 0)])
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(first, params))
    # telemetry: one more step of a tracked copy, measured against its own params
    tracked, opt = _sr_run(case, DEVICE, SR_SHAPES, track_rms=True)
    assert all(torch.equal(a, b) for a, b in zip(first, tracked))
    before = [p.detach().clone() for p in tracked]
    set_grads(tracked, [g.to(DEVICE) for g in make_grads([p.detach().cpu() for p in tracked], SR_STEPS, 0)])
    opt.step()
    rms = opt.rms()
    _assert_rms_close([tuple(rms[p]) for p in tracked], _measured_rms(opt, tracked, before),
                      (TELEMETRY_OWN_RTOL[torch.bfloat16],) * 2, f"{name}: rms() against its own params")


def test_stochastic_rounding_of_misaligned_params_and_nan():
    """Params at an odd element offset (the kernels' scalar path) round like the CPU
    op's; a NaN param stays NaN, and NaNs (and ±inf) are where the CPU op has them."""
    storage = make_params(torch.bfloat16, 3, [(1 + 64 * 33 + 1 + 1000,)])[0].detach()
    views = [storage[1:1 + 64 * 33].view(64, 33), storage[2 + 64 * 33:].view(1000)]
    views[1][:4] = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    for case in (CASES[CLASS_CASES["AdamW"]], amos_case(None, "momentum"), amos_case("all", "momentum")):
        exact = case.kwargs.get("reduce_axes") != "all"
        runs = []
        for device in (DEVICE, "cpu"):
            buffer = storage.to(device).clone()
            params = [t.detach().requires_grad_(True)  # views into `buffer`, leaves
                      for t in (buffer[1:1 + 64 * 33].view(64, 33), buffer[2 + 64 * 33:].view(1000))]
            assert device != DEVICE or params[0].data_ptr() % 16 != 0
            opt = case.make(params, "cuda" if device == DEVICE else "cpu", bf16_stochastic_round=True)
            for step in range(3 if exact else 1):  # one step: neighbours at most (see above)
                grads = [torch.ones_like(p) if i == 1 else g.to(device)
                         for i, (p, g) in enumerate(zip(params, make_grads([p.detach().cpu() for p in params],
                                                                            step, 0)))]
                set_grads(params, grads)
                opt.step()
            runs.append(params)
        cuda, cpu = runs
        assert torch.isnan(cuda[1][0])
        for a, c in zip(cuda, cpu):
            assert torch.equal(a.detach().cpu().isnan(), c.detach().isnan())
            assert torch.equal(a.detach().cpu().isinf(), c.detach().isinf())
        finite = [torch.nan_to_num(p.detach().cpu(), nan=0.0) for p in cuda]
        finite_cpu = [torch.nan_to_num(p.detach(), nan=0.0) for p in cpu]
        _assert_sr_equal([f.to(DEVICE) for f in finite], finite_cpu, exact, "misaligned")


def test_stochastic_rounding_past_element_2_32():
    """Lion on a bfloat16 tensor of 2^33 + 2^16 elements (3 arrays of 17.2 GB): each
    element moves from 1.5 by exactly lr = 2^-10 (a float32 value between two
    bfloat16 neighbours) and is rounded with the bits of its own index, the elements
    past 2^32 with 32-bit offsets no longer enough, those past 2^33 (pair indices
    past 2^32) with the hash's other high word (amos_fused/stochastic_round.py)."""
    from amos_fused.stochastic_round import element_bits
    _need_free_gib(54)
    n = 2**33 + 2**16
    p = torch.full((n,), 1.5, dtype=torch.bfloat16, device=DEVICE)
    g = torch.ones_like(p)
    m = torch.zeros_like(p)
    key, lr = (5 << 32) | 3, 2.0**-10
    call_step(torch.ops.amos_fused, "lion", [p], [g], {"exp_avg": [m]}, [torch.tensor(0.0)],
              dict(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.0), round_keys=[key])
    exact = torch.tensor(1.5 - lr, dtype=torch.float32)  # 1.4990234375, exact in float32
    pattern = int(exact.view(torch.int32))
    for start, stop in ((0, 4096), (2**32 - 4096, 2**32 + 4096), (2**33 - 4096, 2**33 + 4096), (n - 4096, n)):
        index = torch.arange(start, stop, dtype=torch.int64)
        rounded = ((pattern + element_bits(key, 1, index)) & 0xFFFF0000).to(torch.int64)
        rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
        assert torch.equal(p[start:stop].cpu(), rounded.to(torch.bfloat16)), f"elements [{start}, {stop})"
    assert set(p[:4096].float().unique().tolist()) == {1.4921875, 1.5}
    del p, g, m
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# 8-bit optimizers: block-scaled FP8 states (csrc/cuda/fp8.cu) against the cpu backend
# ---------------------------------------------------------------------------
# Both backends decode a block (csrc/fp8_states.h), run step_math.h's update in
# float32 and encode the block back, but nvcc contracts a·b + c into one FMA
# where the C++ build (-ffp-contract=off) rounds twice: θ·(1−ηλ) + the step in
# Adam's and Lion's θ update, and Lion's momentum β2·m + (1−β2)·g.  (The host
# emulation, tools/cuda_emulation group "fp8", contracts nothing and is bitwise.)
# * AdamW8bit: m and v read only g and their own codes, through explicit fmas,
#   so codes and absmax are bitwise equal over every step; params within TOL.
# * Adam8bit and RAdam8bit (L2: g + λθ reads θ) and Lion8bit (its momentum): a state may differ
#   in its last bit, so a block's absmax by a few float32 ulps and a code by one
#   E4M3 step where the scaled value sits at a rounding boundary.  Stepped in
#   lockstep (each step from the cpu run's params and states): absmax within
#   FP8_ABSMAX_RTOL, codes equal or neighbouring E4M3 values (±0 alike), at most
#   FP8_CODE_DIFFER_FRACTION of them differing; params within TOL.
# Shapes: FP8 states for params of ≥ 4096 elements (a partial last block, a
# transposed one), full precision for the small one.
FP8_CLASSES = {"AdamW8bit": (af.AdamW8bit, {"weight_decay": 0.1}), "Adam8bit": (af.Adam8bit, {"weight_decay": 0.1}),
               "RAdam8bit": (af.RAdam8bit, {"weight_decay": 0.1}),
               "Lion8bit": (af.Lion8bit, {"lr": 1e-3, "weight_decay": 0.3})}
FP8_SHAPES = [(4096,), (70001,), (3, 9000), (37, 5), (64, 300)]
FP8_STEPS = 5
FP8_ABSMAX_RTOL = 2.0**-20
FP8_CODE_DIFFER_FRACTION = 1e-3
FP8_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fp8_params(dtype, device):
    """make_params(FP8_SHAPES) on ``device``, the last one transposed (dense, not contiguous)."""
    params = [p.detach() for p in make_params(dtype, 0, FP8_SHAPES)]
    params[-1] = params[-1].reshape(FP8_SHAPES[-1][::-1]).t()
    return [p.to(device).requires_grad_(True) for p in params]


def _fp8_pair(name, dtype, **extra):
    """[(params, optimizer)] of backend='cuda' and of backend='cpu' over the same values."""
    cls, kwargs = FP8_CLASSES[name]
    runs = []
    for device, backend in ((DEVICE, "cuda"), ("cpu", "cpu")):
        params = _fp8_params(dtype, device)
        runs.append((params, cls(param_groups(params, {"lr": 3e-3}, 2), backend=backend, **kwargs, **extra)))
    return runs


def _e4m3_ordered(codes):
    """E4M3 codes as integers in the order of their values (±0 both 0)."""
    c = codes.detach().cpu().to(torch.int32)
    return torch.where(c >= 128, -(c & 0x7F), c)


def _assert_fp8_states_close(cuda, cpu, exact, what):
    """Codes, absmax and full-precision states of two optimizers' params (see above)."""
    differ = total = 0
    for i, (sa, sb) in enumerate(zip(cuda, cpu)):
        assert set(sa) == set(sb), f"{what}: param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sorted(sa):
            a, b = sa[key], sb[key]
            if key == "step":
                assert float(a) == float(b), f"{what}: param {i}: step"
                continue
            assert a.device.type == DEVICE and a.dtype == b.dtype, f"{what}: param {i} state {key!r}"
            if exact and (a.dtype == torch.uint8 or key.endswith("_absmax")):
                assert torch.equal(a.cpu(), b), f"{what}: param {i} state {key!r} differs bitwise"
            elif b.numel() == 0:
                continue
            elif a.dtype == torch.uint8:
                gap = (_e4m3_ordered(a) - _e4m3_ordered(b)).abs()
                assert int(gap.max()) <= 1, f"{what}: param {i} {key!r}: codes {int(gap.max())} steps apart"
                differ += int((gap != 0).sum())
                total += b.numel()
            elif key.endswith("_absmax"):
                torch.testing.assert_close(a.cpu(), b, rtol=FP8_ABSMAX_RTOL, atol=0.0, equal_nan=True,
                                           msg=lambda m: f"{what}: param {i} {key!r}: {m}")
            else:  # full-precision states of a small param
                assert_close_scaled(a.cpu(), b, what=f"{what}: param {i} {key!r}", **TOL[b.dtype])
    assert differ <= FP8_CODE_DIFFER_FRACTION * max(total, 1), f"{what}: {differ} of {total} codes differ"


def _fp8_lockstep(name, dtype, steps=FP8_STEPS, **extra):
    """A cuda and a cpu optimizer stepped together; before every step but the first
    the cpu run's params and states are copied into the cuda run's.  Per step:
    (cuda params, cpu params, cuda states, cpu states, cpu params before the step)."""
    runs = _fp8_pair(name, dtype, **extra)
    (params_g, opt_g), (params_c, opt_c) = runs
    log = []
    for step in range(steps):
        if step > 0:
            _copy_run(params_c, opt_c, params_g, opt_g)
        grads = make_grads([p.detach() for p in params_c], step, 0)
        before = [p.detach().clone() for p in params_c]
        for params, opt in runs:
            set_grads(params, [g.to(params[0].device) for g in grads])
            opt.step()
        log.append(([p.detach().clone() for p in params_g], [p.detach().clone() for p in params_c],
                    [dict(opt_g.state[p]) for p in params_g], [dict(opt_c.state[p]) for p in params_c], before))
    return log


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(FP8_CLASSES))
def test_fp8_optimizers_match_cpu(name, dtype):
    """AdamW8bit, Adam8bit, RAdam8bit, Lion8bit with backend='cuda' against backend='cpu', in lockstep."""
    for step, (cuda, cpu, states_g, states_c, _) in enumerate(_fp8_lockstep(name, dtype)):
        what = f"{name} {dtype} step {step}"
        assert any(p.dtype == torch.uint8 for s in states_g for p in s.values() if torch.is_tensor(p)), what
        for i, (a, c) in enumerate(zip(cuda, cpu)):
            assert a.stride() == c.stride()
            assert_close_scaled(a.cpu(), c, what=f"{what}: param {i}", **TOL[dtype])
        _assert_fp8_states_close(states_g, states_c, name == "AdamW8bit", what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_fp8_adamw_states_are_bitwise_those_of_cpu(dtype):
    """AdamW8bit run freely for 10 steps: its codes and absmax never depend on θ, so
    they stay bitwise the cpu backend's; params within TOL."""
    runs = _fp8_pair("AdamW8bit", dtype)
    for step in range(10):
        grads = make_grads([p.detach().cpu() for p in runs[1][0]], step, 0)
        for params, opt in runs:
            set_grads(params, [g.to(params[0].device) for g in grads])
            opt.step()
    (params_g, opt_g), (params_c, opt_c) = runs
    for i, (a, c) in enumerate(zip(params_g, params_c)):
        assert_close_scaled(a.detach().cpu(), c.detach(), what=f"param {i}", **TOL[dtype])
    _assert_fp8_states_close([opt_g.state[p] for p in params_g], [opt_c.state[p] for p in params_c], True,
                             "AdamW8bit free run")


@pytest.mark.parametrize("name", list(FP8_CLASSES))
def test_fp8_telemetry_matches_cpu(name):
    """track_rms=True: rms() of the cuda backend against its own params (measured in
    float64) and against the cpu backend's rms() on the same steps."""
    runs = _fp8_pair(name, torch.float32, track_rms=True)
    (params_g, opt_g), (params_c, opt_c) = runs
    for step in range(3):
        grads = make_grads([p.detach().cpu() for p in params_c], step, 0)
        before = [p.detach().clone() for p in params_g]
        for params, opt in runs:
            set_grads(params, [g.to(params[0].device) for g in grads])
            opt.step()
        rms_g, rms_c = opt_g.rms(), opt_c.rms()
        cuda = [tuple(rms_g[p]) for p in params_g]
        _assert_rms_close(cuda, _measured_rms(opt_g, params_g, before), (TELEMETRY_OWN_RTOL[torch.float32],) * 2,
                          f"{name} step {step}: against its own params")
        _assert_rms_close(cuda, [tuple(rms_c[p]) for p in params_c], TELEMETRY_REF_RTOL[torch.float32],
                          f"{name} step {step}: against the cpu backend")
        assert all(update > 0 for _, update in cuda)


@pytest.mark.parametrize("name", list(FP8_CLASSES))
def test_fp8_stochastic_rounding_matches_cpu(name):
    """bf16_stochastic_round=True: in lockstep, every bfloat16 param equal to the cpu
    backend's or a neighbour (the float32 results may differ in their last bit, see
    above), states as in test_fp8_optimizers_match_cpu; two cuda runs bitwise equal."""
    extra = dict(bf16_stochastic_round=True, stochastic_round_seed=77)
    log = _fp8_lockstep(name, torch.bfloat16, **extra)
    for step, (cuda, cpu, states_g, states_c, before) in enumerate(log):
        _assert_sr_equal(cuda, cpu, False, f"{name} step {step}", before)
        _assert_fp8_states_close(states_g, states_c, name == "AdamW8bit", f"{name} step {step}")
    again = _fp8_lockstep(name, torch.bfloat16, **extra)
    for (a, *_), (b, *_) in zip(log, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _fp8_op_inputs(dtype, device, algorithm):
    """Params (one misaligned by an element, one transposed, partial last blocks, an
    empty one), grads and random nonzero FP8 states, the same values on any device."""
    from amos_fused import fp8_states
    shapes = [(37, 5), (0,), (10001,), (300, 64), (4096,), (1,)]
    params = [p.detach() for p in make_params(dtype, 4, shapes)]
    storage = torch.empty(params[2].numel() + 1, dtype=dtype)
    storage[1:] = params[2]
    params[2] = storage[1:]
    params[3] = params[3].reshape(64, 300).t()
    grads = [torch.empty_like(p).copy_(g).to(device) for p, g in zip(params, make_grads(params, 0, 4))]
    gen = torch.Generator().manual_seed(5)
    state = {}
    for key, root in (("exp_avg", False), ("exp_avg_sq", True))[: 2 if algorithm == "adam" else 1]:
        state[key], state[key + "_absmax"] = [], []
        for p in params:
            codes, absmax = fp8_states.new_state(p)
            value = torch.randn(p.shape, generator=gen).abs() * 1e-3 if root else torch.randn(p.shape, generator=gen)
            fp8_states.store(value, codes, absmax, root)
            state[key].append(codes.to(device))
            state[key + "_absmax"].append(absmax.to(device))
    moved = [p.to(device) for p in params]
    if device != "cpu":  # keep the misaligned view misaligned
        storage = storage.to(device)
        moved[2] = storage[1:]
    return moved, grads, state


@pytest.mark.parametrize("round_keys", [False, True], ids=["nearest", "sr"])
@pytest.mark.parametrize("config", ["adamw", "adam-l2", "lion"])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DTYPE_IDS.get)
def test_fp8_op_matches_cpu_op(dtype, config, round_keys):
    """The step_fp8 op itself on CUDA tensors against the CPU op, one step from random
    nonzero states, with telemetry (and round_keys for bfloat16): codes and absmax as in
    test_fp8_optimizers_match_cpu, params within TOL (neighbours with round_keys),
    the telemetry rows close, the step counters advanced."""
    from amos_fused.contracts import call_fp8_step
    if round_keys and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding applies to bfloat16 params")
    algorithm = "lion" if config == "lion" else "adam"
    hyper = (dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3) if algorithm == "lion"
             else dict(ADAMW_HYPER, weight_decay=0.1, decoupled=config == "adamw"))
    keys = ("exp_avg", "exp_avg_sq") if algorithm == "adam" else ("exp_avg",)
    out = []
    for device in (DEVICE, "cpu"):
        params, grads, state = _fp8_op_inputs(dtype, device, algorithm)
        steps = [torch.tensor(3.0) for _ in params]
        table = torch.full((len(params), 2), math.nan, dtype=torch.float64, device=device)
        call_fp8_step(torch.ops.amos_fused, algorithm, params, grads, state, steps, hyper, keys, telemetry=table,
                      round_keys=[(9 << 32) | i for i in range(len(params))] if round_keys else None)
        out.append((params, state, steps, table))
    (params_g, state_g, steps_g, table_g), (params_c, state_c, steps_c, table_c) = out
    assert params_g[2].data_ptr() % 16 != 0
    assert [float(s) for s in steps_g] == [4.0] * len(steps_g) == [float(s) for s in steps_c]
    if round_keys:
        _assert_sr_equal(params_g, params_c, False, f"{config} sr")
    else:
        for i, (a, c) in enumerate(zip(params_g, params_c)):
            assert_close_scaled(a.cpu(), c, what=f"{config}: param {i}", **TOL[dtype])
    per_param = [{key: state_g[key][i] for key in state_g} for i in range(len(params_g))]
    per_param_c = [{key: state_c[key][i] for key in state_c} for i in range(len(params_c))]
    _assert_fp8_states_close(per_param, per_param_c, config == "adamw", config)
    rtols = TELEMETRY_REF_RTOL[torch.float32 if dtype == torch.float32 else torch.bfloat16]
    _assert_rms_close(table_g.tolist(), table_c.tolist(), tuple(2 * r for r in rtols), f"{config}: telemetry")
    assert table_g[1].tolist() == [0.0, 0.0]


def test_fp8_op_found_inf_and_empty_bucket():
    """found_inf skips a step_fp8 call: nothing written but Σ(Δθ)² = 0; a bucket of
    empty tensors writes zero telemetry."""
    from amos_fused.contracts import call_fp8_step
    params, grads, state = _fp8_op_inputs(torch.float32, DEVICE, "adam")
    before = [t.clone() for t in params + state["exp_avg"] + state["exp_avg_sq_absmax"]]
    steps = [torch.tensor(3.0) for _ in params]
    table = torch.full((len(params), 2), math.nan, dtype=torch.float64, device=DEVICE)
    call_fp8_step(torch.ops.amos_fused, "adam", params, grads, state, steps, ADAMW_HYPER, ("exp_avg", "exp_avg_sq"),
                  found_inf=torch.tensor(1.0, device=DEVICE), telemetry=table)
    after = params + state["exp_avg"] + state["exp_avg_sq_absmax"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert [float(s) for s in steps] == [3.0] * len(steps)
    assert torch.all(table[:, 1] == 0) and torch.all(table[:, 0].isnan())
    empty = [torch.zeros(0, device=DEVICE), torch.zeros(0, 3, device=DEVICE)]
    codes = [torch.zeros_like(p, dtype=torch.uint8) for p in empty]
    absmax = [torch.zeros(0, device=DEVICE) for _ in empty]
    table = torch.full((2, 2), math.nan, dtype=torch.float64, device=DEVICE)
    call_fp8_step(torch.ops.amos_fused, "lion", empty, [torch.zeros_like(p) for p in empty],
                  {"exp_avg": codes, "exp_avg_absmax": absmax},
                  [torch.tensor(0.0) for _ in empty], dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0),
                  ("exp_avg",), telemetry=table)
    assert torch.equal(table, torch.zeros(2, 2, dtype=torch.float64, device=DEVICE))


# ---------------------------------------------------------------------------
# GradScaler on the host-coefficient step: one device sync per step
# ---------------------------------------------------------------------------

def test_a_grad_scaler_step_syncs_once_whatever_its_buckets(recwarn):
    """found_inf and grad_scale are read on the host once per step, both in one copy
    (not once per bucket and tensor): a step over two buckets (float32 and bfloat16
    params) under set_sync_debug_mode('warn') warns of one synchronizing call."""
    params = [torch.nn.Parameter(torch.randn(64, 33, device="cuda")),
              torch.nn.Parameter(torch.randn(70, device="cuda", dtype=torch.bfloat16))]
    opt = af.AdamW(params, lr=1e-3, backend="cuda")
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.grad_scale = torch.tensor(2.0, device="cuda")
        opt.found_inf = torch.tensor(0.0, device="cuda")
        if step == 0:  # the first step builds the tables
            opt.step()
            torch.cuda.synchronize()
            continue
        recwarn.clear()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # (set_sync_debug_mode's own notice that it is a prototype is no sync)
        syncs = [w for w in recwarn.list if str(w.message).startswith("called a synchronizing")]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
