"""Tensors a step would write that it must not: inference tensors outside
inference mode (torch.optim raises on their in-place update), a step counter
sharing memory with its own param, grad or states, sparse params; and values the
step's float32 math cannot hold (per-param values beyond float32's range,
ScaledAdamW's q so small that lr²/(2q) overflows).  Each is refused by name
before anything is written, on every backend."""
import pytest
import torch

import amos_fused as af

from test_step_corners import _assert_unchanged, _grads, _snapshot

BACKENDS = ["cpu", "reference"]

CLASSES = {
    "AdamW": lambda ps, b: af.AdamW(ps, lr=1e-2, backend=b),
    "Lion": lambda ps, b: af.Lion(ps, lr=1e-3, backend=b),
    "Amos": lambda ps, b: af.Amos(ps, lr=1e-2, eta=0.1, momentum=0.9, backend=b),
    "ScaledAdamW": lambda ps, b: af.ScaledAdamW(ps, lr=1e-3, half_life=10, backend=b),
    "AdamW8bit": lambda ps, b: af.AdamW8bit(ps, lr=1e-2, backend=b),
    "AdamW-master": lambda ps, b: af.AdamW(ps, lr=1e-2, master_weights=True, backend=b),
}


def _params(name, n=4):
    dtype = torch.bfloat16 if name == "AdamW-master" else torch.float32
    return [torch.nn.Parameter(torch.randn(n, 5).to(dtype)) for _ in range(2)]


def _refused(opt, error, match):
    snapshot = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_an_inference_param_is_refused_before_any_write(name, backend):
    a, b = _params(name)
    with torch.inference_mode():
        c = torch.nn.Parameter(b.detach().clone())
    assert c.is_inference()
    opt = CLASSES[name]([{"params": [a]}, {"params": [c]}], backend)
    _grads([a, c], 0)
    _refused(opt, RuntimeError, r"param_groups\[1\]\['params'\]\[0\].*the param is an inference tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_inference_states_are_refused_before_any_write(name, backend):
    """States replaced under torch.inference_mode() are inference tensors (a load
    there makes normal ones: test_load_corners.py)."""
    a, b = _params(name, n=1024)  # (AdamW8bit: FP8 states from 4096 elements)
    opt = CLASSES[name]([{"params": [a]}, {"params": [b]}], backend)
    _grads([a, b], 0)
    opt.step()
    with torch.inference_mode():
        for st in opt.state.values():
            st.update({key: value.clone() for key, value in st.items()})
    assert opt.state[b]["step"].is_inference()
    _grads([a, b], 1)
    _refused(opt, RuntimeError, r"param_groups\[0\]\['params'\]\[0\].*state\['\w+'\] is an inference tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [af.AdamW, af.AdamW8bit], ids=lambda c: c.__name__)
def test_an_inference_master_is_refused_by_its_own_name(cls, backend):
    """A float32 master that is an inference tensor (edited under
    torch.inference_mode()), its param not, is named as state['master_param']: the
    tensor to clone, not the param."""
    a, b = [torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16)) for _ in range(2)]
    opt = cls([{"params": [a]}, {"params": [b]}], lr=1e-2, master_weights=True, backend=backend)
    _grads([a, b], 0)
    opt.step()
    with torch.inference_mode():
        opt.state[b]["master_param"] = opt.state[b]["master_param"].clone()
    assert opt.state[b]["master_param"].is_inference() and not b.is_inference()
    _grads([a, b], 1)
    _refused(opt, RuntimeError,
             r"param_groups\[1\]\['params'\]\[0\].*state\['master_param'\] is an inference tensor")


FP8_CLASSES = {
    "AdamW8bit": lambda ps, b: af.AdamW8bit(ps, lr=1e-2, backend=b),
    "Lion8bit": lambda ps, b: af.Lion8bit(ps, lr=1e-3, backend=b),
    "Amos8bit": lambda ps, b: af.Amos8bit(ps, lr=1e-2, eta=0.1, momentum=0.9, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["codes", "absmax"])
@pytest.mark.parametrize("name", list(FP8_CLASSES))
def test_inference_fp8_states_are_refused_before_any_write(name, which, backend):
    """FP8 codes or an absmax that are inference tensors (made under
    torch.inference_mode(): an edited state, or codes re-laid by a step taken
    there), their counter not, are refused by name before any group is stepped,
    as the full-precision states are; inside inference mode they step."""
    a, b = _params(name, n=1024)  # FP8 states from 4096 elements
    opt = FP8_CLASSES[name]([{"params": [a]}, {"params": [b]}], backend)
    _grads([a, b], 0)
    opt.step()
    key = "mu" if name == "Amos8bit" else "exp_avg"
    key = key if which == "codes" else key + "_absmax"
    with torch.inference_mode():
        opt.state[b][key] = opt.state[b][key].clone()
    assert opt.state[b][key].is_inference() and not opt.state[b]["step"].is_inference()
    _grads([a, b], 1)
    _refused(opt, RuntimeError, rf"param_groups\[1\]\['params'\]\[0\].*state\['{key}'\] is an inference tensor")
    with torch.inference_mode():
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_tensors_step_inside_inference_mode(backend):
    """As torch.optim: inside inference mode their in-place updates are allowed,
    and the step is the one a normal tensor gets."""
    a = torch.nn.Parameter(torch.randn(4, 5))
    with torch.inference_mode():
        b = a.detach().clone()
    ref = af.AdamW([a], lr=1e-2, backend=backend)
    opt = af.AdamW([b], lr=1e-2, backend=backend)
    a.grad = torch.randn(4, 5)
    with torch.inference_mode():
        b.grad = a.grad.clone()
        opt.step()
    ref.step()
    assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["param", "grad", "exp_avg", "exp_avg_sq"])
def test_a_step_counter_inside_its_own_param_grad_or_state_is_refused(backend, target):
    """state['step'] = p.data[0] (or an element of the grad or a state): the step
    would count in memory that the update also writes or reads."""
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
    _grads([a, b], 0)
    opt.step()
    host = {"param": b.data, "grad": b.grad, "exp_avg": opt.state[b]["exp_avg"],
            "exp_avg_sq": opt.state[b]["exp_avg_sq"]}[target]
    host[2] = 1.0
    opt.state[b]["step"] = host[2]
    _refused(opt, ValueError, r"param_groups\[1\]\['params'\]\[0\].*state\['step'\] shares memory with its param")


@pytest.mark.parametrize("add_later", [False, True])
def test_a_sparse_param_is_refused_by_name(add_later):
    dense = torch.nn.Parameter(torch.randn(3))
    sparse = torch.nn.Parameter(torch.randn(3, 3).to_sparse())
    if add_later:
        opt = af.AdamW([dense], lr=1e-2)
        with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is a torch.sparse_coo tensor"):
            opt.add_param_group({"params": [sparse]})
        assert len(opt.param_groups) == 1
    else:
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a torch.sparse_coo tensor"):
            af.AdamW([dense, sparse], lr=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,key", [
    (lambda ps, b, v: af.Amos(ps, lr=1e-2, eta=v, backend=b), "eta"),
    (lambda ps, b, v: af.ScaledAdamW([{"params": ps, "init_norm": v}], lr=1e-3, backend=b), "init_norm"),
], ids=["Amos-eta", "ScaledAdamW-init_norm"])
def test_per_param_values_beyond_float32s_range_are_refused(make, key, backend):
    """One value for every param, or one per param, set at construction or edited
    later: refused for float32 params (they would step as Inf), not for float64."""
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: Invalid {key}: 1e\+300 \(beyond float32's range"):
        make([a, b], backend, 1e300)
    opt = make([a, b], backend, 0.5)
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[0][key] = (0.5, 1e300)
    _grads([a, b], 1)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"Invalid {key}\[1\] \(param_groups\[0\]\['params'\]\[1\]'s\): 1e\+300"):
        opt.step()
    _assert_unchanged(opt, snapshot)
    wide = [torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))]
    make(wide, backend, 1e300)  # float64 params step in float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,key", [
    (lambda ps, b, v: af.Amos(ps, lr=1e-2, eta=v, backend=b), "eta"),
    (lambda ps, b, v: af.Amos8bit(ps, lr=1e-2, eta=v, momentum=0.9, backend=b), "eta"),
    (lambda ps, b, v: af.ScaledAdamW([{"params": ps, "init_norm": v}], lr=1e-3, backend=b), "init_norm"),
], ids=["Amos-eta", "Amos8bit-eta", "ScaledAdamW-init_norm"])
def test_per_param_values_edited_between_steps_are_checked_as_at_construction(make, key, backend):
    """A string per-param value ('0.5', or in a tuple), refused at construction, is
    refused at the step too (TypeError and ValueError alike), rather than read as
    float('0.5'); a one-element tensor in a per-param tuple, edited in place to a
    value beyond float32's range, is refused at the next step as a new tuple holding
    it is; nothing is written either way."""
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(4, 5))
    for bad in ("0.5", ("0.5", 0.25)):
        with pytest.raises(TypeError, match=rf"{key}"):
            make([torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(4, 5))], backend, bad)
    opt = make([a, b], backend, (torch.tensor(0.5), torch.tensor(0.25)))
    _grads([a, b], 0)
    opt.step()
    for bad in ("0.5", ("0.5", 0.25)):
        opt.param_groups[0][key] = bad
        _grads([a, b], 1)
        snapshot = _snapshot(opt)
        with pytest.raises(TypeError, match=rf"param_groups\[0\]\['{key}'\] must be a number") as raised:
            opt.step()
        assert isinstance(raised.value, ValueError)
        _assert_unchanged(opt, snapshot)
    values = (torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    opt.param_groups[0][key] = values
    opt.step()
    values[0].fill_(1e300)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"Invalid {key}\[0\] \(param_groups\[0\]\['params'\]\[0\]'s\): 1e\+300"):
        opt.step()
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_adamw_q_whose_decay_rate_overflows_is_refused_for_float32_params(backend):
    """ρ = lr²/(2q): q=1e-320 passes 'q > 0' but ρ is Inf even in float64, q=1e-45
    gives a ρ beyond float32's range: both refused for float32 params, whose step
    computes in float32.  float64 params take them (their step gives Inf, as with
    any finite lr whose lr² overflows)."""
    p = torch.nn.Parameter(torch.randn(4, 5))
    for q in (1e-320, 1e-45):
        with pytest.raises(ValueError, match=r"Invalid decay rate lr²/\(2q\): .* \(beyond float32's range"):
            af.ScaledAdamW([p], lr=1e-3, q=q, backend=backend)
    opt = af.ScaledAdamW([p], lr=1e-3, backend=backend)
    _grads([p], 0)
    opt.step()
    opt.param_groups[0]["q"] = 1e-320
    _grads([p], 1)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid decay rate lr²/\(2q\): inf"):
        opt.step()
    _assert_unchanged(opt, snapshot)
    af.ScaledAdamW([torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))], lr=1e-3, q=1e-320,
                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amos_epsilon_whose_reciprocal_overflows_is_refused(backend):
    """epsilon > 0 is Amos's floor of v in r = (1 − β^t)/max(v, ε): an epsilon
    whose reciprocal overflows the step's dtype (float32 for float32 params,
    float64 for float64 ones) makes r Inf for a slot below it, and a zero grad's
    Inf·0 a NaN in θ and b for good.  Refused there, at construction and at a
    step (nothing written); the smallest accepted value keeps a zero-grad element
    where it is over many steps."""
    for dtype, refused, smallest in ((torch.float32, (0.0, 1e-50, 2.0 ** -150, 2.0 ** -149, 1e-40, 2.0 ** -128),
                                      2.93874e-39),
                                     (torch.float64, (0.0, 1e-310, 5.5e-309), 5.563e-309)):
        p = torch.nn.Parameter(torch.ones(3, dtype=dtype))
        for value in refused:
            with pytest.raises(ValueError, match=rf"Invalid epsilon: {value}"):
                af.Amos([p], lr=1e-2, eta=0.1, epsilon=value, backend=backend)
        opt = af.Amos([p], lr=0.1, eta=0.5, epsilon=smallest, backend=backend)
        for _ in range(60):
            p.grad = torch.tensor([0.0, 1.0, -1.0], dtype=dtype)
            opt.step()
        assert p[0].item() == 1.0 and opt.state[p]["b"][0].item() == 0.0, (dtype, p, opt.state[p]["b"])
        assert torch.isfinite(p).all()
        opt.param_groups[0]["epsilon"] = refused[-1]
        snapshot = _snapshot(opt)
        with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid epsilon: .*reciprocal overflows"):
            opt.step()
        _assert_unchanged(opt, snapshot)
    mixed = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64)), torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match=r"reciprocal overflows torch.float32"):
        af.Amos(mixed, lr=1e-2, eta=0.1, epsilon=1e-300, backend=backend)
    af.Amos([p], lr=1e-2, eta=0.1, epsilon=2.0 ** -149, backend=backend)
    af.Amos([torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))], lr=1e-2, eta=0.1, epsilon=1e-50,
            backend=backend)


def test_amos_epsilon_refused_under_flush_to_zero_names_the_smallest_normal():
    """With torch.set_flush_denormal(True) a subnormal epsilon reads as 0: the
    smallest accepted value is then float32's smallest normal, which the error
    names (not 1/FLT_MAX, a subnormal)."""
    p = torch.nn.Parameter(torch.ones(3))
    supported = torch.set_flush_denormal(True)
    if not supported:
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        with pytest.raises(ValueError, match=r"Invalid epsilon: 3e-39 .*at least about 1.175e-38"):
            af.Amos([p], lr=1e-2, eta=0.1, epsilon=3e-39)
    finally:
        torch.set_flush_denormal(False)


def _state_keys(opt, p):
    return [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.numel() > 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_a_state_shared_by_two_params_is_refused_before_any_write(name, backend):
    """One param's state tensor given to another (whole, or a view of it), in the same
    group or another: torch.optim steps the params one after the other, the fused
    kernels in parallel, so the result would depend on the thread count.  Refused,
    naming both params, with nothing written; so is a grad that is another param's
    state (a grad shared by two params is fine: grads are only read)."""
    a, b = _params(name, n=1024)
    opt = CLASSES[name]([{"params": [a]}, {"params": [b]}], backend)
    _grads([a, b], 0)
    opt.step()
    for key in _state_keys(opt, a):
        kept = opt.state[b][key]
        opt.state[b][key] = opt.state[a][key]
        _grads([a, b], 1)
        _refused(opt, ValueError, rf"param_groups\[1\]\['params'\]\[0\].*: state\['{key}'\] shares memory with "
                                  rf"state\['{key}'\] of param_groups\[0\]\['params'\]\[0\]")
        opt.state[b][key] = kept
    like = [k for k in _state_keys(opt, a) if opt.state[a][k].dtype == a.dtype and opt.state[a][k].shape == a.shape]
    if like:  # (not for FP8 codes nor for the float32 states of bfloat16 params with masters)
        key = like[0]
        b.grad = opt.state[a][key]
        _refused(opt, ValueError, rf"param_groups\[1\]\['params'\]\[0\].*: the grad shares memory with "
                                  rf"state\['{key}'\] of param_groups\[0\]\['params'\]\[0\]")
    _grads([a], 2)
    b.grad = a.grad
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_lazy_clones_of_another_params_state_step_as_copies(name, backend):
    """A copy-on-write clone (torch._lazy_clone) of one param's state given to
    another shares memory only until one of them is written: the step takes it as
    the copy it is (each gets memory of its own when written), as torch.optim would."""
    a, b = _params(name, n=1024)
    twin_a, twin_b = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt, twin = CLASSES[name]([a, b], backend), CLASSES[name]([twin_a, twin_b], backend)
    for ps in ([a, b], [twin_a, twin_b]):
        _grads(ps, 0)
    opt.step()
    twin.step()
    for key in _state_keys(opt, a):
        opt.state[b][key] = torch._lazy_clone(opt.state[a][key])
        twin.state[twin_b][key] = twin.state[twin_a][key].clone()
    for ps in ([a, b], [twin_a, twin_b]):
        _grads(ps, 1)
    opt.step()
    twin.step()
    for p, q in ((a, twin_a), (b, twin_b)):
        assert torch.equal(p, q)
        for key in _state_keys(opt, a):
            assert torch.equal(opt.state[p][key], twin.state[q][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [af.AdamW8bit, af.Lion8bit], ids=lambda c: c.__name__)
def test_a_step_counter_viewing_an_absmax_is_refused(cls, backend):
    """The 8-bit states' absmax are written by the step too: a counter that views one
    would be written twice."""
    p = torch.nn.Parameter(torch.randn(64, 70))
    opt = cls([p], lr=1e-3, backend=backend)
    _grads([p], 0)
    opt.step()
    key = next(k for k in opt.state[p] if k.endswith("_absmax"))
    opt.state[p]["step"] = opt.state[p][key].reshape(-1)[:1].view(())
    _grads([p], 1)
    _refused(opt, ValueError, rf"state\['{key}'\] shares memory with state\['step'\] of the same param")


def test_torch_flags_and_params_of_no_clear_value_are_named():
    """A torch flag holding something that is neither True nor False (a two-element
    tensor, a string), an int beyond float64's range, a param replaced by None:
    refused with the group, the name and the value, before anything is written."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = af.AdamW([p], lr=1e-2)
    _grads([p], 0)
    opt.step()
    for key, value, match in (("fused", torch.tensor([1, 0]), r"Invalid fused: tensor\(\[1, 0\]\)"),
                              ("differentiable", "no", r"Invalid differentiable: 'no'"),
                              ("capturable", "no", r"Invalid capturable: 'no'"),
                              ("foreach", 2, r"Invalid foreach: 2"),
                              ("lr", 10 ** 400, r"Invalid learning rate: 1000.*beyond float64's range"),
                              ("eps", 10 ** 400, r"Invalid epsilon value: 1000.*beyond float64's range")):
        kept = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        _refused(opt, ValueError, rf"AdamW: param_groups\[0\]: {match}")
        opt.param_groups[0][key] = kept
    with pytest.raises(ValueError, match=r"Invalid learning rate: 1000.*beyond float64's range"):
        af.AdamW([p], lr=10 ** 400)
    opt.param_groups[0]["params"].append(None)
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] must be a tensor, got NoneType None"):
        opt.step()
    assert torch.equal(p, before)
    opt.param_groups[0]["params"].pop()
    view = torch.randn(4, 6)[:, ::2]  # fused=0, torch.optim's "not fused": the reference, which steps a strided view
    view.grad = torch.ones_like(view)
    opt.add_param_group({"params": [view], "fused": 0})
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_amos_eta_that_is_zero_in_float32_is_refused_like_zero(backend):
    """eta = 0 is refused; so is one that rounds to 0 in float32 for float32 params
    (a scalar or a per-param entry), taken for float64 ones."""
    p = torch.nn.Parameter(torch.randn(4, 5))
    for eta in (1e-300, 2.0 ** -150, (1e-46,)):
        with pytest.raises(ValueError, match=r"Invalid eta(\[0\].*)?: .*positive, but 0 in float32"):
            af.Amos([p], lr=1e-2, eta=eta, backend=backend)
    opt = af.Amos([p], lr=1e-2, eta=2.0 ** -149, backend=backend)
    _grads([p], 0)
    opt.step()
    opt.param_groups[0]["eta"] = (1e-300,)
    _grads([p], 1)
    _refused(opt, ValueError, r"Invalid eta\[0\] \(param_groups\[0\]\['params'\]\[0\]'s\): 1e-300")
    af.Amos([torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))], lr=1e-2, eta=1e-300, backend=backend)


@pytest.mark.parametrize("name", ["AdamW", "Amos", "AdamW8bit"])
def test_interleaved_strided_params_on_the_reference_step_as_torch(name):
    """Column slices of one weight share no element, though their byte ranges
    interleave: the reference (which steps one param after another, as torch.optim)
    takes them, as torch does."""
    weight = torch.randn(64, 128)
    a, b = torch.nn.Parameter(weight[:, :64]), torch.nn.Parameter(weight[:, 64:])
    twin = [torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())]
    opts = [CLASSES[name]([a, b], "reference"), CLASSES[name](twin, "reference")]
    for step in range(2):
        for p, q in zip((a, b), twin):
            p.grad = q.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
        for opt in opts:
            opt.step()
    assert torch.equal(a, twin[0]) and torch.equal(b, twin[1])


def _sparse_scalar(value):
    return torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.tensor([value]), (1,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_sparse_scalar, lambda v: torch.tensor([v]).to_mkldnn()], ids=["sparse", "mkldnn"])
@pytest.mark.parametrize("which", ["grad_scale", "found_inf"])
def test_a_grad_scaling_input_that_is_not_dense_is_refused_before_any_write(which, make, backend):
    """GradScaler's one-element inputs are read by the kernels: a sparse or mkldnn one
    is refused by name before any state is made or any group is stepped."""
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(6))
    opt = af.AdamW([{"params": [a], "backend": "reference"}, {"params": [b]}], lr=1e-2, backend=backend)
    _grads([a, b], 0)
    opt.step()
    values = {"grad_scale": 2.0, "found_inf": 0.0}
    opt.grad_scale, opt.found_inf = torch.tensor(values["grad_scale"]), torch.tensor(values["found_inf"])
    setattr(opt, which, make(values[which]))
    _grads([a, b], 1)
    _refused(opt, ValueError, rf"{which} \(set by torch.amp.GradScaler\) must be a one-element floating tensor")
    fresh = af.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-2, backend=backend)
    fresh.grad_scale, fresh.found_inf = opt.grad_scale, opt.found_inf
    _grads(fresh.param_groups[0]["params"], 0)
    with pytest.raises(ValueError):
        fresh.step()
    assert not fresh.state  # (no state made by a refused first step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "Amos", "AdamW8bit"])
def test_a_non_dense_grad_viewing_another_param_is_refused_by_name(name, backend):
    """B's grad a strided view of param A: the step would read what it writes (torch.optim
    steps A first, the fused kernels read the grad as it was): refused, as a dense alias is."""
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(torch.randn(64, 64))
    opt = CLASSES[name]([a, b], backend)
    a.grad = torch.randn(64, 128)
    b.grad = a.detach()[:, ::2]
    _refused(opt, ValueError, r"param_groups\[0\]\['params'\]\[1\].*the grad shares memory with the param of "
                              r"param_groups\[0\]\['params'\]\[0\]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_that_is_its_own_param_is_refused_naming_one_param(backend):
    p = torch.nn.Parameter(torch.randn(8, 5))
    opt = af.AdamW([p], lr=1e-2, backend=backend)
    p.grad = p.detach()
    _refused(opt, ValueError, r"the grad shares memory with the param of the same param; a step reads the grad "
                              "while it writes the param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_dense_grads_of_their_own_buffers_still_step(backend):
    """Expanded and strided grads that view no param's memory step as before."""
    a, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6))
    opt = af.AdamW([a, b], lr=1e-2, backend=backend)
    a.grad = torch.ones(1, 6).expand(8, 6)
    b.grad = torch.randn(8, 12)[:, ::2]
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_counter_that_is_not_dense_is_named(backend):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.state[b]["step"] = torch.tensor([2.0]).to_sparse()
    _grads([a, b], 1)
    _refused(opt, ValueError, r"param_groups\[1\]\['params'\]\[0\].*state\['step'\]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["grad", "exp_avg"])
def test_a_conjugated_view_of_a_complex_param_is_named(what, backend):
    """torch.view_as_real needs a resolved conjugation; named before any write."""
    a, z = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    opt = af.AdamW([{"params": [a]}, {"params": [z]}], lr=1e-2, backend=backend)
    _grads([a, z], 0)
    opt.step()
    _grads([a, z], 1)
    if what == "grad":
        z.grad = z.grad.conj()
    else:
        opt.state[z]["exp_avg"] = opt.state[z]["exp_avg"].conj()
    _refused(opt, ValueError, r"param_groups\[1\]\['params'\]\[0\].*lazily conjugated view")


def _lazy(kind, t):
    """t as a tensor whose memory does not hold its values as they read: a ZeroTensor
    (no memory), or a lazily negated view holding t's values (float tensors)."""
    if kind == "zero":
        return torch._efficientzerotensor(t.shape, dtype=t.dtype, device=t.device)
    view = torch._neg_view(t.neg())
    assert view.is_neg() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("kind", ["zero", "neg"])
def test_a_lazy_view_the_step_would_write_is_refused_before_any_write(kind, name, backend):
    """A state or step counter that is a ZeroTensor or a lazily negated view
    (x.conj().imag, torch._neg_view) is refused by name before anything is written:
    the kernels read and write raw memory (a ZeroTensor has none, a negated view's
    memory holds −x), and an in-place write to either fails mid-step in torch."""
    a, b = _params(name, n=1024)
    opt = CLASSES[name]([{"params": [a]}, {"params": [b]}], backend)
    _grads([a, b], 0)
    opt.step()
    keys = [k for k, v in opt.state[b].items() if isinstance(v, torch.Tensor) and (kind == "zero" or v.is_floating_point())]
    assert "step" in keys and len(keys) >= 2
    for key in keys:
        kept = opt.state[b][key]
        opt.state[b][key] = _lazy(kind, kept)
        _grads([a, b], 1)
        described = "a ZeroTensor" if kind == "zero" else "a lazily negated view"
        match = (rf"param_groups\[1\]\['params'\]\[0\].*state\['{key}'\] is {described}"
                 if not key.endswith("_absmax") and opt.state[b][key].dtype != torch.uint8 else
                 rf"param_groups\[1\]\['params'\]\[0\].*state '{key}'.*does not fit.*a plain tensor "
                 rf"\(it is {described}")
        _refused(opt, ValueError, match)
        opt.state[b][key] = kept
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad-scaler"])
def test_a_zero_tensor_grad_steps_as_zeros(backend, scaled):
    """A ZeroTensor grad (torch._efficientzerotensor: no memory of its own) steps as
    the zeros it reads as, as torch.optim steps it: bitwise a step on torch.zeros;
    under GradScaler's grad_scale the grads left unscaled after the step are the
    others (the zeros need no writing, and a ZeroTensor cannot be written)."""
    params = [torch.nn.Parameter(torch.randn(64, 5)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [af.AdamW(ps, lr=1e-2, backend=backend) for ps in (params, twins)]
    for step in range(2):
        for p, q in zip(params, twins):
            p.grad, q.grad = torch._efficientzerotensor(p.shape), torch.zeros_like(q)
        if step == 0:
            params[1].grad, twins[1].grad = torch.randn(64, 5) * 8, torch.randn(64, 5) * 0
            twins[1].grad.copy_(params[1].grad)
        for opt in opts:
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            opt.step()
        if step == 0:
            assert torch.equal(params[1].grad, twins[1].grad)
            assert params[0].grad._is_zerotensor()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())
        for key, value in opts[0].state[p].items():
            assert torch.equal(value, opts[1].state[q][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_negated_view_grad_steps_and_is_unscaled_like_a_plain_one(dtype, backend):
    """A grad that is a lazily negated view (x.conj().imag) is only read by the step,
    as its values; under GradScaler's grad_scale it is then unscaled in place like
    any grad (torch's foreach multiply refuses such tensors, so it goes on its own):
    params, states and grads bitwise those of the same run with plain grads."""
    def run(negated):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 5).to(dtype)) for _ in range(2)]
        opt = af.AdamW(params, lr=1e-2, backend=backend)
        for step in range(2):
            for i, p in enumerate(params):
                g = (torch.randn(64, 5) * 8).to(dtype)
                p.grad = torch._neg_view(g.neg()) if negated and i == 1 else g
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            opt.step()
        assert params[1].grad.is_neg() == negated
        return params, opt

    (plain, plain_opt), (lazy, lazy_opt) = run(False), run(True)
    for p, q in zip(plain, lazy):
        assert torch.equal(p.detach(), q.detach()) and torch.equal(p.grad, q.grad)
        for key, value in plain_opt.state[p].items():
            assert torch.equal(value, lazy_opt.state[q][key]), key
