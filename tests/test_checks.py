"""amos_fused/checks.py: bad grads, params or groups are refused at step()
BEFORE anything is written: after a failed step every param and every state
tensor is bitwise what it was, also when only the second param group is bad.
Non-finite grads and grads with other strides than their param are not errors
and behave like torch.optim.AdamW.  (Hyper-parameters refused at construction:
test_api.py.)"""
from __future__ import annotations

import re

import pytest
import torch

import amos_fused as af
from conftest import (
    raises_naming,
    assert_params_close,
    assert_state_close,
    assert_unchanged,
    clone_params,
    hang_guard,
    make_grads,
    make_params,
    param_groups,
    set_grads,
    snapshot,
    states_of,
    step_together,
)
from registry import CASES


# ---------------------------------------------------------------------------
# step(): nothing is written when a step fails
# ---------------------------------------------------------------------------

class AnyGrad(torch.Tensor):
    """A param whose .grad may be anything (torch's setter refuses a grad on
    another device type, which a buggy wrapper could still hand over)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def grad(self):
        return self.__dict__.get("_any_grad")

    @grad.setter
    def grad(self, value):
        self.__dict__["_any_grad"] = value


def _any_grad_param(p):
    return AnyGrad._make_subclass(AnyGrad, p.detach().clone(), True)


# id -> (registry case, backend, overrides of the second param group)
OPTIMIZERS = {
    "adamw-cpu": ("adamw-amsgrad", "cpu", None),
    "adamw-reference": ("adamw-amsgrad", "reference", None),
    "adam-cpu": ("adam-l2", "cpu", None),
    "radam-cpu": ("radam-no_decay", "cpu", None),
    "lion-cpu": ("lion-wd0.1", "cpu", None),
    "amos-reference": ("amos-eta-momentum", "reference", {"lr": 3e-3}),
}

# kind -> the exception step() must raise
KINDS = {
    "sparse-grad": RuntimeError,
    "grad-dtype": TypeError,
    "grad-shape": ValueError,
    "grad-on-meta": ValueError,
    "mixed-devices": ValueError,
    "negative-lr": ValueError,
}
# The param that gets the bad grad, per group: a 2-D param in each group.
TARGET = {0: 2, 1: 6}


def _corrupt(kind, opt, params, group_index):
    """Makes group ``group_index`` of ``opt`` bad in the way ``kind`` says."""
    group = opt.param_groups[group_index]
    p = params[TARGET[group_index]]
    if kind == "sparse-grad":
        p.grad = p.grad.to_sparse()
    elif kind == "grad-dtype":
        p.grad.data = p.grad.data.float()  # torch's .grad setter refuses this; .data does not
    elif kind == "grad-shape":
        p.grad.data = torch.randn(p.shape[::-1], dtype=p.dtype)
    elif kind == "grad-on-meta":
        assert isinstance(p, AnyGrad)
        p.grad = torch.empty(p.shape, dtype=p.dtype, device="meta")
    elif kind == "mixed-devices":
        stranger = torch.empty(3, 2, dtype=torch.float64, device="meta", requires_grad=True)
        stranger.grad = torch.empty(3, 2, dtype=torch.float64, device="meta")
        group["params"].append(stranger)
    elif kind == "negative-lr":
        group["lr"] = -1e-3
    else:  # pragma: no cover
        raise AssertionError(kind)


def _undo(kind, opt, group_index, saved_lr):
    group = opt.param_groups[group_index]
    if kind == "mixed-devices":
        group["params"].pop()
    if kind == "negative-lr":
        group["lr"] = saved_lr


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["fresh", "warm"])
@pytest.mark.parametrize("group_index", [0, 1], ids=["group0", "group1"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_failed_step_writes_nothing(name, kind, group_index, warm_steps):
    case, backend, second = OPTIMIZERS[name]
    make = CASES[case].factory(backend)
    base = make_params(torch.float64)
    if kind == "grad-on-meta":
        base[TARGET[group_index]] = _any_grad_param(base[TARGET[group_index]])
    params = [_any_grad_param(b) if isinstance(b, AnyGrad) else c for b, c in zip(base, clone_params(base))]
    twin = clone_params(base)  # never sees the bad step
    opt = make(param_groups(params, second))
    twin_opt = make(param_groups(twin, second))

    for step in range(warm_steps):
        grads = make_grads(base, step)
        set_grads(params, grads)
        set_grads(twin, grads)
        opt.step()
        twin_opt.step()

    grads = make_grads(base, warm_steps)
    set_grads(params, grads)
    saved_lr = opt.param_groups[group_index]["lr"]
    _corrupt(kind, opt, params, group_index)
    before = snapshot(opt, params)
    with pytest.raises(KINDS[kind]) as info:
        opt.step()
    assert_unchanged(before, opt, params)
    if kind != "negative-lr":  # the error names the param group
        assert f"param_groups[{group_index}]" in str(info.value)
    if warm_steps == 0:
        assert all(not s for s in states_of(opt, params)), "a failed first step created state"

    # Repaired, the next step is the step the twin takes: nothing was half-done.
    _undo(kind, opt, group_index, saved_lr)
    set_grads(params, grads)
    set_grads(twin, grads)
    opt.step()
    twin_opt.step()
    for a, b in zip(params, twin):
        assert torch.equal(a.detach(), b.detach())
    for sa, sb in zip(states_of(opt, params), states_of(twin_opt, twin)):
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("grad_shape", [(3, 2), (2, 3, 1), (6,)], ids=["swapped", "rank3", "rank1"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("make", [
    lambda ps, b: af.Amos(ps, lr=0.1, backend=b),
    lambda ps, b: af.Amos8bit(ps, lr=0.1, momentum=0.9, backend=b),
    lambda ps, b: af.AdamW(ps, backend=b),
], ids=["amos", "amos8bit", "adamw"])
def test_grad_of_another_shape_for_a_transposed_param_is_named(make, backend, grad_shape):
    """A dense param in another dim order (here transposed), which Amos's kernels walk
    as a row-major view, with a grad of another shape or rank: a ValueError naming
    the param and both shapes, before anything is written."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(3, 2, generator=gen).t().requires_grad_(True)  # (2, 3), column-major
    q = torch.randn(5, generator=gen, requires_grad=True)
    opt = make([q, p], backend)
    q.grad, p.grad = torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)
    opt.step()
    p.grad.data = torch.randn(grad_shape, generator=gen)
    before = snapshot(opt, [q, p])
    raises_naming(ValueError, opt.step, r"param_groups\[0\]\['params'\]\[1\]",
                  re.escape(f"grad has shape {grad_shape}, expected (2, 3)"))
    assert_unchanged(before, opt, [q, p])


def _non_dense_leaf():
    storage = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    view = storage[:, ::2]  # a leaf (no requires_grad) that is not dense in memory
    assert view.is_leaf and not view.is_contiguous()
    grad = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    return storage, view, grad  # grad: contiguous, so its strides differ from the view's


def test_non_dense_param_refused_by_cpu_backend():
    storage, view, grad = _non_dense_leaf()
    view.grad = grad
    opt = af.AdamW([view], lr=1e-2, backend="cpu")
    before = storage.clone()
    with hang_guard():
        with pytest.raises(ValueError, match="dense"):
            opt.step()
    assert torch.equal(storage, before) and not opt.state[view]


def test_non_dense_param_stepped_by_reference_backend():
    storage, view, grad = _non_dense_leaf()
    view.grad = grad
    theirs_param = view.detach().clone()
    theirs_param.grad = grad.clone()
    ours = af.AdamW([view], lr=1e-2, backend="reference")
    theirs = torch.optim.AdamW([theirs_param], lr=1e-2)
    with hang_guard():
        ours.step()
    theirs.step()
    torch.testing.assert_close(view, theirs_param)
    assert torch.equal(storage[:, 1::2], _non_dense_leaf()[0][:, 1::2])  # the gaps are untouched


# ---------------------------------------------------------------------------
# not errors: non-finite grads, grads with other strides
# ---------------------------------------------------------------------------

def _non_finite_grads(params, step):
    grads = make_grads(params, step)
    if step == 2:
        grads[2][0, 0] = float("inf")
        grads[2][3, 1] = float("nan")
        grads[3][5] = -float("inf")
        grads[0] = torch.tensor(float("nan"), dtype=grads[0].dtype)
    return grads


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_grads_propagate_like_torch(backend, amsgrad):
    base = make_params(torch.float64)
    ours_params, torch_params = clone_params(base), clone_params(base)
    ours = af.AdamW(param_groups(ours_params), lr=1e-2, amsgrad=amsgrad, backend=backend)
    theirs = torch.optim.AdamW(param_groups(torch_params), lr=1e-2, amsgrad=amsgrad)
    for step in range(6):
        step_together(_non_finite_grads(base, step), (ours_params, ours), (torch_params, theirs))
    assert torch.isnan(ours_params[2]).any() and torch.isnan(ours_params[0])
    assert torch.isfinite(ours_params[4]).all()  # untouched by the bad grads
    assert_params_close(ours_params, torch_params, equal_nan=True)
    assert_state_close(states_of(ours, ours_params), states_of(theirs, torch_params), equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grad_with_other_strides(backend):
    params = [torch.randn(7, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)]
    twins = clone_params(params)
    ours = af.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=backend)
    theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, amsgrad=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        g0 = torch.randn(5, 7, generator=gen, dtype=torch.float64).t()  # 7x5, column-major
        g1 = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64).permute(1, 2, 0)
        assert g0.stride() != params[0].stride() and g1.stride() != params[1].stride()
        params[0].grad, params[1].grad = g0, g1
        twins[0].grad, twins[1].grad = g0.contiguous(), g1.contiguous()
        kept = (g0.clone(), g1.clone())
        ours.step()
        theirs.step()
        assert torch.equal(params[0].grad, kept[0]) and torch.equal(params[1].grad, kept[1])
    assert_params_close(params, twins)
    assert_state_close(states_of(ours, params), states_of(theirs, twins))
    for p, state in zip(params, states_of(ours, params)):
        assert state["exp_avg"].stride() == p.stride()


# ---------------------------------------------------------------------------
# per-param settings edited after construction
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_amos_eta_tuple_of_wrong_length_is_a_value_error(backend):
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = af.Amos(params, lr=0.01, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["eta"] = (0.5,)
    raises_naming(ValueError, opt.step, r"param_groups\[0\]\['eta'\]", "1 values for 2 params")
    assert_unchanged(before, opt, params)
    extra = torch.randn(3, requires_grad=True)
    extra.grad = torch.ones(3)
    opt.param_groups[0]["eta"] = (0.5, 0.5)
    opt.param_groups[0]["params"].append(extra)
    raises_naming(ValueError, opt.step, "2 values for 3 params")
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_amos_reduce_axes_changed_after_state_is_refused_before_any_write(backend):
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(6, 2, requires_grad=True)]
    opt = af.Amos(params, lr=0.01, eta=0.5, reduce_axes=(1,), backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["reduce_axes"] = "all"
    raises_naming(ValueError, opt.step, "reduce_axes", r"\(4, 1\)")
    assert_unchanged(before, opt, params)
    # Clearing the state starts the slots anew with the new axes, like a fresh optimizer.
    opt.state.clear()
    opt.step()
    assert all(opt.state[p]["v"].shape == () for p in params)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_amos_momentum_switched_on_creates_mu(backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen).requires_grad_()]
    twin = [params[0].detach().clone().requires_grad_()]
    opt = af.Amos(params, lr=0.01, eta=0.5, backend=backend)
    fresh = None
    for step in range(4):
        g = torch.randn(4, 3, generator=gen)
        params[0].grad = g.clone()
        if step == 2:
            opt.param_groups[0]["momentum"] = 0.9
            # A fresh optimizer with momentum, from the same point and state.
            fresh = af.Amos(twin, lr=0.01, eta=0.5, momentum=0.9, backend=backend)
            twin[0].data.copy_(params[0].detach())
            fresh.state[twin[0]].update({k: v.clone() for k, v in opt.state[params[0]].items()})
        if fresh is not None:
            twin[0].grad = g.clone()
            fresh.step()
        opt.step()
    assert "mu" in opt.state[params[0]]
    assert torch.equal(params[0].detach(), twin[0].detach())


def _two_stepped(make, backend):
    params = [torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    opt = make(params, backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, params


_ADAM_FAMILY = [lambda ps, b: af.AdamW(ps, lr=1e-2, backend=b), lambda ps, b: af.Adam(ps, lr=1e-2, backend=b),
                lambda ps, b: af.RAdam(ps, lr=1e-2, backend=b)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("make", _ADAM_FAMILY, ids=["AdamW", "Adam", "RAdam"])
def test_a_step_counter_shared_by_two_params_is_refused_before_any_write(make, backend):
    """torch.optim advances a shared state['step'] once per param, each param
    seeing another count; the fused kernels read every count before advancing
    any.  Neither is what sharing it means: refused, by name, nothing written."""
    opt, params = _two_stepped(make, backend)
    shared = torch.tensor(1.0)
    for p in params:
        opt.state[p]["step"] = shared
    before = snapshot(opt, params)
    raises_naming(ValueError, opt.step, r"params'\]\[1\]", r"state\['step'\] is also another param's")
    assert_unchanged(before, opt, params)
    assert float(shared) == 1.0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["int64", "float64", "float64-views", "across-groups"])
def test_a_shared_step_counter_the_step_would_convert_is_refused(kind, backend):
    """A counter of another dtype (torch.tensor(1), a float64 count) is replaced by a
    float32 one of each param's own at the step; one shared by two params (the same
    tensor, or two views of its element) is refused all the same, by name, nothing
    written: torch.optim would advance it once per param."""
    opt, params = _two_stepped(_ADAM_FAMILY[0], backend)
    if kind == "across-groups":
        opt.param_groups[:] = [{**opt.param_groups[0], "params": [params[0]]},
                               {**opt.param_groups[0], "params": [params[1]]}]
    dtype = torch.int64 if kind == "int64" else torch.float64
    shared = torch.tensor([1], dtype=dtype)
    counter = shared.view(())
    opt.state[params[0]]["step"] = counter
    opt.state[params[1]]["step"] = shared[0] if kind == "float64-views" else counter
    before = snapshot(opt, params)
    where = r"param_groups\[1\]\['params'\]\[0\]" if kind == "across-groups" else r"params'\]\[1\]"
    raises_naming(ValueError, opt.step, where, r"state\['step'\] is also another param's")
    assert_unchanged(before, opt, params)
    assert int(shared) == 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("alias", ["param", "param's_storage", "other_state"])
def test_a_state_sharing_memory_with_its_param_or_another_state_is_refused(alias, backend):
    """A state written in place in the same pass as its param (or as another state
    of it) would read values the step already wrote: torch.optim, the reference
    and the kernels would each give other numbers.  Refused, by name."""
    opt, params = _two_stepped(_ADAM_FAMILY[0], backend)
    p = params[1]
    if alias == "param":
        opt.state[p]["exp_avg"] = p.data
    elif alias == "param's_storage":  # a view of the same memory with other metadata
        opt.state[p]["exp_avg_sq"] = torch.as_strided(p.detach(), p.shape, p.stride())
    else:
        opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg"]
    before = snapshot(opt, params)
    key = "exp_avg" if alias == "param" else "exp_avg_sq"
    raises_naming(ValueError, opt.step, r"params'\]\[1\]", rf"state\['{key}'\].*shares memory")
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_states_next_to_their_param_in_one_buffer_are_stepped(backend):
    """Params and states carved from one buffer without overlap are not refused
    (the check compares the bytes each tensor spans), and step as separate ones do."""
    buffer = torch.zeros(3 * 300)
    params = [torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    opts = [af.AdamW([p], lr=1e-2, backend=backend) for p in params]
    p_own, p_buffered = params
    p_buffered.data = buffer[:300].copy_(p_buffered.detach())
    grads = torch.randn(300, generator=torch.Generator().manual_seed(5))
    for opt, p in zip(opts, params):
        p.grad = grads.clone()
        opt.step()
    opts[1].state[p_buffered]["exp_avg"] = buffer[300:600].copy_(opts[1].state[p_buffered]["exp_avg"])
    opts[1].state[p_buffered]["exp_avg_sq"] = buffer[600:].copy_(opts[1].state[p_buffered]["exp_avg_sq"])
    for opt, p in zip(opts, params):
        p.grad = grads.clone()
        opt.step()
    assert torch.equal(p_own.detach(), p_buffered.detach())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("alias", ["v_is_param", "b_is_v", "b_is_param", "mu_is_v"])
def test_an_amos_slot_sharing_memory_with_its_param_or_another_state_is_refused(alias, backend):
    """Amos's slots v and b (here elementwise: shaped like the param) are written in
    place like its states: sharing memory with the param, a state or each other is
    refused by name, before any write."""
    params = [torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    opt = af.Amos(params, lr=0.1, reduce_axes=None, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    p, st = params[1], opt.state[params[1]]
    key, target = {"v_is_param": ("v", p.data), "b_is_v": ("b", st["v"]), "b_is_param": ("b", p.data),
                   "mu_is_v": ("mu", st["v"])}[alias]
    st[key] = target
    before = snapshot(opt, params)
    raises_naming(ValueError, opt.step, r"params'\]\[1\]", r"shares memory")
    assert_unchanged(before, opt, params)


def test_column_slices_of_one_weight_share_no_memory_and_overlapping_ones_are_found():
    """Strided params (stepped on the reference): per-head column slices of one weight
    interleave without sharing an element; two that share a column are found, and
    a float32 view and a bfloat16 view of the same bytes too."""
    from amos_fused.checks import first_overlap
    w = torch.randn(48, 64 * 12)
    heads = [w[:, h * 64:(h + 1) * 64] for h in range(12)]
    assert first_overlap(heads) is None
    assert first_overlap(heads + [w[:, 100:101]]) == (1, 12)
    assert first_overlap([w[:, 0::2], w[:, 1::2]]) is None
    assert first_overlap([w[:, 0::2], w[:, 2::4]]) == (0, 1)
    flat = torch.zeros(64)
    assert first_overlap([flat[0::2], flat.view(torch.bfloat16)[4:6]]) == (0, 1)  # bytes 8..11: element 2
    assert first_overlap([flat[0::2], flat.view(torch.bfloat16)[2:4]]) is None  # bytes 4..7: element 1
    assert first_overlap([torch.zeros(0), flat[0::2], flat[1::2]]) is None


@pytest.mark.parametrize("heads", [12, 96])
def test_many_column_slices_are_checked_at_construction(heads):
    """(linear in their bytes: 96 slices of one weight construct at once)"""
    w = torch.randn(64, 16 * heads)
    params = [torch.nn.Parameter(w[:, h * 16:(h + 1) * 16]) for h in range(heads)]
    opt = af.AdamW(params, lr=1e-3, backend="reference")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_an_expanded_param_does_not_overlap_itself():
    """A frozen zero-stride param shares memory among its own elements only: no
    overlap with another param (torch.optim accepts the pair too)."""
    from amos_fused.checks import first_overlap
    buf = torch.zeros(8, 8)
    a, b = buf[:, :4], buf[:, 4:5].expand(8, 4)
    assert first_overlap([a, b]) is None and first_overlap([b]) is None
    assert first_overlap([b, buf[:, 4:5]]) == (0, 1)
    af.AdamW([torch.nn.Parameter(a), torch.nn.Parameter(b, requires_grad=False)], lr=0.1, backend="reference")
