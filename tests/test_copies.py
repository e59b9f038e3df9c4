"""A copy of an optimizer — ``copy.deepcopy``, a pickle, or ``state_dict`` loaded into
a fresh one — resumes exactly as the original would, also when params, their
values or their layout changed since the last step: per-param group values follow
their params, a param written since its last step has its float32 master remade
from it, and states whose param changed memory format are re-laid at its next step."""
import copy
import io
import pickle

import pytest
import torch

import amos_fused as af

HOW = ["deepcopy", "pickle", "state_dict"]


def _copied(opt, params, how, make):
    """(the copy, its params): the optimizer and params together for deepcopy and
    pickle; for state_dict, fresh params of the same values and a fresh optimizer
    ``make(params)`` loading the checkpoint through torch.save / torch.load."""
    if how == "deepcopy":
        return copy.deepcopy((opt, params))
    if how == "pickle":
        return pickle.loads(pickle.dumps((opt, params)))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    new = make(fresh[:len(opt.param_groups[0]["params"])])
    new.load_state_dict(torch.load(buffer, weights_only=True))
    return new, fresh


PER_PARAM = {"Amos": (lambda ps: af.Amos(ps, lr=0.1, backend="cpu"), "eta"),
             "Amos8bit": (lambda ps: af.Amos8bit(ps, lr=0.1, backend="cpu"), "eta"),
             "ScaledAdamW": (lambda ps: af.ScaledAdamW(ps, lr=0.05, half_life=100, backend="cpu"), "init_norm")}


PER_PARAM_MAKERS = [make for make, _ in PER_PARAM.values()]


def _stepped_with_a_third_param(make):
    """(opt, a, b, c): opt made over a and b and stepped once; c, zero, not in it yet."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 8) * 3), torch.nn.Parameter(torch.randn(4, 8) * 0.1)
    c = torch.nn.Parameter(torch.zeros(4, 8))
    opt = make([a, b])
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, a, b, c


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", list(PER_PARAM))
def test_per_param_values_follow_their_params_in_a_copy(name, how):
    make, key = PER_PARAM[name]

    def session(copy_how):
        torch.manual_seed(0)
        p0, p1 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4) * 3)
        opt = make([p0, p1])
        opt.param_groups[0]["params"] = [p0]  # p1 leaves before any step
        if copy_how is not None:
            opt, (p0, p1) = _copied(opt, [p0, p1], copy_how, make)
        opt.param_groups[0]["params"] = [p1, p0]  # and comes back, first
        p2 = torch.nn.Parameter(torch.randn(4, 4))
        opt.param_groups[0]["params"].append(p2)  # a new one too
        for p in (p0, p1, p2):
            p.grad = torch.ones_like(p)
        opt.step()
        return [p.detach().clone() for p in (p0, p1, p2)], opt.param_groups[0][key]

    (params, values), (copied, copied_values) = session(None), session(how)
    assert copied_values == values
    assert all(torch.equal(a, b) for a, b in zip(params, copied))


@pytest.mark.parametrize("name", list(PER_PARAM))
def test_a_checkpoint_after_removing_a_param_holds_one_value_per_saved_param(name):
    make, key = PER_PARAM[name]
    p0, p1 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4))
    opt = make([p0, p1])
    p0.grad, p1.grad = torch.ones_like(p0), torch.ones_like(p1)
    opt.step()
    opt.param_groups[0]["params"] = [p0]
    del opt.state[p1]
    saved = opt.state_dict()
    assert len(saved["param_groups"][0][key]) == 1
    new, (q0,) = _copied(opt, [p0], "state_dict", make)
    q0.grad = torch.ones_like(q0)
    new.step()


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("make", [lambda ps: af.AdamW(ps, lr=1e-2, backend="cpu"),
                                  lambda ps: af.AdamW8bit(ps, lr=1e-2, backend="cpu"), *PER_PARAM_MAKERS],
                         ids=["AdamW", "AdamW8bit", *PER_PARAM])
def test_a_copy_after_removing_a_stepped_param_resumes_like_the_original(make, how):
    """A param with state removed from its group's list (its state left in
    opt.state, as torch.optim leaves it): a copy resumes over the params left
    exactly as the original does; its state_dict holds those params only
    (torch.optim's state_dict raises KeyError on the orphaned state)."""
    def session(copy_how):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 80)) for _ in range(3)]
        opt = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.param_groups[0]["params"].pop(1)
        kept = [params[0], params[2]]
        if copy_how is not None:
            saved = opt.state_dict()
            assert sorted(saved["state"]) == [0, 1] and saved["param_groups"][0]["params"] == [0, 1]
            opt, kept = _copied(opt, kept, copy_how, make)
        for p in kept:
            p.grad = torch.ones_like(p)
        opt.step()
        return [p.detach().clone() for p in kept]

    original, copied = session(None), session(how)
    assert all(torch.equal(a, b) for a, b in zip(original, copied))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("how", HOW)
def test_a_param_written_before_a_copy_resumes_from_its_written_value(how, backend):
    """master_weights: the clamp between steps is kept by the copy, as by the original."""
    def make(ps):
        return af.AdamW(ps, lr=1e-2, master_weights=True, backend=backend)

    def session(copy_how):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64).bfloat16())
        opt = make([p])
        grads = [torch.randn(64).bfloat16() for _ in range(3)]
        p.grad = grads[0]
        opt.step()
        with torch.no_grad():
            p.clamp_(-0.5, 0.5)
        if copy_how is not None:
            opt, (p,) = _copied(opt, [p], copy_how, make)
        for g in grads[1:]:
            p.grad = g.clone()
            opt.step()
        return p.detach().clone(), opt.state[p]["master_param"].clone()

    (p, master), (q, copied_master) = session(None), session(how)
    assert torch.equal(p, q) and torch.equal(master, copied_master)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [af.AdamW, af.AdamW8bit, af.Amos], ids=lambda c: c.__name__)
def test_a_copy_made_after_a_memory_format_change_re_lays_the_states(cls, how, backend):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 8, 16, 18).contiguous(memory_format=torch.channels_last))
    opt = cls([p], lr=0.1, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    p.data = p.data.contiguous()
    copied, (q,) = _copied(opt, [p], how, None)
    for o, x in ((opt, p), (copied, q)):
        x.grad = torch.ones_like(x)
        o.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(PER_PARAM))
def test_taking_a_copy_changes_nothing_in_the_original(name, how):
    """A state_dict, deepcopy or pickle between two group edits leaves the original's
    per-param values following its params, and infers nothing early (a param
    appended, then written, gets the value of its param as the next step sees it)."""
    make, key = PER_PARAM[name]

    def session(take):
        opt, a, b, c = _stepped_with_a_third_param(make)
        opt.param_groups[0]["params"].append(c)
        if take == "state_dict":
            opt.state_dict()
        elif take == "deepcopy":
            copy.deepcopy(opt)
        elif take == "pickle":
            pickle.dumps(opt)
        torch.nn.init.normal_(c, std=2.0, generator=torch.Generator().manual_seed(1))
        opt.param_groups[0]["params"].reverse()
        opt.step()
        return opt.param_groups[0][key], [p.detach().clone() for p in (a, b, c)]

    (values, params), (taken_values, taken_params) = session(None), session(how)
    assert taken_values == values and all(torch.equal(p, q) for p, q in zip(params, taken_params))


def _master_stepped_then_written(backend, factor):
    """(opt, p): a bfloat16 p with a master, stepped once, then multiplied by factor."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = af.AdamW([p], lr=1e-3, master_weights=True, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    with torch.no_grad():
        p.mul_(factor)
    return opt, p


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_state_dict_taken_in_inference_mode_after_a_write_leaves_the_masters_usable(backend):
    opt, p = _master_stepped_then_written(backend, 0.5)
    with torch.inference_mode():
        saved = opt.state_dict()
    assert torch.equal(saved["state"][0]["master_param"], p.detach().float())
    assert not opt.state[p]["master_param"].is_inference()
    p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize("how", ["state_dict-load", "deepcopy"])
@pytest.mark.parametrize("name", list(PER_PARAM))
def test_a_param_removed_after_a_load_or_copy_is_not_held(name, how):
    import gc
    import weakref
    make, _ = PER_PARAM[name]
    a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
    opt = make([a, b])
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    if how == "deepcopy":
        opt, (a, b) = copy.deepcopy((opt, (a, b)))
    else:
        opt.load_state_dict(opt.state_dict())
    held = weakref.ref(b)
    del opt.param_groups[0]["params"][1]
    opt.state.pop(b, None)
    del b
    a.grad = torch.ones_like(a)
    opt.step()
    opt.step()
    gc.collect()
    assert held() is None


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", list(PER_PARAM))
def test_per_param_values_of_a_tuple_group_follow_their_params_in_a_copy(name, how):
    """group['params'] may be a tuple (torch.optim steps one): reordered, it is settled too."""
    make, key = PER_PARAM[name]

    def session(copy_how):
        torch.manual_seed(0)
        p0, p1 = torch.nn.Parameter(torch.randn(5) * 3), torch.nn.Parameter(torch.randn(5) * 0.1)
        opt = make([p0, p1])
        p0.grad, p1.grad = torch.ones_like(p0), torch.ones_like(p1)
        opt.step()
        opt.param_groups[0]["params"] = (p1, p0)
        if copy_how is not None:
            opt, (p0, p1) = _copied(opt, [p0, p1], copy_how, lambda ps: make(ps[::-1]))
            if copy_how == "state_dict":
                opt.param_groups[0]["params"] = (p1, p0)
        p0.grad, p1.grad = torch.ones_like(p0), torch.ones_like(p1)
        opt.step()
        return opt.param_groups[0][key], [p0.detach().clone(), p1.detach().clone()]

    (values, params), (copied_values, copied) = session(None), session(how)
    assert tuple(copied_values) == tuple(values) and all(torch.equal(a, b) for a, b in zip(params, copied))


def test_state_dict_hooks_see_and_keep_the_settled_values():
    """torch.optim's hook order holds around the settling: a pre-hook's group edit is
    settled, a post-hook sees the settled per-param values and fresh masters, and
    what a post-hook converts or returns is the result (not patched over)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 8) * 3), torch.nn.Parameter(torch.randn(4, 8) * 0.1)
    opt = af.Amos([a], lr=0.1, backend="cpu")
    a.grad = torch.ones_like(a)
    opt.step()
    opt.register_state_dict_pre_hook(lambda o: o.param_groups[0]["params"].append(b))
    seen = []

    def post_hook(o, sd):
        seen.append(list(sd["param_groups"][0]["eta"]))
        sd["param_groups"][0]["eta"] = [round(x, 3) for x in sd["param_groups"][0]["eta"]]

    opt.register_state_dict_post_hook(post_hook)
    saved = opt.state_dict()
    assert len(seen[0]) == 2 and saved["param_groups"][0]["eta"] == [round(x, 3) for x in seen[0]]
    assert opt.param_groups[0]["params"][1] is b  # (the pre-hook's edit stays, as in torch.optim)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_state_dict_post_hook_sees_a_fresh_master_and_may_convert_it(backend):
    opt, p = _master_stepped_then_written(backend, 2)
    seen = []

    def post_hook(o, sd):
        seen.append(sd["state"][0]["master_param"].clone())
        sd["state"][0] = {**sd["state"][0], "master_param": sd["state"][0]["master_param"].double()}

    opt.register_state_dict_post_hook(post_hook)
    saved = opt.state_dict()
    assert torch.equal(seen[0], p.detach().float())
    assert saved["state"][0]["master_param"].dtype == torch.float64 and torch.equal(saved["state"][0]["master_param"], seen[0].double())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_deepcopy_taken_in_inference_mode_resumes_as_the_original(backend):
    """The copy's params are inference tensors (no version counter): the copy steps
    in inference mode as the original steps, and a write to a param between steps
    has its master remade from it there too."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = af.AdamW([p], lr=1e-3, master_weights=True, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    with torch.inference_mode():
        copied, (q,) = copy.deepcopy((opt, [p]))
    assert q.is_inference()
    for write in (False, True, False):
        if write:
            with torch.no_grad():
                p.mul_(2)
            with torch.inference_mode():
                q.mul_(2)
        opt.step()
        with torch.inference_mode():
            q.grad = p.grad.clone()
            copied.step()
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(PER_PARAM))
def test_a_param_appended_before_a_copy_gets_its_value_at_the_copys_next_step(name, how):
    """A copy infers nothing early either: a param appended before the copy and
    written after it gets, in the copy, the value of its param as the copy's next
    step sees it, as in the original."""
    make, key = PER_PARAM[name]

    def session(take):
        opt, a, b, c = _stepped_with_a_third_param(make)
        opt.param_groups[0]["params"].insert(1, c)
        if take is not None:
            opt, (a, b, c) = _copied(opt, [a, b, c], take, make)
        torch.nn.init.normal_(c, std=2.0, generator=torch.Generator().manual_seed(1))
        before = [p.detach().clone() for p in (a, b, c)]
        for p in (a, b, c):  # (a deepcopy or pickle of a param holds no grad)
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        opt.step()
        assert not any(torch.equal(p, q) for p, q in zip(before, (a, b, c)))
        return opt.param_groups[0][key], [p.detach().clone() for p in (a, b, c)]

    (values, params), (copied_values, copied_params) = session(None), session(how)
    assert copied_values == values and all(torch.equal(p, q) for p, q in zip(params, copied_params))


@pytest.mark.parametrize("count", [4.0, 4, "numpy", "numpy array"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_count_held_as_a_number_steps_in_a_copy_as_torch_optims_does(how, backend, count):
    """A `step` written into the state as a Python (or NumPy) number: torch.optim.Adam's
    __setstate__, which deepcopy and pickle run, turns it back into a tensor, so its
    copy steps on from that count; so does ours, to the same params and count."""
    np = pytest.importorskip("numpy")
    count = {"numpy": np.float64(4.0), "numpy array": np.array(4.0)}.get(count, count) if isinstance(count, str) else count
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.01), lambda ps: af.AdamW(ps, lr=0.01, backend=backend)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = make([p])
        p.grad = torch.linspace(0.5, -0.3, 5)
        opt.step()
        opt.state[p]["step"] = count
        copy_, (q,) = _copied(opt, [p], how, make)
        q.grad = torch.linspace(0.2, 0.4, 5)
        copy_.step()
        results.append((q.detach(), copy_.state[q]["step"]))
    (theirs, their_count), (ours, our_count) = results
    assert float(our_count) == float(their_count) == 5.0 and our_count.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_count_held_as_a_number_is_refused_by_a_live_step_as_torch_refuses_it(backend):
    """Without a copy, torch.optim's step refuses a Python-number count with a
    RuntimeError; ours refuses it by name with an error that is that RuntimeError and
    a ValueError, as every refused state is, and writes nothing."""
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.01), lambda ps: af.AdamW(ps, lr=0.01, backend=backend)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = make([p])
        p.grad = torch.ones(5)
        opt.step()
        opt.state[p]["step"] = 4.0
        before = (p.detach().clone(), opt.state[p]["exp_avg"].clone())
        with pytest.raises(RuntimeError) as raised:
            opt.step()
        if isinstance(opt, af.AdamW):
            assert isinstance(raised.value, ValueError) and "state['step']" in str(raised.value)
            assert "got 4.0" in str(raised.value)
        assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
        assert opt.state[p]["step"] == 4.0
