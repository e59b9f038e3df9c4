"""torch.optim reads ``group['params']``, each param's ``.grad`` and
``optimizer.state`` afresh at every step; so do we, on every backend.  Each case
edits the optimizer between steps exactly as a user would and must give what
torch.optim.AdamW gives after the same edit."""
from __future__ import annotations

import pytest
import torch

import amos_fused as af
from conftest import make_grads

BACKENDS = [b for b in af.available_backends()]
SHAPES = [(5, 3), (7,), (), (33,)]


def _pair(backend, amsgrad=False):
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=amsgrad)
    return ours, af.AdamW(ours, backend=backend, **kw), theirs, torch.optim.AdamW(theirs, **kw)


def _step(ours, opt, theirs, torch_opt, step):
    for p, q, g in zip(ours, theirs, make_grads(ours, step)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    torch_opt.step()


def _same(ours, opt, theirs, torch_opt):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    a, b = opt.state_dict()["state"], torch_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for key in a[index]:
            torch.testing.assert_close(torch.as_tensor(a[index][key]).double(),
                                       torch.as_tensor(b[index][key]).double(), rtol=1e-12, atol=1e-14)


def _run(backend, edit, amsgrad=False):
    ours, opt, theirs, torch_opt = _pair(backend, amsgrad)
    for step in range(3):
        _step(ours, opt, theirs, torch_opt, step)
    edit(ours, opt)
    edit(theirs, torch_opt)
    for step in range(3, 6):
        _step(ours, opt, theirs, torch_opt, step)
    _same(ours, opt, theirs, torch_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_cleared(backend):
    def edit(params, opt):
        opt.state.clear()
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_cleared_then_saved_keeps_new_state(backend):
    ours, opt, theirs, torch_opt = _pair(backend)
    for step in range(3):
        _step(ours, opt, theirs, torch_opt, step)
    opt.state.clear()
    assert opt.state_dict()["state"] == {}
    _step(ours, opt, theirs, torch_opt, 3)
    assert float(opt.state_dict()["state"][0]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_param_state_deleted(backend):
    def edit(params, opt):
        del opt.state[params[1]]
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_state_tensor_replaced(backend, key):
    def edit(params, opt):
        for p in params:
            opt.state[p][key] = torch.full_like(p, 0.25)
    _run(backend, edit, amsgrad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_counter_replaced(backend):
    def edit(params, opt):
        opt.state[params[0]]["step"] = torch.tensor(100.0)
        opt.state[params[2]]["step"] = torch.tensor(1.0)
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_replaced_in_group(backend):
    def edit(params, opt):
        fresh = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(5, 3).requires_grad_()
        old = opt.param_groups[0]["params"][0]
        opt.param_groups[0]["params"][0] = fresh
        opt.state.pop(old, None)  # torch's state_dict() needs every state to belong to a param
        params[0] = fresh
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_reordered(backend):
    def edit(params, opt):
        opt.param_groups[0]["params"].reverse()
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_removed_and_appended(backend):
    def edit(params, opt):
        group = opt.param_groups[0]["params"]
        group.append(group.pop(0))
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_data_replaced(backend):
    def edit(params, opt):
        with torch.no_grad():
            params[0].data = torch.arange(15, dtype=torch.float64).reshape(5, 3) / 10
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("before,after", [(torch.float64, torch.complex128), (torch.complex128, torch.float64)],
                         ids=["real-to-complex", "complex-to-real"])
def test_param_data_made_complex_or_real(backend, before, after):
    """p.data set to a tensor of the other kind (its state cleared): the cached plan,
    which steps complex params as their real views, is rebuilt, and both kinds step
    as torch.optim steps them."""
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(4, 3, generator=gen, dtype=before).requires_grad_(), torch.randn(6, dtype=torch.float64,
                                                                                        generator=gen).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, torch_opt = af.AdamW(ours, lr=0.05, backend=backend), torch.optim.AdamW(theirs, lr=0.05, foreach=False)
    for step in range(4):
        if step == 2:
            value = torch.randn(4, 3, generator=gen, dtype=after)
            for p, o in ((ours[0], opt), (theirs[0], torch_opt)):
                p.data = value.clone()
                del o.state[p]
        for p, q in zip(ours, theirs):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        assert p.dtype == q.dtype == q.grad.dtype
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], torch_opt.state[q][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_group_added_later(backend):
    def edit(params, opt):
        extra = torch.ones(4, 4, dtype=torch.float64, requires_grad=True)
        opt.add_param_group({"params": [extra], "lr": 0.01})
        params.append(extra)
    _run(backend, edit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_switched_on(backend):
    """torch.optim creates max_exp_avg_sq only with amsgrad; we create it when
    amsgrad is switched on, as a fresh optimizer with amsgrad would have it."""
    ours, opt, theirs, _ = _pair(backend)
    for step in range(2):
        for p, g in zip(ours, make_grads(ours, step)):
            p.grad = g
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.step()
    assert all("max_exp_avg_sq" in opt.state[p] for p in ours)
    for p in ours:
        torch.testing.assert_close(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])


# ---- per-param group values (Amos's eta, ScaledAdamW's init_norm) follow their params

PER_PARAM_CLASSES = {
    "Amos": (af.Amos, dict(lr=0.05), "eta"),
    "Amos-momentum": (af.Amos, dict(lr=0.05, momentum=0.9), "eta"),
    "ScaledAdamW": (af.ScaledAdamW, dict(lr=0.05, half_life=50), "init_norm"),
}


def _scaled_params():
    """Params of very different scales, so a value applied to the wrong one shows."""
    gen = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(s * torch.randn(shape, generator=gen, dtype=torch.float64))
            for s, shape in [(0.01, (10,)), (3.0, (8, 5)), (0.5, (7, 3))]]


def _steps(params, opt, first, last):
    for step in range(first, last):
        gen = torch.Generator().manual_seed(50 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PER_PARAM_CLASSES))
@pytest.mark.parametrize("edit", ["reverse", "rotate"])
def test_per_param_values_follow_reordered_params(name, edit, backend):
    """Reordering group['params'] between steps leaves every param's update as it
    was: its inferred per-param value goes with it."""
    cls, kw, key = PER_PARAM_CLASSES[name]
    ours, plain = _scaled_params(), _scaled_params()
    opt, ref = cls(ours, backend=backend, **kw), cls(plain, backend=backend, **kw)
    _steps(ours, opt, 0, 2)
    _steps(plain, ref, 0, 2)
    group = opt.param_groups[0]["params"]
    if edit == "reverse":
        group.reverse()
    else:
        group.append(group.pop(0))
    _steps(ours, opt, 2, 4)
    _steps(plain, ref, 2, 4)
    for p, q in zip(ours, plain):
        assert torch.equal(p, q)
    values = dict(zip(map(id, ours), ref.param_groups[0][key]))
    assert [values[id(p)] for p in group] == list(opt.param_groups[0][key])


@pytest.mark.parametrize("name", list(PER_PARAM_CLASSES))
def test_a_param_appended_to_a_group_gets_its_own_inferred_value(name):
    """torch.optim steps a param appended to group['params']; it gets the value a
    fresh optimizer would infer for it, and the others keep theirs."""
    cls, kw, key = PER_PARAM_CLASSES[name]
    params = _scaled_params()
    fresh = cls([params[2].detach().clone()], **kw).param_groups[0][key]
    opt = cls(params[:2], **kw)
    _steps(params[:2], opt, 0, 1)
    kept = opt.param_groups[0][key]
    opt.param_groups[0]["params"].append(params[2])
    _steps(params, opt, 1, 2)
    assert opt.param_groups[0][key] == kept + fresh


def test_a_per_param_tuple_set_with_the_reorder_is_taken_in_the_new_order():
    """A user who reorders the params and sets group['eta'] anew means the new tuple
    in the new order: it is not remapped."""
    params = _scaled_params()
    opt = af.Amos(params, lr=0.05)
    _steps(params, opt, 0, 1)
    opt.param_groups[0]["params"].reverse()
    opt.param_groups[0]["eta"] = (0.1, 0.2, 0.3)
    _steps(params, opt, 1, 2)
    assert opt.param_groups[0]["eta"] == (0.1, 0.2, 0.3)


def test_a_refused_regrouping_leaves_the_per_param_values():
    """A step refused for the reordered group (an appended param that overlaps
    another) leaves group['eta'] as it was: a raising step changes nothing."""
    params = _scaled_params()
    opt = af.Amos(params[:2], lr=0.05)
    _steps(params[:2], opt, 0, 1)
    before = opt.param_groups[0]["eta"]
    snapshot = [p.detach().clone() for p in params[:2]]
    opt.param_groups[0]["params"].reverse()
    opt.param_groups[0]["params"].append(params[1].detach()[:2].requires_grad_())
    with pytest.raises(ValueError, match="shares memory"):
        _steps(params[:2], opt, 1, 2)
    assert opt.param_groups[0]["eta"] is before
    assert all(torch.equal(p, s) for p, s in zip(params[:2], snapshot))


def _stepped_once(backend):
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = af.AdamW([p], lr=0.05, backend=backend)
    p.grad = torch.randn(6, dtype=torch.float64)
    opt.step()
    p.grad = torch.randn(6, dtype=torch.float64)
    return p, opt, (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})


def _unchanged(p, opt, before):
    assert torch.equal(p.detach(), before[0])
    assert opt.state[p].keys() == before[1].keys()
    for key, value in opt.state[p].items():
        assert torch.equal(value, before[1][key]), key


def _torch_step_after(edit):
    """torch.optim.AdamW's step after ``edit(group)``."""
    q = torch.nn.Parameter(torch.randn(3))
    theirs = torch.optim.AdamW([q], lr=0.05)
    edit(theirs.param_groups[0])
    q.grad = torch.randn(3)
    theirs.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach"])
def test_a_deleted_group_key_raises_keyerror_as_torch_does(key, backend):
    """torch.optim's step raises KeyError for a setting deleted from a group; ours
    raises an error that is both a KeyError and (as every other refusal of a group)
    a ValueError, naming the key, before anything is written."""
    p, opt, before = _stepped_once(backend)
    del opt.param_groups[0][key]
    with pytest.raises(KeyError, match=rf"param_groups\[0\] has no '{key}'") as caught:
        opt.step()
    assert isinstance(caught.value, ValueError)
    _unchanged(p, opt, before)
    with pytest.raises(KeyError):
        _torch_step_after(lambda group: group.pop(key))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,value", [("lr", "abc"), ("lr", None), ("lr", [0.1]), ("betas", 0.9),
                                       ("betas", None), ("betas", ("a", 0.9)), ("eps", None),
                                       ("weight_decay", "x")], ids=repr)
def test_a_non_number_written_into_a_group_raises_typeerror_as_torch_does(key, value, backend):
    """What torch.optim's arithmetic refuses with a TypeError (a string, None, a list
    as a number) is refused here with an error that is both a TypeError and a
    ValueError, naming the group and the value, before anything is written."""
    p, opt, before = _stepped_once(backend)
    opt.param_groups[0][key] = value
    with pytest.raises(TypeError, match=r"param_groups\[0\]: Invalid") as caught:
        opt.step()
    assert isinstance(caught.value, ValueError)
    _unchanged(p, opt, before)
    with pytest.raises(TypeError):
        _torch_step_after(lambda group: group.__setitem__(key, value))


def test_inside_allow_mutation_on_saved_tensors_the_reference_steps_and_a_fused_group_is_refused_unwritten():
    """torch.autograd.graph.allow_mutation_on_saved_tensors() clones what an op
    writes, found by the op's schema positions, which it cannot read for the fused
    step ops' optional written arguments: the reference backend steps there (a
    backward after it uses the weights saved before it, as with torch.optim), and a
    group on a fused backend is refused by name before any group is written."""
    a, b = (torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(s))) for s in (0, 1))
    x = torch.randn(5, 4)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        loss = (x @ a).pow(2).sum()
        opt = af.AdamW([a], lr=0.1, backend="reference")
        a.grad = torch.ones_like(a)
        before = a.detach().clone()
        opt.step()
        assert not torch.equal(a.detach(), before)
        loss.backward()
        expected = x.t() @ (2 * (x @ before))
        torch.testing.assert_close(a.grad - 1, expected)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        opt = af.AdamW([{"params": [a], "backend": "reference"}, {"params": [b]}], lr=0.1)
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        held = [t.detach().clone() for t in (a, b)]
        with pytest.raises(RuntimeError, match=r"param_groups\[1\]: the 'cpu' backend's fused step cannot run inside "
                                               r"torch.autograd.graph.allow_mutation_on_saved_tensors"):
            opt.step()
        assert all(torch.equal(t.detach(), h) for t, h in zip((a, b), held)) and not opt.state
    opt.step()  # (outside it: both groups step)


def test_a_fused_step_runs_in_a_thread_outside_allow_mutation_on_saved_tensors_while_another_is_inside():
    """The context's cloning mode is per thread (its global flag is not): a thread
    outside it steps its fused optimizer as torch.optim's steps, while another thread
    sits inside it; inside, that thread's fused step is still refused."""
    import threading

    inside, done = threading.Event(), threading.Event()
    refused = []

    def hold_the_context():
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            p = torch.nn.Parameter(torch.ones(3))
            p.grad = torch.ones(3)
            try:
                af.AdamW([p], lr=0.1, backend="cpu").step()
            except RuntimeError as error:
                refused.append(str(error))
            inside.set()
            done.wait(timeout=60)

    holder = threading.Thread(target=hold_the_context)
    holder.start()
    try:
        assert inside.wait(timeout=60)
        p = torch.nn.Parameter(torch.ones(3))
        twin = torch.nn.Parameter(torch.ones(3))
        p.grad, twin.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
        af.AdamW([p], lr=0.1, backend="cpu").step()
        torch.optim.AdamW([twin], lr=0.1).step()
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=1e-7)
    finally:
        done.set()
        holder.join()
    assert refused and "allow_mutation_on_saved_tensors" in refused[0]
