"""torch.amp.GradScaler with the amos_fused optimizers (`grad_scale` / `found_inf`
like torch's fused kernels).

Our optimizers set ``_step_supports_amp_scaling``: GradScaler.step does not
unscale the grads itself but hands the optimizer ``grad_scale`` and ``found_inf``;
the step must unscale in-kernel (before clipping, decay, moments ...) and skip
everything when found_inf is set.  Checked for every optimizer on both backends:

* a step whose grads hold an inf/nan is skipped: params and every state tensor
  (``step`` included) bitwise unchanged, and GradScaler halves its scale;
* every other step equals the same optimizer fed the unscaled grads directly
  (fp32; the scale is a power of two, so scaling and unscaling are exact and the
  only tolerance needed, rtol=1e-6, covers nothing but the order of operations);
* the same with ``scaler.unscale_(opt)`` first (the grad-clipping recipe), where
  the optimizer gets ``grad_scale=None`` and the grads already unscaled;
* AdamW driven by GradScaler follows torch.optim.AdamW(foreach=False) driven by
  its own GradScaler (which unscales the grads itself), at the float32 tolerance
  of test_cpu.py (torch.testing defaults).
"""
from __future__ import annotations

import pytest
import torch

import amos_fused as af

from conftest import SHAPES, assert_unchanged, clone_params, make_grads, make_params, snapshot, states_of
from registry import CASES, SCALER_TOL, backends

# Adam-type directions m̂/(sqrt(v̂)+ε) are invariant to the grad scale but for ε:
# a large ε (and L2 decay, and Amos's clip_value) makes a step that forgets to
# unscale visibly different.  (Lion's sign update is invariant to a constant
# scale, but its m mixes steps taken at different scales: the scale grows during
# the run.)  Checked by hand: with the unscaling removed, every case but the
# unscale_-first ones fails.
# test id -> registry case
OPTIMIZERS = {
    "adamw": "adamw-eps1e-3",
    "radam": "radam-eps1e-3",  # L2: g + λθ
    "lion": "lion-lr1e-3",
    "amos": "amos-all-momentum-clip",  # clip_value: the grads must be unscaled before they are clipped
    "scaled_adamw": "scaled-half_life5-eps1e-3",
    "lamb": "lamb-eps1e-3",
}
BACKENDS = backends("cpu", "reference")  # the backends that step CPU tensors (GPU ones: test_cuda.py)
STEPS = 9
INF_STEPS = {0: float("inf"), 4: float("nan"), 5: float("-inf")}  # step -> bad value injected
TOL = SCALER_TOL


def _grads(params, step):
    grads = make_grads(params, step)
    if step in INF_STEPS:
        grads[2].view(-1)[7] = INF_STEPS[step]  # one element of the (37, 5) param
    return grads


def _backward(params, grads, scaler=None):
    """loss = Σ⟨p, g⟩, so d loss/d p = g (times the scale): grads through autograd,
    exactly like a training step."""
    for p in params:
        p.grad = None
    loss = sum((p * g).sum() for p, g in zip(params, grads))
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _assert_same(params_a, opt_a, params_b, opt_b, tol=TOL):
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(pa.detach(), pb.detach(), msg=lambda m, i=i: f"param {i}: {m}", **tol)
    for i, (sa, sb) in enumerate(zip(states_of(opt_a, params_a), states_of(opt_b, params_b))):
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"param {i}: step"
            else:
                torch.testing.assert_close(sa[key], sb[key], msg=lambda m, i=i, k=key: f"param {i} {k}: {m}",
                                           **tol)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled_grads", "unscale_first"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler(name, backend, unscale_first):
    case = CASES[OPTIMIZERS[name]]
    base = make_params(torch.float32, 0, SHAPES)
    params, plain_params = clone_params(base), clone_params(base)
    opt = case.make(params, backend)
    plain = case.make(plain_params, backend)
    # growth_interval=2: the scale also grows during the run, so the step must read
    # the current scale every time
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scales = set()
    for step in range(STEPS):
        grads = _grads(base, step)
        scale = scaler.get_scale()
        scales.add(scale)
        _backward(params, grads, scaler)
        if step in INF_STEPS:
            before = snapshot(opt, params)
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if step in INF_STEPS:
            assert scaler.get_scale() == scale / 2, "GradScaler did not back off"
            if step == 0:  # no state yet: it may be created, but nothing may advance
                for p, p0 in zip(params, before[0]):
                    assert torch.equal(p.detach(), p0)
                for state in states_of(opt, params):
                    assert all(float(v) == 0 for k, v in state.items() if k == "step")
                    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k != "step")
            else:
                assert_unchanged(before, opt, params)
            continue
        _backward(plain_params, grads)
        plain.step()
        _assert_same(params, opt, plain_params, plain)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert len(scales) >= 3
    # after the skipped first step, every step counter counts only the real steps
    assert float(opt.state[params[3]]["step"]) == STEPS - len(INF_STEPS)
    assert not torch.equal(params[3].detach(), base[3].detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_grad_scaler_matches_torch(backend, amsgrad):
    base = make_params(torch.float32, 1, SHAPES)
    ours_params, torch_params = clone_params(base), clone_params(base)
    case = CASES["adamw-eps1e-3"]
    ours = case.make(ours_params, backend, amsgrad=amsgrad)
    theirs = case.torch_factory(foreach=False, amsgrad=amsgrad)(torch_params)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    for step in range(STEPS):
        grads = _grads(base, step)
        for ps, opt, scaler in ((ours_params, ours, scalers[0]), (torch_params, theirs, scalers[1])):
            _backward(ps, grads, scaler)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        if step == 0:  # skipped: torch creates no state, ours may hold zeros; params untouched
            for p, q in zip(ours_params, base):
                assert torch.equal(p.detach(), q.detach())
            continue
        _assert_same(ours_params, ours, torch_params, theirs, tol={})
    assert float(ours.state[ours_params[3]]["step"]) == STEPS - len(INF_STEPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["adamw8bit"])
def test_grads_after_the_step_are_those_of_torchs_fused_step(name, backend):
    """torch's fused AdamW unscales the grads in its kernel and writes them back:
    after ``scaler.step`` the grads are unscaled, and after a step skipped for
    found_inf they are left as scaled.  Ours leave them alike, bitwise."""
    base = make_params(torch.float32, 1, [(37, 5), (4096 + 3,)])
    ours_params, torch_params = clone_params(base), clone_params(base)
    if name == "adamw8bit":
        import amos_fused as af
        ours = af.AdamW8bit(ours_params, lr=1e-3, backend=backend)
    else:
        ours = CASES[OPTIMIZERS[name]].make(ours_params, backend)
    theirs = torch.optim.AdamW(torch_params, lr=1e-3, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    for step in range(3):
        grads = make_grads(base, step)
        if step == 1:
            grads[0].view(-1)[3] = float("inf")
        for ps, opt, scaler in ((ours_params, ours, scalers[0]), (torch_params, theirs, scalers[1])):
            _backward(ps, grads, scaler)
            scaler.step(opt)
            scaler.update()
        for p, q in zip(ours_params, torch_params):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
        scaled = scalers[0].get_scale() * (2.0 if step == 1 else 1.0)  # (the skip halved it)
        expected = grads[1] * (scaled if step == 1 else 1.0)
        torch.testing.assert_close(ours_params[1].grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16-masters"])
def test_a_grad_that_cannot_be_unscaled_in_place_is_refused_before_any_write(dtype, backend):
    """The step divides the stepped grads in place once it has run: a grad whose
    elements share memory (an expanded view) is refused naming its param before
    group 0 is stepped or any grad divided; without GradScaler it is stepped."""
    import amos_fused as af
    a, b = torch.nn.Parameter(torch.randn(5, 7).to(dtype)), torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend,
                   master_weights=dtype == torch.bfloat16)
    a.grad, b.grad = (torch.randn(5, 7) * 4).to(dtype), torch.tensor([8.0], dtype=dtype).expand(4, 3)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)  # as GradScaler.step sets them
    before, grad = snapshot(opt, [a, b]), a.grad.clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*its grad has elements that "
                                         r"share memory \(strides \(0, 0\)\)"):
        opt.step()
    assert_unchanged(before, opt, [a, b])
    assert torch.equal(a.grad, grad)
    opt.grad_scale = opt.found_inf = None  # nothing is written to the grads then
    opt.step()
    assert float(opt.state[b]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_made_under_inference_mode_is_stepped_and_unscaled(backend):
    import amos_fused as af
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt, twin = af.AdamW([a], lr=1e-2, backend=backend), af.AdamW([b], lr=1e-2, backend=backend)
    with torch.inference_mode():
        a.grad = torch.full((4, 3), 8.0)
    b.grad = torch.full((4, 3), 2.0)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    opt.step()
    twin.step()
    assert torch.equal(a, b) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_two_params_share_is_unscaled_once(backend):
    """Both params step on the unscaled grad (the kernels read it before it is
    divided), and the grad is left unscaled once, not divided by the scale twice."""
    import amos_fused as af
    base = [torch.randn(6, 5), torch.randn(6, 5)]
    shared = torch.randn(6, 5)
    ours, twins = [torch.nn.Parameter(t.clone()) for t in base], [torch.nn.Parameter(t.clone()) for t in base]
    opt = af.AdamW(ours, lr=1e-2, backend=backend)
    twin = af.AdamW(twins, lr=1e-2, backend=backend)
    ours[0].grad = ours[1].grad = shared * 8
    for p in twins:
        p.grad = shared.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    twin.step()
    for p, q in zip(ours, twins):
        assert torch.equal(p, q)
    assert ours[0].grad is ours[1].grad and torch.equal(ours[0].grad, shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("views", ["same", "overlapping", "strided-overlapping", "interleaved", "disjoint"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_that_are_views_of_one_memory_are_unscaled_once_per_element(backend, views, dtype):
    """Grads that are distinct tensors over one memory (two views of it, as a user's
    own buffer hands them out) are left unscaled once per element, as one grad
    tensor two params share is; each param steps on its unscaled grad."""
    memory = (torch.randn(62, generator=torch.Generator().manual_seed(3)) * 8).to(dtype)
    first, second = {
        "same": (memory[:30], memory[:30].view(5, 6)),
        "overlapping": (memory[:30], memory[10:40].view(5, 6)),
        "strided-overlapping": (memory[0:60:2], memory[2:62:2].unflatten(0, (5, 6))),  # 29 elements shared
        "interleaved": (memory[0:60:2], memory[1:61:2].unflatten(0, (5, 6))),  # spans overlap, elements do not
        "disjoint": (memory[:20], memory[20:40]),
    }[views]
    shapes = (tuple(first.shape), tuple(second.shape))
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    twins = [torch.nn.Parameter(v.clone()) for v in values]
    expected = memory.float().div(8).to(dtype)  # (÷8 is exact: 1/8 in float32, rounded once)
    touched = torch.zeros(memory.shape, dtype=torch.bool)
    for view in (first, second):
        touched.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
    expected = torch.where(touched, expected, memory)
    opt, twin = af.AdamW(ours, lr=1e-2, backend=backend), af.AdamW(twins, lr=1e-2, backend=backend)
    ours[0].grad, ours[1].grad = first, second
    for p, view in zip(twins, (first, second)):
        p.grad = view.float().div(8).to(dtype)
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    twin.step()
    for p, q in zip(ours, twins):
        assert torch.equal(p, q)
    assert torch.equal(memory, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_optimizer_without_grads_this_step_under_a_shared_scaler(backend):
    """Two optimizers, one GradScaler, one sub-model unused this iteration (a GAN's
    other half): GradScaler hands the idle optimizer found_inf = 0 (an int: the sum
    over no device), which torch's fused step takes; so does ours, and steps nothing."""
    import amos_fused as af
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    before = b.detach().clone()
    opt1 = af.AdamW([a], lr=1e-2, backend=backend)
    opt2 = af.AdamW([b], lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale((a * 2).sum()).backward()
    scaler.step(opt1)
    scaler.step(opt2)
    scaler.update()
    assert scaler.get_scale() == 2.0**12
    assert torch.equal(b.detach(), before) and b not in opt2.state
    torch.testing.assert_close(a.grad, torch.full_like(a, 2.0), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["AdamW", "Lion", "AdamW8bit", "Lion8bit"])
def test_bf16_grads_unscaled_in_float32_by_the_reference_as_by_the_kernels(name):
    """A scale that is no power of two: 1/scale·g is rounded once, in the step's
    float32, on the reference as in the kernels (not to bf16 first), so both give
    bitwise the same params and states."""
    make = getattr(af, name)
    out = {}
    for backend in ("reference", "cpu"):
        p = torch.randn(4352, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_(True)
        opt = make([p], lr=1e-2, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
        w = torch.randn(4352, generator=torch.Generator().manual_seed(1)).bfloat16()
        for _ in range(2):
            opt.zero_grad()
            scaler.scale((p * w).sum()).backward()
            scaler.step(opt)
            scaler.update()
        out[backend] = [p.detach().clone()] + [v.clone() for k, v in sorted(opt.state[p].items())]
    for a, b in zip(out["reference"], out["cpu"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.0, -0.0, 1e-30])
def test_a_grad_scale_read_as_zero_is_stepped_as_torch_steps_it(scale):
    """A scale that backed off to 0 (or reads as 0 in its dtype) with no inf found:
    torch's fused step divides by it, giving inf/NaN; the kernels and the
    reference multiply by 1/0 = ±inf alike, and the reference does not raise."""
    results = []
    for backend in ("reference", "cpu", "torch"):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
        p.grad = torch.tensor([0.0, 1e-3, -2e-3, 0.0])
        opt = torch.optim.AdamW([p], fused=True) if backend == "torch" else af.AdamW([p], backend=backend)
        stored = torch.tensor(scale, dtype=torch.float16 if scale == 1e-30 else torch.float32)  # 1e-30: 0
        opt.grad_scale = stored.float() if backend == "torch" else stored  # (torch's fused step: float32 only)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        results.append(p.detach().clone())
    for other in results[1:]:
        assert torch.equal(other.isnan(), results[0].isnan())
        assert torch.equal(torch.nan_to_num(other), torch.nan_to_num(results[0]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("scale", [1000.0, 3.0, 0.75, 2.0 ** 12])
def test_the_grads_left_after_the_step_are_the_ones_it_stepped_with(scale, backend):
    """With β1 = 0 the first moment after one step is the unscaled grad the step
    used: the grads left behind are that same value, g·(1/s), whatever the scale
    (for GradScaler's power-of-two scales, also torch's fused g/s)."""
    p = torch.nn.Parameter(torch.randn(10_000))
    opt = af.AdamW([p], lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0, backend=backend)
    scaled = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * scale
    p.grad = scaled.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg"], p.grad)
    assert torch.equal(p.grad, scaled * torch.tensor(1.0 / scale, dtype=torch.float32))
    if scale == 2.0 ** 12:
        assert torch.equal(p.grad, scaled / scale)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_grads_are_left_as_the_float32_product_rounded_once(dtype, capturable):
    """g·(1/s) taken in float32 (1/s rounded to float32, not to the grad's dtype) and
    rounded once into the grad, on the host and the capturable (device) paths alike."""
    backend = "triton" if capturable else "cpu"
    if backend not in af.available_backends():
        pytest.skip("the triton backend is not available here")
    p = torch.nn.Parameter(torch.randn(1000).to(dtype))
    opt = af.AdamW([p], lr=1e-3, backend=backend, capturable=capturable)
    scaled = (torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    p.grad = scaled.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(3.0), torch.tensor(0.0)
    opt.step()
    assert torch.equal(p.grad, (scaled.float() * torch.tensor(1 / 3.0, dtype=torch.float32)).to(dtype))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_grads_are_left_whole(dtype, backend):
    p = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    g = torch.randn(4, dtype=dtype) * 10
    p.grad = g.clone()
    opt = af.AdamW([p], lr=1e-3, backend=backend)
    opt.grad_scale, opt.found_inf = torch.tensor(3.0), torch.tensor(0.0)
    opt.step()
    assert torch.equal(p.grad, g * (1 / 3.0))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_complex_grads_are_left_with_their_signed_zeros(backend):
    """(each real and imaginary part times 1/s, as the step reads their real view)"""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    g = torch.view_as_complex(torch.tensor([[-0.0, -1.0], [-0.0, 2.0], [3.0, -0.0], [1.0, 1.0]]))
    p.grad = g.clone()
    opt = af.AdamW([p], lr=1e-3, backend=backend)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    opt.step()
    assert torch.equal(torch.view_as_real(p.grad).view(torch.int32), (torch.view_as_real(g) * 0.5).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_that_are_all_negated_views_are_unscaled(backend, dtype):
    """A dtype whose every grad is a lazily negated view (x.conj().imag makes them)
    is unscaled by its own multiplies: no foreach call is left with an empty list."""
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = af.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch._neg_view(torch.full((4,), 8.0, dtype=dtype))
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    assert p.grad.is_neg() and torch.equal(p.grad, torch.full((4,), -1.0, dtype=dtype))
    assert not torch.equal(p.detach(), torch.ones(4, dtype=dtype))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_skipped_step_runs_the_step_hooks_as_torchs_fused_step_does(backend):
    """GradScaler calls step() for a step it skips when the optimizer takes
    grad_scale and found_inf (torch's fused optimizers, and ours): the step hooks run
    for it, as with torch.optim.AdamW(fused=True), and the count and params stay."""
    runs = {}
    for name, make in [("torch fused", lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)),
                       ("ours", lambda ps: af.AdamW(ps, lr=0.01, backend=backend))]:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        opt = make([p])
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        for it in range(3):
            opt.zero_grad()
            loss = (p ** 2).sum() * (float("inf") if it == 1 else 1.0)  # iteration 1 is skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs[name] = (calls, float(opt.state[p]["step"]), p.detach().clone())
    assert runs["ours"][0] == runs["torch fused"][0] == ["pre", "post"] * 3
    assert runs["ours"][1] == runs["torch fused"][1] == 2.0
    torch.testing.assert_close(runs["ours"][2], runs["torch fused"][2], rtol=0, atol=1e-6)
