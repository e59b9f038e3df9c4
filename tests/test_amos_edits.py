"""Amos under what users do between steps: per-param eta shared by groups that are
reordered, params whose dtype changes (range checks follow the step's dtype), eta
given as a list, reduce_axes given as a type a weights_only checkpoint cannot
hold, and huge finite grads in every slot layout (the same on both backends)."""
import io

import pytest
import torch

import amos_fused as af

BACKENDS = ["cpu", "reference"]


def _grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


@pytest.mark.parametrize("edit", ["reverse", "delete"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eta_tuple_shared_by_groups_stays_with_them_when_groups_are_reordered(backend, edit):
    """Plans are kept by group index: a reordered or removed group must not make the
    other group's own eta look like values of moved params (re-inferred)."""
    a, b, c, d = (torch.nn.Parameter(torch.randn(20, 30) * 3) for _ in range(4))
    eta = (0.1, 0.2)
    opt = af.Amos([{"params": [a, b], "eta": eta}, {"params": [c, d], "eta": eta}], lr=0.01, backend=backend)
    _grads([a, b, c, d], 0)
    opt.step()
    if edit == "reverse":
        opt.param_groups.reverse()
    else:
        del opt.param_groups[0]
    _grads([a, b, c, d], 1)
    opt.step()
    assert all(group["eta"] == (0.1, 0.2) for group in opt.param_groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_range_checks_follow_a_param_whose_dtype_changed(backend):
    """After p.data = p.data.float() the step computes in float32: a value only
    float64 can hold is refused there (nothing written), and the other way round a
    float64 param takes it again."""
    w = torch.nn.Parameter(torch.randn(40, 30, dtype=torch.float64))
    opt = af.Amos([w], lr=0.05, backend=backend)
    _grads([w], 0)
    opt.step()
    w.data = w.data.float()
    opt.state.clear()
    opt.param_groups[0]["epsilon"] = 1e-300
    _grads([w], 1)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"Invalid epsilon: 1e-300 \(its reciprocal overflows torch.float32"):
        opt.step()
    assert torch.equal(w, before) and not opt.state
    w.data = w.data.double()
    _grads([w], 2)
    opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eta_list_is_range_checked_like_a_tuple(backend):
    """A per-param eta given as a list (edited in place or not) is checked at every
    step, as a tuple is."""
    ps = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(50))]
    opt = af.Amos(ps, lr=0.05, backend=backend)
    _grads(ps, 0)
    opt.step()
    eta = [0.1, 0.2]
    opt.param_groups[0]["eta"] = eta
    opt.step()
    for bad, match in ((1e300, "beyond float32's range"), (1e-50, "positive, but 0 in float32")):
        eta[1] = bad  # (in place)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(ValueError, match=rf"Invalid eta\[1\] \(param_groups\[0\]\['params'\]\[1\]'s\): .*{match}"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, before))


@pytest.mark.parametrize("reduce_axes", [range(1, 2), frozenset({1})], ids=["range", "frozenset"])
def test_reduce_axes_of_types_a_checkpoint_cannot_hold_are_refused(reduce_axes):
    """torch.load(weights_only=True) cannot load a range or a frozenset: refused when
    given (a tuple, a list or a set is taken, and its checkpoint loads)."""
    q = torch.nn.Parameter(torch.randn(64, 80))
    with pytest.raises(ValueError, match="reduce_axes must be None, 'all', a dim or a tuple of dims"):
        af.Amos([q], lr=0.05, reduce_axes=reduce_axes)
    for good in ((1,), [1], {1}):
        opt = af.Amos([q], lr=0.05, reduce_axes=good)
        _grads([q], 0)
        opt.step()
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("reduce_axes", [(1,), "all", (0,), None])
def test_a_finite_grad_whose_square_overflows_float32_agrees_across_backends(reduce_axes):
    """|g| = 3e19: g² overflows float32, the slot's mean g² does not (for reduced
    slots): both backends square such a grad in float64, in every slot layout."""
    runs = []
    for backend in BACKENDS:
        w = torch.nn.Parameter(torch.ones(300, 300))
        opt = af.Amos([w], lr=0.05, reduce_axes=reduce_axes, backend=backend)
        g = torch.zeros(300, 300)
        g[0, 0] = 3e19
        w.grad = g
        opt.step()
        runs.append((w.detach().clone(), opt.state[w]["v"].clone()))
    (p_ref, v_ref), (p_cpu, v_cpu) = runs[1], runs[0]
    if reduce_axes is not None:
        assert torch.isfinite(p_ref).all() and torch.isfinite(v_ref).all()
    torch.testing.assert_close(v_cpu, v_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(p_cpu, p_ref, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("written", [1.0, True, (1.0,), (True,), [1.0]], ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [af.Amos, af.Amos8bit], ids=lambda c: c.__name__)
def test_a_reduce_axes_that_equals_the_last_one_but_is_no_dim_is_refused_before_any_write(cls, backend, written):
    """1.0 == 1 and True == 1 in Python, but neither is a dim: written into a later
    group after a step with reduce_axes=1 (or (1,)), it is refused as the
    constructor refuses it, naming the param, with every param and counter as it
    was (the step's checks read the value, not a cache of an equal one)."""
    from conftest import assert_unchanged, snapshot
    a, b = torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(64, 80))
    first = 1 if not isinstance(written, (tuple, list)) else (1,)
    kwargs = dict(momentum=0.9) if cls is af.Amos8bit else {}
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.01, reduce_axes=first, backend=backend, **kwargs)
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[1]["reduce_axes"] = written
    _grads([a, b], 1)
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] .*reduce_axes"):
        opt.step()
    assert_unchanged(before, opt, [a, b])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] .*reduce_axes"):
        cls([a], lr=0.01, reduce_axes=written)


def test_a_reduce_axes_that_does_not_fit_an_appended_param_names_it():
    """A group's reduce_axes out of range for a param appended to it: the error
    names that param, at the step as at construction."""
    a, b = torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 4))
    opt = af.Amos([a], lr=0.01, reduce_axes=2)
    _grads([a], 0)
    opt.step()
    opt.param_groups[0]["params"].append(b)
    _grads([a, b], 1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(torch.float32, shape \(3, 4\), "
                                         r"on cpu\): reduce_axes \(2,\): dim 2 is out of range"):
        opt.step()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] .*dim 2 is out of range"):
        af.Amos([a, b], lr=0.01, reduce_axes=2)


@pytest.mark.parametrize("edit", ["reversed", "appended", "whole-list"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,key", [(af.Amos, "eta"), (af.ScaledAdamW, "init_norm")], ids=["Amos", "ScaledAdamW"])
def test_inferred_values_follow_their_params_through_a_copy_of_the_group(cls, key, backend, edit):
    """The group dict replaced by a copy with its params reordered or extended
    (``opt.param_groups[0] = {**g, 'params': [b, a]}``, or a new list of copies):
    each param keeps its inferred value, a new one gets its own, as when the same
    edit is made on the group itself."""
    results = []
    for through_copy in (False, True):
        a, b, c = (torch.nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) * scale)
                   for s, scale in ((0, 0.1), (1, 2.0), (2, 1.0)))
        kwargs = dict(lr=0.01, eta=None) if cls is af.Amos else dict(lr=1e-3, half_life=10)
        opt = cls([a, b], backend=backend, **kwargs)
        _grads([a, b, c], 0)
        opt.step()
        params = [b, a] if edit == "reversed" else [a, b, c]
        if not through_copy:
            opt.param_groups[0]["params"] = params
        elif edit == "whole-list":
            opt.param_groups = [{**opt.param_groups[0], "params": params}]
        else:
            opt.param_groups[0] = {**opt.param_groups[0], "params": params}
        opt.step()
        results.append(opt.param_groups[0][key])
    assert results[1] == results[0]


def test_a_group_that_is_no_dict_or_whose_params_are_no_list_is_named():
    """torch.optim's add_param_group makes every group a dict with a list of params
    (it refuses a set, whose order changes between runs): an entry written
    otherwise is refused by name, before any write."""
    from conftest import assert_unchanged, snapshot
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = af.Amos([a], lr=0.01)
    _grads([a, b], 0)
    before = snapshot(opt, [a, b])
    opt.param_groups.append([b])
    with pytest.raises(TypeError, match=r"^Amos: param_groups\[1\] must be a dict, as add_param_group makes it, "
                                        r"got list"):
        opt.step()
    assert_unchanged(before, opt, [a, b])
    opt.param_groups[1] = {**opt.param_groups[0], "params": {b}}
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\] must be a list of tensors.*got set"):
        opt.step()
    opt.param_groups[1]["params"] = (q for q in [b])
    with pytest.raises(TypeError, match=r"got generator"):
        opt.step()
    del opt.param_groups[1]["params"]
    with pytest.raises(KeyError, match=r"param_groups\[1\] has no 'params'"):
        opt.step()
    assert_unchanged(before, opt, [a, b])


@pytest.mark.parametrize("edit", ["copies-swapped", "copy-then-delete", "delete-then-copy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,key", [(af.Amos, "eta"), (af.ScaledAdamW, "init_norm")], ids=["Amos", "ScaledAdamW"])
def test_inferred_values_follow_their_params_through_a_copy_put_at_another_index(cls, key, backend, edit):
    """Groups [{c}, {a, b}]; the second replaced by a copy with its params reversed
    that ends up at another index (the groups' order swapped, or the first group
    deleted before or after): each param keeps its inferred value, and the params
    step as when the same edit keeps the groups' order."""
    results = []
    for moved in (False, True):
        a, b, c = (torch.nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) * scale)
                   for s, scale in ((0, 0.1), (1, 2.0), (2, 1.0)))
        kwargs = dict(lr=0.01, eta=None) if cls is af.Amos else dict(lr=1e-3, half_life=10)
        opt = cls([{"params": [c]}, {"params": [a, b]}], backend=backend, **kwargs)
        _grads([a, b, c], 0)
        opt.step()
        first, second = opt.param_groups
        values = dict(zip(map(id, second["params"]), second[key]))
        copy = {**second, "params": [b, a]}
        if not moved:
            opt.param_groups[1] = copy
        elif edit == "copies-swapped":
            opt.param_groups = [copy, dict(first)]
        elif edit == "copy-then-delete":
            opt.param_groups[1] = copy
            del opt.param_groups[0]
        else:
            del opt.param_groups[0]
            opt.param_groups[0] = copy
        _grads([a, b, c], 1)
        opt.step()
        group = next(g for g in opt.param_groups if len(g["params"]) == 2)
        assert dict(zip(map(id, group["params"]), group[key])) == values
        results.append((a.detach().clone(), b.detach().clone()))
    assert all(torch.equal(x, y) for x, y in zip(*results))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_sharing_one_eta_tuple_each_keep_their_values_through_copies(backend):
    """Two groups given the same eta tuple object, both replaced by copies with their
    params reversed: each copy's params keep their own values (the copies are
    matched to the groups they copy by their params, not only by the tuple)."""
    a1, a2, b1, b2 = (torch.nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(s)))
                      for s in range(4))
    eta = (0.1, 0.2)
    opt = af.Amos([{"params": [a1, a2], "eta": eta}, {"params": [b1, b2], "eta": eta}], lr=0.01, backend=backend)
    _grads([a1, a2, b1, b2], 0)
    opt.step()
    first, second = opt.param_groups
    opt.param_groups = [{**first, "params": [a2, a1]}, {**second, "params": [b2, b1]}]
    _grads([a1, a2, b1, b2], 1)
    opt.step()
    assert [g["eta"] for g in opt.param_groups] == [(0.2, 0.1), (0.2, 0.1)]
