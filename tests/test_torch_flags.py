"""torch.optim's keyword-only flags, accepted like torch.optim accepts them:
nanoGPT-style call sites work unchanged; ``fused=False`` runs the reference;
``maximize`` steps uphill on every backend; what we cannot honour
(``differentiable=True``; ``capturable=True`` off the Triton backend, see
test_triton_capturable.py) is refused with a clear error;
``backend`` is never saved in checkpoints."""
from __future__ import annotations

import copy
import decimal
import inspect
import pickle

import numpy
import pytest
import torch

import amos_fused as af
from conftest import make_grads
from registry import CASES, CLASS_CASES

# every optimizer class of the registry, with its defaults (Amos with its required lr)
CLASSES = {cls.__name__: (cls, {"lr": 0.01} if cls is af.Amos else {})
           for cls in {CASES[name].cls for name in CLASS_CASES.values()}}
FLAGS = ("maximize", "foreach", "capturable", "differentiable", "fused", "backend")
TORCH = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "RAdam": torch.optim.RAdam}


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_flags_are_keyword_only_with_torch_defaults(name):
    cls, _ = CLASSES[name]
    signature = inspect.signature(cls.__init__).parameters
    for flag in FLAGS:
        assert signature[flag].kind is inspect.Parameter.KEYWORD_ONLY, flag
    defaults = {flag: signature[flag].default for flag in FLAGS}
    assert defaults == dict(maximize=False, foreach=None, capturable=False, differentiable=False,
                            fused=None, backend=None)
    if name in TORCH:  # the flags torch's own optimizer carries in its defaults
        ours = cls(_params(), **CLASSES[name][1]).defaults
        theirs = TORCH[name](_params()).defaults
        for flag in ("maximize", "foreach", "capturable", "differentiable"):
            assert ours[flag] == theirs[flag], flag


def test_nanogpt_call_site():
    params = _params()
    decay = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = af.AdamW(decay, lr=6e-4, betas=(0.9, 0.95), fused=True)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_no_op_flags_accepted(name):
    cls, kw = CLASSES[name]
    cls(_params(), **kw, foreach=True, fused=None, capturable=False, differentiable=False, maximize=False)
    cls(_params(), **kw, foreach=False, fused=True)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_fused_false_runs_the_reference(name, monkeypatch):
    cls, kw = CLASSES[name]
    ours, twin = _params(), _params()
    opt, ref = cls(ours, **kw, fused=False), cls(twin, **kw, backend="reference")
    calls = []
    real = type(opt)._reference_step
    monkeypatch.setattr(type(opt), "_reference_step", lambda self, *a: (calls.append(1), real(self, *a)))
    for step in range(3):
        for p, q, g in zip(ours, twin, make_grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert calls, "fused=False did not step through the reference"
    for p, q in zip(ours, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("flag, message", [("differentiable", "differentiable"), ("capturable", "capturable")])
def test_unsupported_flags_refused(name, flag, message):
    cls, kw = CLASSES[name]
    with pytest.raises(ValueError, match=message):
        cls(_params(), **kw, **{flag: True})


def test_fused_true_with_reference_backend_refused():
    with pytest.raises(ValueError, match="fused=True"):
        af.AdamW(_params(), fused=True, backend="reference")


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_fused_false_with_a_fused_backend_refused_at_construction_and_at_the_step(backend):
    """fused=False means the reference step: named beside a fused backend it is a
    contradiction, refused as fused=True beside backend='reference' is, rather than
    one of the two silently dropped; set in a group later, the step refuses it and
    writes nothing."""
    with pytest.raises(ValueError, match=rf"fused=False .* contradicts backend='{backend}'"):
        af.AdamW(_params(), fused=False, backend=backend)
    params = _params()
    opt = af.AdamW(params, lr=0.1, backend="cpu")
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["fused"] = False
    with pytest.raises(ValueError, match=r"param_groups\[0\]: fused=False .* contradicts backend='cpu'"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    opt.param_groups[0]["fused"] = None
    opt.step()
    af.AdamW(_params(), fused=False, backend="reference")  # (no contradiction)


@pytest.mark.parametrize("backend", af.available_backends())
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_maximize_is_minimizing_the_negated_loss(name, backend):
    """maximize=True with grads g equals maximize=False with grads −g, bitwise."""
    cls, kw = CLASSES[name]
    ours, twin = _params(), _params()
    opt = cls(ours, **kw, maximize=True, backend=backend)
    ref = cls(twin, **kw, backend=backend)
    for step in range(3):
        for p, q, g in zip(ours, twin, make_grads(ours, step)):
            p.grad, q.grad = g.clone(), -g
        opt.step()
        ref.step()
    for p, q in zip(ours, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", af.available_backends())
@pytest.mark.parametrize("name", sorted(TORCH))
def test_maximize_matches_torch(name, backend):
    ours, theirs = _params(), _params()
    opt = CLASSES[name][0](ours, lr=0.01, weight_decay=0.1, maximize=True, backend=backend)
    ref = TORCH[name](theirs, lr=0.01, weight_decay=0.1, maximize=True)
    for step in range(4):
        for p, q, g in zip(ours, theirs, make_grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _steps_a_strided_view(opt_class, **kwargs):
    """The backend an optimizer runs, seen in what it does: the fused backends
    refuse a param that is not dense in memory, the reference steps it."""
    view = torch.randn(4, 6)[:, ::2]
    view.grad = torch.ones_like(view)
    opt = opt_class([view], lr=0.01, **kwargs)
    try:
        opt.step()
    except ValueError as error:
        assert "dense" in str(error), error
        return False
    return True


def test_backend_is_not_saved_and_not_loaded():
    """``backend`` is the constructor's choice of this machine's kernels: kept in
    ``defaults``, not copied into the groups, never saved; a checkpoint that names
    one (as older versions saved it) loads, and the constructor's choice stays."""
    params = _params()
    opt = af.AdamW(params, lr=0.01, backend="reference")
    assert opt.defaults["backend"] == "reference"
    assert all("backend" not in g for g in opt.param_groups)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    assert all("backend" not in g for g in saved["param_groups"])
    saved["param_groups"][0]["backend"] = "triton-on-a-machine-that-had-one"
    loaded = af.AdamW(_params(), lr=0.01, backend="cpu")
    loaded.load_state_dict(saved)
    assert all("backend" not in g for g in loaded.param_groups)
    assert loaded.defaults["backend"] == "cpu"
    assert not _steps_a_strided_view(af.AdamW, backend="cpu")
    assert _steps_a_strided_view(af.AdamW, backend="reference")


def test_a_group_may_choose_its_backend():
    """A ``backend`` given in a group (or set in it between steps) is that group's,
    saved with it like any group key; ``load_state_dict`` keeps the live one."""
    view = torch.randn(4, 6)[:, ::2]
    dense = torch.randn(5)
    opt = af.AdamW([{"params": [view], "backend": "reference"}, {"params": [dense]}], lr=0.01, backend="cpu")
    assert opt.param_groups[0]["backend"] == "reference" and "backend" not in opt.param_groups[1]
    view.grad, dense.grad = torch.ones_like(view), torch.ones_like(dense)
    before = view.clone()
    opt.step()  # the view on the reference, the dense param on cpu
    assert not torch.equal(view, before)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["backend"] == "reference" and "backend" not in saved["param_groups"][1]
    saved["param_groups"][1]["backend"] = "reference"  # (never loaded)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["backend"] == "reference" and "backend" not in opt.param_groups[1]
    opt.step()
    del opt.param_groups[0]["backend"]  # the constructor's cpu from now on: refuses the view
    with pytest.raises(ValueError, match="dense"):
        opt.step()


def test_torch_fused_checkpoint_keeps_our_choice():
    params, twin = _params(), _params()
    source = torch.optim.AdamW(twin, lr=0.01, fused=True)
    for q, g in zip(twin, make_grads(twin, 0)):
        q.grad = g
    source.step()
    opt = af.AdamW(params, lr=0.01, fused=False)
    opt.load_state_dict(source.state_dict())
    assert opt.param_groups[0]["fused"] is False


def test_flags_torch_refuses_together_are_refused():
    """What torch.optim refuses at construction is refused here too: fused=True with
    foreach=True, and a Tensor lr or betas with foreach=True (torch's foreach step
    cannot take them, so a checkpoint saved with them would not step there; set
    between steps, the pair fused and foreach steps, as torch.optim's step takes it)."""
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        af.AdamW([p], fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"lr as a Tensor is not supported with foreach=True"):
        af.AdamW([p], lr=torch.tensor(0.01), foreach=True)
    with pytest.raises(ValueError, match=r"betas\[0\] as a Tensor is not supported with foreach=True"):
        af.Adam([p], betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)
    opt = af.AdamW([p], lr=torch.tensor(0.01))
    p.grad = torch.randn(5)
    opt.step()
    opt.param_groups[0]["foreach"] = True  # set between steps: refused before anything is written
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]: lr as a Tensor"):  # (torch's step: RuntimeError)
        opt.step()
    assert torch.equal(p, before)
    af.AdamW([p], lr=torch.tensor(0.01), foreach=False).step()
    # fused and foreach both True, set between steps: torch.optim's step takes the pair as its fused step
    ours, theirs = af.AdamW([p], lr=0.01), torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.01)
    for opt in (ours, theirs):
        opt.param_groups[0].update(fused=True, foreach=True)
        opt.param_groups[0]["params"][0].grad = torch.ones(5)
        opt.step()
    assert torch.equal(ours.param_groups[0]["params"][0], theirs.param_groups[0]["params"][0])
    opt = af.AdamW([p], lr=0.01, foreach=True)  # a group added with one: torch's step raises a RuntimeError
    with pytest.raises(RuntimeError, match=r"lr as a Tensor is not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": torch.tensor(0.1)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [af.AdamW, af.Adam, af.RAdam, af.Lion, af.AdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("betas", [(0.9,), ()], ids=["one", "none"])
def test_betas_short_of_a_pair_raise_torchs_index_error(cls, betas):
    """torch.optim's constructors read betas[1] (an IndexError for a single beta); the
    error here is an IndexError and a ValueError, naming the betas."""
    p = torch.nn.Parameter(torch.randn(5))
    for kind in (IndexError, ValueError):
        with pytest.raises(kind, match=r"Invalid betas"):
            cls([p], betas=betas)
    with pytest.raises(ValueError, match=r"Invalid betas") as info:
        cls([p], betas=(0.9, 0.99, 0.9))  # (torch's step fails to unpack them: a ValueError)
    assert not isinstance(info.value, IndexError)


def test_a_checkpoint_keeps_a_groups_own_backend_and_the_flattened_form_loads():
    """A backend set in a group is a group key like any other: saved with it (never
    loaded: the live group keeps its own), so torch.distributed.checkpoint's
    flattened form, which reads every key of the live groups, round-trips."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = af.AdamW([{"params": model[0].parameters()},
                    {"params": model[1].parameters(), "backend": "reference"}], lr=1e-3, backend="cpu")
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert "backend" not in saved["param_groups"][0] and saved["param_groups"][1]["backend"] == "reference"
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    assert "backend" not in opt.param_groups[0] and opt.param_groups[1]["backend"] == "reference"
    opt.step()


@pytest.mark.parametrize("flag,value", [("foreach", "np0"), ("fused", "np1"), ("foreach", 0.0), ("maximize", 1.0),
                                        ("capturable", torch.tensor(False)), ("amsgrad", torch.tensor(True))],
                         ids=str)
def test_flags_torch_takes_are_taken(flag, value):
    """torch.optim reads its flags by their truth: NumPy ints, floats and one-element
    tensors that are 0 or 1 are taken (strings, 0.5, 2 are refused: see test_step_corners)."""
    import numpy as np

    value = {"np0": np.int64(0), "np1": np.int64(1)}.get(value, value) if isinstance(value, str) else value
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    p.grad = q.grad = torch.linspace(-1, 1, 4)
    af.AdamW([p], lr=1e-3, **{flag: value}).step()
    torch.optim.AdamW([q], lr=1e-3, **{"foreach": False, flag: value}).step()
    torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("cls", [af.RAdam, af.Lion, af.Amos, af.Lamb], ids=lambda c: c.__name__)
def test_a_tensor_lr_with_foreach_is_taken_where_torch_takes_it(cls):
    """Only torch.optim.Adam/AdamW refuse a Tensor lr with foreach=True (their foreach
    step cannot take it); torch.optim.RAdam takes it, and so do the other classes here."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    kwargs = {"eta": 0.5} if cls is af.Amos else {}
    cls([p], lr=torch.tensor(1e-3), foreach=True, **kwargs).step()


@pytest.mark.parametrize("ours,theirs,key,ctor", [
    (af.Adam, torch.optim.Adam, "decoupled_weight_decay", dict(decoupled_weight_decay=True, weight_decay=0.5)),
    (af.AdamW, torch.optim.AdamW, "maximize", dict(maximize=True)),
    (af.Adam, torch.optim.Adam, "amsgrad", dict(amsgrad=True)),
    (af.RAdam, torch.optim.RAdam, "decoupled_weight_decay", dict(decoupled_weight_decay=True, weight_decay=0.5)),
    (af.RAdam, torch.optim.RAdam, "maximize", dict(maximize=True))], ids=lambda v: getattr(v, "__name__", v))
def test_a_checkpoint_lacking_a_torch_flag_loads_it_as_torch_does(ours, theirs, key, ctor):
    """A group saved by a torch that had no such flag (torch <= 2.5's Adam: no
    decoupled_weight_decay) meant the flag's default: torch.optim's __setstate__
    fills it with its default, not with the loading optimizer's value."""
    start = torch.randn(6)
    saved = theirs([torch.nn.Parameter(start.clone())], lr=0.1, weight_decay=0.5).state_dict()
    for group in saved["param_groups"]:
        del group[key]
    results = []
    for cls in (ours, theirs):
        p = torch.nn.Parameter(start.clone())
        opt = cls([p], lr=0.1, **ctor)
        opt.load_state_dict(saved)
        assert not opt.param_groups[0][key]
        p.grad = torch.linspace(-1, 1, 6)
        opt.step()
        results.append((p.detach().clone(), sorted(opt.state[p])))
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-6) and results[0][1] == results[1][1]


def test_our_checkpoint_keeps_its_flags():
    p = torch.nn.Parameter(torch.randn(6))
    saved = af.Adam([p], lr=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True).state_dict()
    opt = af.Adam([torch.nn.Parameter(torch.randn(6))], lr=0.1)
    opt.load_state_dict(saved)
    assert all(opt.param_groups[0][key] for key in ("decoupled_weight_decay", "amsgrad", "maximize"))


@pytest.mark.parametrize("make", [
    lambda ps: af.AdamW(ps, lr="1e-3"), lambda ps: af.AdamW(ps, lr=b"1e-3"),
    lambda ps: af.AdamW(ps, betas=("0.9", "0.999")), lambda ps: af.RAdam(ps, eps="1e-8"),
    lambda ps: af.ScaledAdamW(ps, half_life="1000"), lambda ps: af.ScaledAdamW(ps, half_life=10, sigma="0.5"),
    lambda ps: af.Amos(ps, lr=0.01, momentum="0.9"), lambda ps: af.Lion(ps, weight_decay="0.1")])
def test_numeric_strings_are_refused_as_torch_refuses_them(make):
    """torch.optim refuses lr='1e-3'; kept in a group, a string would break an lr
    scheduler (lr * gamma) and torch.optim stepping our checkpoint."""
    with pytest.raises(ValueError, match=r"must be a real number, not a (str|bytes)"):
        make([torch.nn.Parameter(torch.randn(4, 3))])


def test_a_lazy_param_is_refused_by_name():
    """torch's lazy modules materialize at the first forward: an optimizer made
    before it is refused, naming the param, with what to do."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is an uninitialized parameter.*"
                                         r"forward pass"):
        af.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 5))
    opt = af.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 5)).sum().backward()
    opt.step()


@pytest.mark.parametrize("group_kw,error,match", [
    ({"backend": "bogus"}, ValueError, r"unknown backend 'bogus'.*\(param_groups\[1\]\)"),
    ({"capturable": True, "backend": "triton", "track_rms": True}, ValueError,
     r"capturable=True.*\(param_groups\[1\]\)")])
def test_group_level_refusals_name_the_group(group_kw, error, match):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = af.AdamW([{"params": [a]}], lr=0.1)
    opt.param_groups.append({**opt.param_groups[0], "params": [b], **group_kw})
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(error, match=match):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and not opt.state


def test_capturable_written_into_a_group_of_cpu_params_later_steps_on_the_host():
    """torch.compile's Dynamo writes capturable=True into the groups of a compiled
    function that edits a group (test_compile.py); on CPU params, whose backend has
    no capturable step, such a True reads as False at the step, as torch.optim's
    compiled step takes it; made or added with it, a group is still refused."""
    with pytest.raises(ValueError, match=r"capturable=True \(CUDA-graph capture\) needs backend='cuda'"):
        af.AdamW([torch.nn.Parameter(torch.randn(3))], lr=0.1, capturable=True)
    opt = af.AdamW([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"capturable=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "capturable": True})
    results = []
    for make in (af.AdamW, af.AdamW8bit, lambda ps, lr: af.Amos(ps, lr=lr, eta=0.5)):
        for written in (False, True):
            p = torch.nn.Parameter(torch.randn(64, 80, generator=torch.Generator().manual_seed(0)))
            opt = make([p], lr=0.01)
            for i in range(3):
                p.grad = torch.randn(64, 80, generator=torch.Generator().manual_seed(i + 1))
                if written:
                    opt.param_groups[0]["capturable"] = True
                opt.step()
            assert opt.state[p]["step"].device.type == "cpu"
            results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
        (a, sa), (b, sb) = results[-2:]
        assert torch.equal(a, b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _torchs_error(make):
    try:
        make()
    except Exception as error:  # noqa: BLE001 (torch's kind of error, whatever it is)
        return type(error)
    return None


_TWO = torch.tensor([0.1, 0.2])


_BAD_VALUES = [dict(betas=(None, 0.999)), dict(betas=(0.9j, 0.999)), dict(betas=((0.9,), 0.999)),
               dict(eps=_TWO), dict(weight_decay=_TWO),
               dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))), dict(fused=torch.tensor([True, False]))]
_PEERS = {"AdamW": (af.AdamW, torch.optim.AdamW), "Adam": (af.Adam, torch.optim.Adam),
          "AdamW8bit": (af.AdamW8bit, torch.optim.AdamW), "RAdam": (af.RAdam, torch.optim.RAdam)}


@pytest.mark.parametrize("name, settings", [
    pytest.param(name, settings, id=f"{name}-{next(iter(settings))}={next(iter(settings.values()))!r:.30}")
    for name in _PEERS for settings in _BAD_VALUES
    if not (name == "RAdam" and "fused" in settings)])  # (torch.optim.RAdam has no fused flag)
def test_a_bad_value_raises_the_kind_of_error_torch_raises(name, settings):
    """A beta that is no real number (None, complex, a tuple): a TypeError, as
    torch.optim's constructors raise; a tensor of two elements as eps, weight_decay,
    a beta or a flag: a RuntimeError, as theirs do; at construction, and at the step
    for a value written into a group later.  (Each is a ValueError too.)"""
    ours, theirs = _PEERS[name]
    expected = _torchs_error(lambda: theirs([torch.nn.Parameter(torch.randn(3))], lr=0.1, **settings))
    assert expected in (TypeError, RuntimeError)
    with pytest.raises(expected) as caught:
        ours([torch.nn.Parameter(torch.randn(3))], lr=0.1, **settings)
    assert isinstance(caught.value, ValueError)
    p = torch.nn.Parameter(torch.randn(3))
    opt = ours([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.param_groups[0].update(settings)
    before = p.detach().clone()
    with pytest.raises(expected, match=r"param_groups\[0\]"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


@pytest.mark.parametrize("make", [lambda ps: af.AdamW(ps, lr=0.1), lambda ps: af.Lion(ps, lr=0.1),
                                  lambda ps: af.Amos(ps, lr=0.1, eta=0.5)], ids=["AdamW", "Lion", "Amos"])
def test_a_key_added_to_defaults_later_fills_later_groups_only(make):
    """As in torch.optim: opt.defaults' keys fill the groups added after; the groups
    already there step without the new key."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = make([p])
    opt.defaults["my_tag"] = "x"
    p.grad = torch.ones(3)
    opt.step()
    opt.add_param_group({"params": [q]})
    assert "my_tag" not in opt.param_groups[0] and opt.param_groups[1]["my_tag"] == "x"
    q.grad = torch.ones(3)
    opt.step()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):  # (a copy holds the same keys)
        copied.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
        copied.step()


@pytest.mark.parametrize("betas", [(decimal.Decimal("0.9"), 0.999), (numpy.array(0.9), 0.999),
                                   (0.9, numpy.array(0.999))], ids=["Decimal", "ndarray", "ndarray-second"])
@pytest.mark.parametrize("ours, theirs", [(af.AdamW, torch.optim.AdamW), (af.Adam, torch.optim.Adam)],
                         ids=["AdamW", "Adam"])
def test_betas_of_numbers_that_are_no_floats_are_refused_as_torch_refuses_them(betas, ours, theirs):
    with pytest.raises(ValueError, match=r"must be either both floats or both Tensors"):
        theirs([torch.nn.Parameter(torch.randn(3))], betas=betas)
    with pytest.raises(ValueError, match=r"must be either both floats or both Tensors"):
        ours([torch.nn.Parameter(torch.randn(3))], betas=betas)


@pytest.mark.parametrize("key", ["lr", "weight_decay", "betas"])
def test_a_group_added_without_a_setting_the_defaults_lost_is_refused_by_name(key):
    p = torch.nn.Parameter(torch.randn(3))
    opt = af.AdamW([p], lr=0.1)
    del opt.defaults[key]
    with pytest.raises(KeyError, match=rf"AdamW: param_groups\[1\] has no '{key}'.*opt.defaults holds none") as caught:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert isinstance(caught.value, ValueError)
    assert len(opt.param_groups) == 1
