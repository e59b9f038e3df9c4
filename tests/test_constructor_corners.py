"""Constructor arguments as torch.optim takes them: ``betas`` as any sequence of two
numbers, a tensor ``lr`` of one element, torch.optim.Adam's keyword-only
``decoupled_weight_decay``."""
import collections.abc
import re

import numpy as np
import pytest
import torch

import amos_fused as af


class ConfigList(collections.abc.MutableSequence):
    """A config library's list (OmegaConf's ListConfig is a MutableSequence)."""

    def __init__(self, items):
        self._items = list(items)

    def __getitem__(self, i):
        return self._items[i]

    def __setitem__(self, i, v):
        self._items[i] = v

    def __delitem__(self, i):
        del self._items[i]

    def __len__(self):
        return len(self._items)

    def insert(self, i, v):
        self._items.insert(i, v)


def _run(opt_cls, steps=3, **kwargs):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 11, dtype=torch.float64))
    opt = opt_cls([p], **kwargs)
    for step in range(steps):
        p.grad = torch.sin(torch.arange(11, dtype=torch.float64) * (step + 1))
        opt.step()
    return p.detach()


@pytest.mark.parametrize("betas", [np.array([0.9, 0.95]), ConfigList([0.9, 0.95]),
                                   (torch.tensor(0.9), torch.tensor(0.95))],
                         ids=["ndarray", "config-list", "tensors"])
@pytest.mark.parametrize("ours,theirs", [(af.AdamW, torch.optim.AdamW), (af.RAdam, torch.optim.RAdam)],
                         ids=["AdamW", "RAdam"])
def test_betas_as_any_sequence_of_two_numbers(betas, ours, theirs):
    # (torch computes with float32 tensor betas as float32 tensors, hence the looser match)
    tol = 1e-6 if isinstance(betas, tuple) else 1e-12
    torch.testing.assert_close(_run(ours, lr=0.1, betas=betas), _run(theirs, lr=0.1, betas=betas),
                               rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("beta_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("beta1", [0.9, 0.3, 1e-3])
@pytest.mark.parametrize("ours,theirs", [(af.AdamW, torch.optim.AdamW), (af.Adam, torch.optim.Adam)],
                         ids=["AdamW", "Adam"])
def test_tensor_betas_give_torchs_moments(ours, theirs, beta1, param_dtype, beta_dtype, backend):
    # torch.optim's Adam and AdamW cast a Tensor β1 to the param's dtype and take m's lerp
    # weight 1 − β1 there: a float64 tensor's 0.9 weighs float32 grads by 1 − float32(0.9)
    betas = (torch.tensor(beta1, dtype=beta_dtype), torch.tensor(0.999, dtype=beta_dtype))
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(37, generator=gen).to(param_dtype)
    grads = [torch.randn(37, generator=gen).to(param_dtype) for _ in range(3)]
    moments = []
    for make in (lambda p: theirs([p], lr=1e-2, betas=betas, foreach=False),
                 lambda p: ours([p], lr=1e-2, betas=betas, backend=backend)):
        p = torch.nn.Parameter(theta.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        moments.append((opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    assert torch.equal(moments[1][0], moments[0][0])  # (m: one lerp, rounded once, for every dtype)
    if param_dtype in (torch.float32, torch.float64):  # (torch rounds a low-precision v twice: mul_, addcmul_)
        assert torch.equal(moments[1][1], moments[0][1])


@pytest.mark.parametrize("cls", [af.AdamW, af.Adam, af.AdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("param_dtype,beta1", [(torch.float16, 0.99), (torch.bfloat16, 0.999),
                                               (torch.float32, 1 - 1e-9)], ids=str)
def test_a_tensor_beta1_corrects_the_bias_with_its_own_value(cls, param_dtype, beta1):
    """torch.optim.Adam and AdamW cast a Tensor β1 to the param's dtype for m's
    weight 1 − β1 only; the step size lr/(1 − β1^t) takes β1 as it is.  A β1 that
    the param's dtype rounds to 1 (bfloat16's 0.999, float32's 1 − 1e-9: m's weight
    0) steps finite params, where 1 − 1^t = 0 would make them NaN; float16's 0.99
    (0.98974609375 there) takes the step size of 0.99, bitwise on both backends."""
    betas = (torch.tensor(beta1, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))
    gen = torch.Generator().manual_seed(5)
    theta = (0.01 * torch.randn(4096 + 37, generator=gen)).to(param_dtype)
    grad = torch.randn(4096 + 37, generator=gen).to(param_dtype)
    results = []
    for backend in ("cpu", "reference"):
        p = torch.nn.Parameter(theta.clone())
        opt = cls([p], lr=1e-2, betas=betas, weight_decay=0.0, backend=backend)
        p.grad = grad.clone()
        opt.step()
        results.append(p.detach())
        assert torch.isfinite(p).all(), backend
    assert torch.equal(results[0].view(torch.int16 if param_dtype != torch.float32 else torch.int32),
                       results[1].view(torch.int16 if param_dtype != torch.float32 else torch.int32))
    # the first step's update is lr·m̂/(sqrt(v̂) + ε) with m̂ = w·g/(1 − β1), w = 1 − β1 in the param's dtype
    weight = 1 - float(betas[0].to(param_dtype))
    m_hat = weight * grad.double() / (1 - beta1)
    v_hat = grad.double() ** 2
    expected = theta.double() - 1e-2 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(results[1].double(), expected, rtol=2.0 ** -8, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_tensor_beta1_with_master_weights_is_cast_to_the_masters_float32(backend):
    """With master_weights the float32 master steps as a float32 param does: a
    Tensor β1 (0.999, which bfloat16 would round to 1) is cast to float32 for m's
    weight, so master, m and v are bitwise those of a float32 param."""
    betas = (torch.tensor(0.999, dtype=torch.float64), torch.tensor(0.9999, dtype=torch.float64))
    gen = torch.Generator().manual_seed(9)
    theta = torch.randn(4096 + 37, generator=gen).bfloat16()
    grads = [torch.randn(4096 + 37, generator=gen).bfloat16() for _ in range(3)]
    runs = []
    for master in (True, False):
        p = torch.nn.Parameter(theta.clone() if master else theta.float())
        opt = af.AdamW([p], lr=1e-2, betas=betas, master_weights=master, backend=backend)
        for g in grads:
            p.grad = g.clone() if master else g.float()
            opt.step()
        st = opt.state[p]
        runs.append((st["master_param"] if master else p.detach(), st["exp_avg"], st["exp_avg_sq"]))
    for with_master, float32 in zip(*runs):
        assert torch.equal(with_master, float32)
    assert bool((runs[0][1] != 0).any())  # (m moves: its weight is 1 − float32(0.999), not 0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", [af.AdamW, af.Adam, af.RAdam], ids=lambda c: c.__name__)
def test_tensor_betas_and_lr_step_as_the_same_values_given_as_numbers(cls, backend):
    # the per-step scalars (bias corrections, step size, RAdam's ρ_t) are computed in
    # float64 from the values, Tensor or number alike (torch.optim computes them in float32
    # Tensor arithmetic, which loses digits for β2 near 1: the README says so)
    values = (torch.tensor(0.9), torch.tensor(0.9999), torch.tensor(3e-3))
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(301, generator=gen)
    grads = [torch.randn(301, generator=gen) for _ in range(8)]
    results = []
    for tensors in (True, False):
        beta1, beta2, lr = values if tensors else (float(v) for v in values)
        p = torch.nn.Parameter(theta.clone())
        opt = cls([p], lr=lr, betas=(beta1, beta2), weight_decay=0.01, backend=backend)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    for tensor_run, number_run in zip(*results):
        assert torch.equal(tensor_run, number_run)


REFUSED_BY_TORCH = [(torch.tensor(0.9), 0.999), (0.9, torch.tensor(0.999)), (0, 0.999), (0.9, 0),
                    (False, 0.999), (np.float32(0.9), 0.999), (np.int64(0), 0.999)]
TAKEN_BY_TORCH = [(np.float64(0.9), 0.999), [0.9, 0.999], np.array([0.9, 0.999]),
                  (torch.tensor(0.9), torch.tensor(0.999))]


@pytest.mark.parametrize("betas", REFUSED_BY_TORCH + TAKEN_BY_TORCH, ids=repr)
@pytest.mark.parametrize("ours,theirs", [(af.AdamW, torch.optim.AdamW), (af.Adam, torch.optim.Adam),
                                         (af.AdamW8bit, torch.optim.AdamW), (af.Adam8bit, torch.optim.Adam)],
                         ids=lambda c: c.__name__)
def test_betas_are_refused_at_construction_where_torch_refuses_them(ours, theirs, betas):
    """torch.optim.Adam and AdamW construct with betas that are both floats or both
    Tensors only (ints, NumPy's float32, one Tensor and one number are refused);
    their classes here take and refuse the same pairs, the error naming the class;
    a step takes any such pair written into the group later, as torch's step does."""
    refused = any(betas is b for b in REFUSED_BY_TORCH)
    params = [torch.nn.Parameter(torch.ones(3))]
    if refused:
        with pytest.raises(ValueError, match="both floats or both Tensors"):
            theirs(params, betas=betas)
        with pytest.raises(ValueError, match=rf"^{ours.__name__}: the default betas of every group: Invalid betas: "
                                                 r".*both floats or both Tensors"):
            ours(params, betas=betas)
    else:
        theirs(params, betas=betas)
        ours(params, betas=betas)
    runs = []
    for cls in (ours, theirs):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = cls([p], lr=0.1)
        opt.param_groups[0]["betas"] = betas
        for _ in range(2):
            p.grad = torch.linspace(1, 2, 5)
            opt.step()
        runs.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    if ours in (af.AdamW, af.Adam):  # (the 8-bit classes keep FP8 moments)
        (ours_p, ours_m, ours_v), (torch_p, torch_m, torch_v) = runs
        assert torch.equal(ours_m, torch_m) and torch.equal(ours_v, torch_v)
        # θ by the roundings of torch's float32 bias corrections (README)
        torch.testing.assert_close(ours_p, torch_p, rtol=1e-5, atol=0)


def test_radam_takes_any_two_numbers_as_torch_radam_does():
    """torch.optim.RAdam's constructor has no such check: ints are betas there too."""
    for cls in (af.RAdam, af.RAdam8bit, torch.optim.RAdam):
        cls([torch.nn.Parameter(torch.ones(3))], betas=(0, 0.999))


NOT_TWO_NUMBERS = ["ab", (0.9,), (0.9, 0.95, 0.99), 0.9, (0.9, 1.0),
                   torch.tensor(0.9), np.array(0.9), torch.tensor([[0.9, 0.95]])]  # 0-d: __len__ that raises


@pytest.mark.parametrize("betas", NOT_TWO_NUMBERS, ids=repr)
def test_betas_that_are_not_two_numbers_in_range_are_refused(betas):
    with pytest.raises(ValueError, match="betas|beta parameter"):
        af.AdamW([torch.nn.Parameter(torch.zeros(3))], betas=betas)


@pytest.mark.parametrize("betas", NOT_TWO_NUMBERS[-3:], ids=repr)
def test_betas_written_between_steps_are_refused_before_any_write(betas):
    p = torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([p], lr=0.1)
    p.grad = torch.randn(5)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["betas"] = betas
    with pytest.raises(ValueError, match=r"param_groups\[0\].*betas"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    for key, value in opt.state[p].items():
        assert torch.equal(value, before[1][key]), key


@pytest.mark.parametrize("cls", [af.AdamW, af.RAdam, af.Lion])
def test_a_tensor_lr_of_several_elements_is_a_value_error(cls):
    with pytest.raises(ValueError, match="must be 1-element"):
        cls([torch.nn.Parameter(torch.zeros(3))], lr=torch.tensor([0.1, 0.2]))


def test_a_one_element_tensor_lr_steps_like_torch():
    # (torch's coefficients from a float32 tensor lr are float32 tensors: a float32-level match)
    torch.testing.assert_close(_run(af.AdamW, lr=torch.tensor(0.1)), _run(torch.optim.AdamW, lr=torch.tensor(0.1)),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_adam_takes_decoupled_weight_decay_like_torch(decoupled, backend):
    ours = _run(af.Adam, lr=0.1, weight_decay=0.3, decoupled_weight_decay=decoupled, backend=backend)
    theirs = _run(torch.optim.Adam, lr=0.1, weight_decay=0.3, decoupled_weight_decay=decoupled)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours, _run(af.Adam, lr=0.1, weight_decay=0.3, decoupled_weight_decay=not decoupled))


def test_adam_decoupled_weight_decay_is_kept_in_checkpoints():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = af.Adam([p], decoupled_weight_decay=True)
    assert opt.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        af.Adam([p], decoupled_weight_decay="yes")


@pytest.mark.parametrize("cls,kwargs", [
    (af.AdamW, dict(lr=1e300)), (af.AdamW, dict(weight_decay=1e39)), (af.Lion, dict(weight_decay=1e39)),
    (af.Amos, dict(lr=1e39)), (af.Lamb, dict(eps=1e39)), (af.ScaledAdamW, dict(q=1e39)),
    (af.AdamW8bit, dict(eps=1e39)),
], ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_a_value_beyond_float32_range_is_refused_at_construction(cls, kwargs):
    """The step of float32 params computes in float32: a finite value it cannot
    hold is refused when the group is made (not first at step()), naming it;
    float64 params take it."""
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"param_groups\[0\].*{name}.*{re.escape(str(value))}"):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    opt = cls([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], **kwargs)
    with pytest.raises(ValueError, match=rf"param_groups\[1\].*{name}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls,setting", [(af.Amos, "eta"), (af.Amos8bit, "eta"), (af.ScaledAdamW, "sigma")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_a_scale_inferred_from_a_param_without_values_is_refused_by_name(cls, setting):
    # a param on the meta device (a model built there, before to_empty) has no values to take an RMS of
    p = torch.nn.Parameter(torch.empty(4, 5, device="meta"))
    with pytest.raises(ValueError, match=rf"cannot infer {setting} from a param on the meta device .*shape \(4, 5\)"):
        cls([p], lr=0.01)
    cls([p], lr=0.01, **{setting: 0.5})  # given: nothing to infer


COMPLEX_VALUES = [np.complex128(1e-3 + 1j), np.complex64(1e-3), torch.tensor(1e-3 + 0j)]
COMPLEX_CASES = [(af.AdamW, {}, "lr"), (af.Adam, {}, "eps"), (af.RAdam, {}, "weight_decay"), (af.Lion, {}, "lr"),
                 (af.Amos, dict(lr=0.01, eta=0.5), "eta"), (af.ScaledAdamW, {}, "lr"), (af.Lamb, {}, "lr")]


@pytest.mark.parametrize("value", COMPLEX_VALUES, ids=repr)
@pytest.mark.parametrize("cls,kwargs,key", COMPLEX_CASES, ids=lambda x: x.__name__ if isinstance(x, type) else "")
def test_complex_hyper_parameters_are_refused_as_not_real_numbers(cls, kwargs, key, value):
    """A complex number (NumPy's: float() would keep its real part) or complex tensor
    is no hyper-parameter: a TypeError that is a ValueError too, at construction and
    when written into a group (Amos's per-param eta in a tuple too), before any write."""
    from conftest import assert_unchanged, snapshot
    p = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    shown = {"lr": "learning rate", "eps": "epsilon"}.get(key, key)
    with pytest.raises(TypeError, match=rf"param_groups\[0\]: Invalid {shown}.*real number"):
        cls([p], **{**kwargs, key: value})
    opt = cls([p], **kwargs)
    p.grad = torch.ones(7)
    opt.step()
    written = [value, (value,)] if key == "eta" else [value]
    for bad in written:
        opt.param_groups[0][key] = bad
        before = snapshot(opt, [p])
        with pytest.raises(ValueError, match=r"param_groups\[0\].*real number|param_groups\[0\]\['eta'\] must be a number"):
            opt.step()
        assert_unchanged(before, opt, [p])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,group,name", [
    (af.AdamW, dict(lr=1e38), r"step size lr/\(1 - beta1\^t\) at t=2"),
    (af.Adam8bit, dict(lr=1e38), r"step size lr/\(1 - beta1\^t\) at t=2"),
    (af.AdamW, dict(lr=1e20, weight_decay=1e20), r"decay factor 1 - lr\*weight_decay"),
    (af.RAdam, dict(lr=1e20, weight_decay=1e20, decoupled_weight_decay=True), r"decay factor 1 - lr\*weight_decay"),
    (af.Lion, dict(lr=1e20, weight_decay=1e20), r"decay factor 1 - lr\*weight_decay"),
], ids=lambda x: x.__name__ if isinstance(x, type) else "")
def test_a_derived_step_value_beyond_float32_range_is_refused(cls, group, name, backend):
    """lr in float32's range, but the step size lr/(1 − β1^t) at the params' next
    step t or the decay factor 1 − lr·λ beyond it: float32 params would turn Inf or
    NaN (torch.optim.AdamW's default step raises on the step size); refused at
    construction (a first step's) and when a scheduler writes it, before any write;
    float64 params take it."""
    from conftest import assert_unchanged, snapshot
    shape = (5000,) if cls is af.Adam8bit else (7,)
    p = torch.nn.Parameter(torch.linspace(-1, 1, shape[0]))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: Invalid {name.replace('t=2', 't=1')}: "
                                         r".*beyond float32's range"):
        cls([p], backend=backend, **group)
    opt = cls([p], backend=backend)
    p.grad = torch.ones(shape)
    opt.step()
    opt.param_groups[0].update(group)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: Invalid {name}"):
        opt.step()
    assert_unchanged(before, opt, [p])
    wide = torch.nn.Parameter(torch.linspace(-1, 1, shape[0], dtype=torch.float64))
    cls([wide], backend=backend, **group)


def test_a_tensor_lr_of_several_elements_is_both_a_type_error_and_a_value_error():
    """torch.optim's constructor refuses it with a ValueError, its step's arithmetic
    with a TypeError: either ``except`` catches ours."""
    p = torch.nn.Parameter(torch.ones(3))
    for kind in (TypeError, ValueError):
        with pytest.raises(kind, match="must be 1-element"):
            af.Adam([p], lr=torch.tensor([1e-3, 2e-3]))
    opt = af.Adam([p])
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 2e-3])
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"param_groups\[0\]: Tensor learning rate must be 1-element"):
        opt.step()


def test_adams_decoupled_weight_decay_flag_is_named_by_its_class_and_group():
    with pytest.raises(ValueError, match=r"^Adam: param_groups\[0\]: Invalid decoupled_weight_decay: 2 "):
        af.Adam([torch.nn.Parameter(torch.ones(3))], decoupled_weight_decay=2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_step_size_is_checked_at_the_params_own_step_count(backend):
    """lr/(1 − β1) overflows float32 at a first step, lr/(1 − β1^t) no longer at step
    100: written there, such an lr steps as torch.optim.AdamW steps it (finite);
    RAdam, whose step size (m/(1 − β1^t))·η is taken per element, takes it at a
    first step too."""
    runs = []
    for make in (lambda p: torch.optim.AdamW([p], lr=1e-3), lambda p: af.AdamW([p], lr=1e-3, backend=backend)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 7))
        opt = make(p)
        for step in range(100):
            p.grad = torch.full((7,), 1e-3 * (step + 1))
            if step == 99:
                opt.param_groups[0]["lr"] = 5e37
            opt.step()
        runs.append(p.detach())
    assert torch.isfinite(runs[1]).all()
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=0)
    q = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    radam = af.RAdam([q], lr=5e37, backend=backend)
    q.grad = torch.ones(7)
    radam.step()
    assert torch.isfinite(q).all()


def test_the_step_size_check_counts_only_the_params_that_step_in_float32():
    """A float64 param taking its first step beside a float32 one at step 100: the
    float64 step takes lr/(1 − β1) in float64, so an lr whose first-step size
    overflows float32 is taken (as torch.optim.AdamW takes it), not refused."""
    single, double = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = af.AdamW([single], lr=1e-3)
    for _ in range(100):
        single.grad = torch.ones(5)
        opt.step()
    opt.param_groups[0]["params"].append(double)
    opt.param_groups[0]["lr"] = 5e37
    single.grad, double.grad = torch.ones(5), torch.ones(5, dtype=torch.float64)
    opt.step()
    assert torch.isfinite(single).all() and torch.isfinite(double).all()


def test_the_step_size_check_counts_only_the_params_that_step_now():
    """A param of the group that never had a grad (no state) does not step: it does
    not bring t down to 1, so an lr torch.optim.AdamW takes at step 101 is taken."""
    stepped, idle = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    opt = af.AdamW([stepped, idle], lr=1e-3)
    for _ in range(100):
        stepped.grad = torch.ones(5)
        opt.step()
    opt.param_groups[0]["lr"] = 5e37
    opt.step()
    assert torch.isfinite(stepped).all() and idle not in opt.state
    idle.grad = torch.ones(5)  # (now it steps, at t = 1: refused, before any write)
    with pytest.raises(ValueError, match=r"step size lr/\(1 - beta1\^t\) at t=1"):
        opt.step()


def test_a_checkpoint_taken_at_an_lr_its_step_took_reloads_after_zero_grad():
    """The step-size check of a load (grads None after zero_grad) counts every
    param's next step, not a first step: a checkpoint saved after a step at
    lr=5e37 (taken at step 101) reloads, into the same optimizer and a fresh one."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = af.AdamW([p], lr=1e-3)
    for _ in range(100):
        p.grad = torch.ones(5)
        opt.step()
    opt.param_groups[0]["lr"] = 5e37
    opt.step()
    saved = opt.state_dict()
    opt.zero_grad()
    opt.load_state_dict(saved)
    af.AdamW([p], lr=1e-3).load_state_dict(saved)
