"""Corners of torch.optim's semantics met between steps: a param swapped for one
of another memory format, params swapped into sharing memory, a step counter of
another dtype, state entries that are not tensors or that are expanded views,
Amos params whose dims the fused kernels cannot walk, and group values (flags,
keys deleted, per-param values) that only a later group's step would read.  torch.optim steps what it
can; what cannot be stepped raises before anything is written."""
import copy

import numpy as np
import pytest
import torch

import amos_fused as af

BACKENDS = ["cpu", "reference"]


def _snapshot(opt):
    """Every param and state value of opt, cloned (non-tensors as they are)."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in st.items()}
             if isinstance(st, dict) else copy.deepcopy(st) for p, st in opt.state.items()}
    return params, state


def _assert_unchanged(opt, snapshot):
    params, state = snapshot
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    for before, after in zip(params, now):
        assert torch.equal(before, after)
    assert set(state) == {id(p) for p in opt.state}
    for p, st in opt.state.items():
        if not isinstance(st, dict):  # (a user's bad entry, left as it was)
            assert st == state[id(p)]
            continue
        assert set(st) == set(state[id(p)])
        for key, value in st.items():
            old = state[id(p)][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == old.dtype, key
                torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=key)
            else:
                assert value == old, key


def _assert_refused(opt, match):
    """opt.step() raises a ValueError matching ``match`` and changes nothing."""
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(opt, snapshot)


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


# ---- a param swapped for one of another memory format -------------------------

LAYOUT_CASES = {
    "AdamW": (af.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "Lion": (af.Lion, dict(lr=1e-3, weight_decay=0.1)),
    "Amos-elementwise": (af.Amos, dict(lr=0.01, eta=0.1)),
    "Amos-rows": (af.Amos, dict(lr=0.01, eta=0.1, reduce_axes=(1, 2, 3))),
    "Amos-dim0": (af.Amos, dict(lr=0.01, eta=0.1, reduce_axes=(0,))),
    "ScaledAdamW": (af.ScaledAdamW, dict(lr=1e-3, half_life=10)),
    "Lamb": (af.Lamb, dict(lr=1e-3)),
    "AdamW8bit": (af.AdamW8bit, dict(lr=1e-2)),
    "AdamW-master": (af.AdamW, dict(lr=1e-2, master_weights=True)),
}


def _conv_weight(dtype):
    return torch.nn.Parameter(torch.randn(8, 16, 6, 6, generator=torch.Generator().manual_seed(0)).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_a_param_swapped_into_another_memory_format_keeps_stepping(name, backend):
    """``model.to(memory_format=torch.channels_last)`` between steps: the states
    follow the param's new layout (elementwise math: the same values as a run that
    never switched; Amos rows are summed in the new memory order, FP8 codes are
    re-encoded in it, a master is remade from the replaced param: close, not
    bitwise)."""
    cls, kwargs = LAYOUT_CASES[name]
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    switched, kept = _conv_weight(dtype), _conv_weight(dtype)
    opt_switched = cls([switched], backend=backend, **kwargs)
    opt_kept = cls([kept], backend=backend, **kwargs)
    for step in range(5):
        if step == 2:
            switched.data = switched.data.contiguous(memory_format=torch.channels_last)
        for p, opt in ((switched, opt_switched), (kept, opt_kept)):
            _grads([p], step)
            opt.step()
    assert switched.is_contiguous(memory_format=torch.channels_last)
    if name in ("AdamW", "Lion", "Amos-elementwise"):
        assert torch.equal(switched.detach(), kept.detach())
    elif name == "AdamW8bit":  # moments requantized once: e4m3 codes are good to 2^-4 of their value
        torch.testing.assert_close(switched.detach(), kept.detach(), rtol=0, atol=kwargs["lr"])
    elif name == "AdamW-master":  # a replaced param gets its master remade from it (bfloat16 bits)
        torch.testing.assert_close(switched.detach(), kept.detach(), rtol=2**-7, atol=1e-3)
    else:
        torch.testing.assert_close(switched.detach(), kept.detach(), rtol=1e-3, atol=1e-4)
    for key, value in opt_switched.state[switched].items():
        if isinstance(value, torch.Tensor) and value.shape == switched.shape:
            assert value.stride() == switched.stride(), key


def test_amos_slots_follow_the_new_memory_order():
    """Slots of reduced dims are laid out in the param's memory order, after a
    swap too (the fused walk permutes both into it)."""
    p = _conv_weight(torch.float32)
    opt = af.Amos([p], lr=0.01, eta=0.1, reduce_axes=(0,))
    _grads([p], 0)
    opt.step()
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    _grads([p], 1)
    opt.step()
    order = sorted(range(4), key=lambda d: -p.stride(d))
    assert opt.state[p]["v"].permute(order).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "Lion", "Amos-elementwise", "AdamW8bit"])
def test_states_sharing_memory_are_refused_after_a_memory_format_change_too(name, backend):
    """Re-laying the states of a param swapped into another memory format would copy
    two states that share memory into two that do not: the step refuses them as it
    does without the swap, before any write."""
    from conftest import assert_unchanged, snapshot
    cls, kwargs = LAYOUT_CASES[name]
    p = _conv_weight(torch.float32)
    opt = cls([p], backend=backend, **kwargs)
    _grads([p], 0)
    opt.step()
    keys = [k for k, v in opt.state[p].items() if k != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape]
    victim = keys[-1]
    opt.state[p][victim] = p.data if len(keys) == 1 else opt.state[p][keys[0]]
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    if len(keys) == 1:  # (the state that was p's memory shares the new param's no longer: alias it again)
        opt.state[p][victim] = p.data
    _grads([p], 1)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match=rf"state\[{victim!r}\].*shares memory with its param or with another"):
        opt.step()
    assert_unchanged(before, opt, [p])


EIGHT_BIT_CASES = {
    "AdamW8bit": (af.AdamW8bit, dict(lr=1e-2, weight_decay=0.1)),
    "Adam8bit": (af.Adam8bit, dict(lr=1e-2)),
    "RAdam8bit": (af.RAdam8bit, dict(lr=1e-2)),
    "Lion8bit": (af.Lion8bit, dict(lr=1e-3, weight_decay=0.1)),
    "Amos8bit": (af.Amos8bit, dict(lr=0.01, eta=0.1, momentum=0.9, reduce_axes=())),
}


def _strided_copy(t):
    """t's values in every other element of a buffer twice its size: a strided
    view (not dense) of t's shape and memory order."""
    buffer = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    buffer[..., ::2] = t
    return buffer[..., ::2]


def _column_major(t):
    return t.t().contiguous().t() if t.dim() == 2 else t.contiguous()


@pytest.mark.parametrize("shape,start,back_to", [  # (a 1-D param has one dense order)
    ((8192,), "row-major", "row-major"), ((64, 128), "row-major", "row-major"),
    ((64, 128), "row-major", "column-major"), ((64, 128), "column-major", "column-major")], ids=str)
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("name", EIGHT_BIT_CASES)
def test_fp8_codes_follow_a_param_swapped_to_and_from_a_strided_view(name, shape, master, start, back_to):
    """``p.data`` set to a strided view (of row-major order) between steps, stepped
    by the reference as torch.optim steps it, then back to a dense tensor, of that
    order or another, stepped by the fused kernels again: the FP8 codes follow the
    strides of the tensor the step writes (the param's, or its dense float32
    master's, remade in the new order), and the run equals bitwise one that never
    took the strided view (its param switched to the same dense orders at the
    same steps: Amos's slots follow them)."""
    cls, kwargs = EIGHT_BIT_CASES[name]
    dtype = torch.bfloat16 if master else torch.float32
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if start == "column-major":
        init = _column_major(init)
    switched, kept = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_switched = cls([switched], backend="reference", master_weights=master, **kwargs)
    opt_kept = cls([kept], backend="reference", master_weights=master, **kwargs)
    for step in range(6):
        if step == 2:
            switched.data, kept.data = _strided_copy(switched.data), kept.data.contiguous()
        if step == 4:
            dense = _column_major if back_to == "column-major" else torch.Tensor.contiguous
            switched.data, kept.data = dense(switched.data), dense(kept.data)
            opt_switched.param_groups[0]["backend"] = "cpu"
            opt_kept.param_groups[0]["backend"] = "cpu"
        for p, opt in ((switched, opt_switched), (kept, opt_kept)):
            _grads([p], step)
            opt.step()
        stepped = opt_switched.state[switched].get("master_param", switched)
        codes = [v for v in opt_switched.state[switched].values() if v.dtype == torch.uint8]
        assert codes and all(c.stride() == stepped.stride() for c in codes)
        assert torch.equal(switched.detach(), kept.detach())
    for key, value in opt_kept.state[kept].items():
        assert torch.equal(opt_switched.state[switched][key], value), key


def test_a_full_precision_state_beside_fp8_absmax_is_named_as_such():
    """A param grown past the 8-bit threshold between steps (p.data of 5000
    elements where it had 4000: torch.optim's step fails on the sizes) keeps its
    full-precision state, which FP8 codes cannot replace: refused, naming it as a
    full-precision state rather than as codes missing their absmax, which do get
    that message."""
    p = torch.nn.Parameter(torch.randn(4000))
    opt = af.AdamW8bit([p], lr=1e-2)
    _grads([p], 0)
    opt.step()
    p.data = torch.randn(5000)
    _grads([p], 1)
    _assert_refused(opt, r"state 'exp_avg' is a full-precision state \(torch.float32, shape \(4000,\)\), where "
                         r"this param keeps FP8 states \(uint8 codes with 'exp_avg_absmax'")
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(5000, dtype=torch.uint8),
                    "exp_avg_sq": torch.zeros(5000, dtype=torch.uint8), "exp_avg_sq_absmax": torch.zeros(20)}
    _assert_refused(opt, "state 'exp_avg' is there but 'exp_avg_absmax' is missing")
    del opt.state[p]
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8


# ---- params swapped into sharing memory ----------------------------------------

def _two_params():
    return torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(5000))


@pytest.mark.parametrize("layout", ["one-group", "two-groups", "8bit-buckets", "reference"])
def test_params_swapped_into_sharing_memory_are_refused_before_any_write(layout):
    a, b = _two_params()
    if layout == "two-groups":
        opt = af.AdamW([{"params": [b]}, {"params": [a]}], lr=0.1)
    elif layout == "8bit-buckets":  # b keeps FP8 states, a full precision: two buckets
        opt = af.AdamW8bit([b, a], lr=0.1)
    else:
        opt = af.AdamW([b, a], lr=0.1, backend="reference" if layout == "reference" else None)
    _grads([a, b], 0)
    opt.step()
    a.data = b.data[:6]
    _grads([a, b], 1)
    _assert_refused(opt, "shares memory")
    a.data = torch.randn(6)  # apart again: steps
    opt.step()


# ---- state entries --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float16])
def test_a_step_counter_of_another_dtype_steps_like_torch(backend, dtype):
    """``state['step'] = torch.tensor(10)`` (torch.optim steps from it): the step
    reads it as that count, and keeps it from then on as a float32 CPU scalar."""
    ours, theirs = torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(7))
    theirs.data.copy_(ours.data)
    opt = af.AdamW([ours], lr=0.1, backend=backend)
    ref = torch.optim.AdamW([theirs], lr=0.1)
    for opt_, p in ((opt, ours), (ref, theirs)):
        _grads([p], 0)
        opt_.step()
        opt_.state[p]["step"] = torch.tensor(10, dtype=dtype)
        _grads([p], 1)
        opt_.step()
    step = opt.state[ours]["step"]
    assert float(step) == 11.0
    assert (step.dtype, step.dim(), step.device.type) == (torch.float32, 0, "cpu")
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [None, 0.5, "x"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_state_entry_that_is_not_a_tensor_is_named_before_any_write(backend, value, key):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.state[b][key] = value
    _assert_refused(opt, rf"param_groups\[1\]\['params'\]\[0\].*state\['{key}'\] must be a tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5,), (4, 5)])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_an_expanded_state_is_refused_before_any_write(key, shape, backend):
    """No state whose elements share memory is stepped (torch's in-place ops would
    refuse it half-way through the step): the reference, which takes any strides,
    checks for it; the fused kernels take states with the param's strides only (an
    expanded state is not re-laid out like a state of another memory format)."""
    a, b = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.state[b][key] = torch.zeros([1] * len(shape)).expand(shape)
    snapshot = _snapshot(opt)
    problem = "share memory" if backend == "reference" else "strides"
    with pytest.raises(ValueError, match=rf"param_groups\[1\]\['params'\]\[0\].*state\['{key}'\].*{problem}"):
        opt.step()
    _assert_unchanged(opt, snapshot)


# ---- Amos params the fused kernels cannot walk ---------------------------------

def test_amos_dims_beyond_the_fused_walk_are_refused_before_any_write():
    """17 dims, alternately reduced: 17 runs of dims, one more than the fused
    kernels walk.  The cpu backend refuses it (naming the param and the way out)
    before group 0 is written; the reference steps it."""
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn([2] * 17))

    def groups():
        return [{"params": [a], "reduce_axes": (1,)}, {"params": [b], "reduce_axes": tuple(range(0, 17, 2))}]
    opt = af.Amos(groups(), lr=0.01, eta=0.1)
    _grads([a, b], 0)
    _assert_refused(opt, r"param_groups\[1\]\['params'\]\[0\].*backend='reference'")
    reference = af.Amos(groups(), lr=0.01, eta=0.1, backend="reference")
    before = b.detach().clone()
    reference.step()
    assert not torch.equal(b.detach(), before)


def test_amos_16_runs_of_dims_are_walked_by_the_fused_kernels():
    b = torch.nn.Parameter(torch.randn([2] * 16, dtype=torch.float64))
    twin = torch.nn.Parameter(b.detach().clone())
    axes = tuple(range(0, 16, 2))
    fused = af.Amos([b], lr=0.01, eta=0.1, reduce_axes=axes)
    reference = af.Amos([twin], lr=0.01, eta=0.1, reduce_axes=axes, backend="reference")
    for step in range(2):
        _grads([b], step)
        _grads([twin], step)
        fused.step()
        reference.step()
    torch.testing.assert_close(b.detach(), twin.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_state_laid_out_otherwise_beside_an_unchanged_param_is_refused_on_cpu(key):
    """Re-layout follows the param: a state given another memory format while its
    param kept its own is refused by the fused step (its strides named), before any
    write."""
    a, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4, 6))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    _grads([a, b], 0)
    opt.step()
    opt.state[b][key] = opt.state[b][key].t().contiguous().t()
    _assert_refused(opt, rf"param_groups\[1\]\['params'\]\[0\].*state\['{key}'\].*strides \(1, 4\)")


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_fp8_codes_laid_out_otherwise_beside_an_unchanged_param_are_refused_on_every_backend(key, backend):
    """FP8 codes' blocks follow their memory order, so codes given another memory
    format while their param kept its own are refused by every backend, the
    reference too (which steps full-precision states in any layout), naming the
    state, before any write."""
    if backend == "triton":
        pytest.importorskip("triton")
    a = torch.nn.Parameter(torch.randn(64, 80, generator=torch.Generator().manual_seed(5)))
    opt = af.AdamW8bit([a], lr=0.1, backend=backend)
    _grads([a], 0)
    opt.step()
    opt.state[a][key] = opt.state[a][key].t().contiguous().t()
    _assert_refused(opt, rf"state '{key}' \(torch.uint8, shape \(64, 80\), strides \(1, 64\)")


def test_a_state_laid_out_otherwise_is_stepped_as_it_is_by_the_reference():
    """The reference takes any strides: the same state in another layout steps to the
    same values, and keeps its layout."""
    runs = []
    for relaid in (False, True):
        a = torch.nn.Parameter(torch.arange(24.0).reshape(4, 6) / 7)
        opt = af.AdamW([a], lr=0.1, backend="reference")
        _grads([a], 0)
        opt.step()
        if relaid:
            opt.state[a]["exp_avg"] = opt.state[a]["exp_avg"].t().contiguous().t()
        _grads([a], 1)
        opt.step()
        runs.append((a.detach().clone(), opt.state[a]["exp_avg"]))
    assert runs[1][1].stride() == (1, 4)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [-3.0, float("nan"), float("inf")])
def test_a_negative_nan_or_infinite_step_count_is_refused_before_any_write(backend, count):
    """A count with no bias correction (torch.optim fails on it half-way): refused on
    every backend, naming the param, before group 0 is written."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.state[b]["step"] = torch.tensor(count)
    _assert_refused(opt, r"param_groups\[1\]\['params'\]\[0\].*state\['step'\] must be a finite count >= 0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_count_on_the_meta_device_is_named(backend):
    a = torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([a], lr=0.1, backend=backend)
    _grads([a], 0)
    opt.step()
    opt.state[a]["step"] = torch.zeros((), device="meta")
    _assert_refused(opt, r"param_groups\[0\]\['params'\]\[0\].*state\['step'\]")


@pytest.mark.parametrize("backends", [("cpu", "cpu"), ("reference", "reference"), ("reference", "cpu")])
@pytest.mark.parametrize("name", ["found_inf", "grad_scale"])
def test_grad_scaler_inputs_that_are_not_floating_are_refused_before_any_write(name, backends):
    """GradScaler's found_inf / grad_scale are checked before any group is stepped,
    the same on every backend (none of them creates state first)."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a], "backend": backends[0]}, {"params": [b], "backend": backends[1]}], lr=0.1)
    _grads([a, b], 0)
    setattr(opt, name, torch.tensor(0 if name == "found_inf" else 1, dtype=torch.int64))
    _assert_refused(opt, rf"{name} \(set by torch.amp.GradScaler\) must be a one-element floating")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_swapped_into_another_memory_format_right_after_a_load_keeps_stepping(backend):
    """A checkpoint loaded, then the model moved to channels_last before its next
    step: the loaded states (in the old layout) follow the param."""
    source, target, twin = _conv_weight(torch.float32), _conv_weight(torch.float32), _conv_weight(torch.float32)
    opt = af.AdamW([source], lr=1e-2, backend=backend)
    _grads([source], 0)
    opt.step()
    loaded = af.AdamW([target], lr=1e-2, backend=backend)
    loaded.load_state_dict(opt.state_dict())
    target.data = source.data.contiguous(memory_format=torch.channels_last)
    twin.data = source.data.clone()
    reference = af.AdamW([twin], lr=1e-2, backend=backend)
    reference.load_state_dict(opt.state_dict())
    for p, o in ((target, loaded), (twin, reference)):
        _grads([p], 1)
        o.step()
    assert torch.equal(target.detach(), twin.detach())
    assert loaded.state[target]["exp_avg"].stride() == target.stride()


# ---- every group value a step reads, checked before group 0 is written ------------

FLAG_EDITS = [
    (af.AdamW, "bias_correction", np.array([True, False])),
    (af.Adam, "decoupled_weight_decay", torch.tensor([1, 0])),
    (af.AdamW, "amsgrad", "yes"),
    (af.RAdam, "decoupled_weight_decay", 0.5),
    (af.Lamb, "bias_correction", torch.tensor(True, device="meta")),
    (af.AdamW8bit, "bias_correction", 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,key,value", FLAG_EDITS, ids=lambda v: getattr(v, "__name__", str(v)[:12]))
def test_a_bad_flag_in_the_last_group_is_refused_before_any_write(backend, cls, key, value):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[1][key] = value
    _assert_refused(opt, rf"Invalid {key}: .* \(must be True or False\)")
    with pytest.raises(ValueError, match=rf"{key}.*must be True or False"):
        cls([a], lr=0.1, backend=backend, **{key: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,key", [(af.AdamW, "weight_decay"), (af.RAdam, "decoupled_weight_decay"),
                                     (af.AdamW8bit, "bias_correction"), (af.Lion, "betas"), (af.Amos, "beta"),
                                     (af.ScaledAdamW, "half_life")], ids=lambda v: getattr(v, "__name__", v))
def test_a_group_key_deleted_is_refused_before_any_write(backend, cls, key):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = cls([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    del opt.param_groups[1][key]
    _assert_refused(opt, rf"param_groups\[1\] has no '{key}'")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [None, 0, []], ids=repr)
def test_a_state_that_is_not_a_dict_is_refused_before_any_write(backend, value):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend, track_rms=True)
    _grads([a, b], 0)
    opt.step()
    rms = opt.rms()[a]
    opt.state[b] = value
    _assert_refused(opt, r"param_groups\[1\]\['params'\]\[0\].*its state must be a dict")
    assert opt.rms()[a] == rms


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_dict_state_without_a_param_starts_it_afresh(backend):
    """opt.state replaced by a plain dict (not torch's defaultdict) that lacks a param:
    the param starts afresh, as with opt.state[p] = {} — the others continue."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.state = {a: opt.state[a]}
    opt.step()
    assert float(opt.state[a]["step"]) == 2.0 and float(opt.state[b]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [float("nan"), float("inf"), -3.0], ids=repr)
def test_scaled_adamw_refuses_a_bad_init_norm(backend, norm):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.ScaledAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[1]["init_norm"] = (norm,)
    _assert_refused(opt, r"param_groups\[1\]: Invalid init_norm")
    opt.param_groups[1]["init_norm"] = norm
    _assert_refused(opt, r"param_groups\[1\]: Invalid init_norm")
    with pytest.raises(ValueError, match="Invalid init_norm"):
        af.ScaledAdamW([{"params": [a], "init_norm": (norm,)}], lr=0.1, backend=backend)


@pytest.mark.parametrize("cls,key", [(af.Amos, "eta"), (af.ScaledAdamW, "init_norm")])
@pytest.mark.parametrize("edit", ["reorder", "reinfer"])
def test_a_failed_step_leaves_per_param_values_as_they_were(cls, key, edit):
    """Group 0's per-param tuple follows its reordered params, or is inferred anew
    from None, only by a step that succeeds: group 1's bad lr leaves it untouched."""
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(3 * torch.randn(5)),
               torch.nn.Parameter(torch.randn(3)))
    opt = cls([{"params": [a, b]}, {"params": [c]}], lr=0.01, backend="cpu")
    _grads([a, b, c], 0)
    opt.step()
    if edit == "reorder":
        opt.param_groups[0]["params"].reverse()
    else:
        opt.param_groups[0][key] = None
    before = opt.param_groups[0][key]
    opt.param_groups[1]["lr"] = -1.0
    _assert_refused(opt, "Invalid learning rate")
    assert opt.param_groups[0][key] is before
    opt.param_groups[1]["lr"] = 0.01
    opt.step()  # and the next good step takes the edit
    assert isinstance(opt.param_groups[0][key], tuple) and len(opt.param_groups[0][key]) == 2


@pytest.mark.parametrize("make,match", [
    (lambda p: af.Amos(p, lr=0.01, reduce_axes=1.0), r"reduce_axes must be None, 'all', a dim or a tuple"),
    (lambda p: af.Amos(p, lr=0.01, reduce_axes=torch.tensor(1)), r"reduce_axes must be None"),
    (lambda p: af.ScaledAdamW(p, half_life="soon"), r"Invalid half_life: 'soon'"),
    (lambda p: af.ScaledAdamW(p, half_life=1j), r"Invalid half_life"),
    (lambda p: af.ScaledAdamW(p, p="x"), r"Invalid p: 'x'"),
    (lambda p: af.AdamW(p, lr=torch.tensor(1e-3, device="meta")), r"Invalid learning rate: .*meta"),
], ids=["axes-float", "axes-tensor", "half-life-str", "half-life-complex", "p-str", "lr-meta"])
def test_bad_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(4, 3))])


def test_a_numeric_string_set_between_steps_is_refused_before_any_write():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = af.AdamW([p], lr=0.1)
    _grads([p], 0)
    opt.step()
    opt.param_groups[0]["lr"] = "0.1"
    _grads([p], 1)
    _assert_refused(opt, r"param_groups\[0\]: Invalid learning rate: '0.1' \(must be a real number, not a str\)")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_amos_maximize_keeps_a_size_one_dim_layout(backend):
    """A channels_last Conv2d(1, C, k) weight (a dense non-contiguous param with a
    size-1 dim): maximize's g ← −g keeps the grad's checked layout, and the step is
    the negated grad's."""
    if backend not in af.available_backends():
        pytest.skip(f"{backend} is not available here")
    conv = torch.nn.Conv2d(1, 8, 3).to(memory_format=torch.channels_last)
    twin = torch.nn.Parameter(conv.weight.detach().clone())
    lin = torch.nn.Linear(4, 4)
    opt = af.Amos([{"params": [lin.weight]}, {"params": [conv.weight]}], lr=0.01, eta=0.1, maximize=True,
                  backend=backend)
    plain = af.Amos([twin], lr=0.01, eta=0.1, backend=backend)
    for p in (lin.weight, conv.weight):
        p.grad = torch.randn_like(p)
    twin.grad = -conv.weight.grad
    opt.step()
    plain.step()
    torch.testing.assert_close(conv.weight.detach(), twin.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["tpu", "CPU"])
def test_a_backend_set_anew_is_checked_like_the_constructors(backend):
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend="cpu")
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[1]["backend"] = backend
    _assert_refused(opt, rf"AdamW: unknown backend '{backend}'")


@pytest.mark.parametrize("cls", [af.AdamW, af.Lion, af.Amos], ids=lambda c: c.__name__)
def test_maximize_takes_an_expanded_grad_on_the_reference(cls):
    """A stride-0 grad (torch.optim steps it): maximize negates it whatever its layout."""
    kwargs = dict(lr=1e-2, eta=0.1) if cls is af.Amos else dict(lr=1e-2)
    p, q = torch.nn.Parameter(torch.randn(4, 3)), None
    q = torch.nn.Parameter(p.detach().clone())
    grad = torch.randn(1, 3)
    p.grad = grad.expand(4, 3)
    q.grad = -grad.expand(4, 3).contiguous()
    cls([p], maximize=True, backend="reference", **kwargs).step()
    cls([q], backend="reference", **kwargs).step()
    assert torch.equal(p, q)


def test_a_swap_that_keeps_address_and_size_but_not_strides_is_checked_for_overlap():
    """(On the reference, which steps strided params; the fused backends refuse the
    strided view itself.)"""
    base = torch.zeros(16)
    a, b = torch.nn.Parameter(base[0:4]), torch.nn.Parameter(base[8:12])
    opt = af.AdamW([a, b], lr=0.1, backend="reference")
    _grads([a, b], 0)
    opt.step()
    a.data = base.as_strided((4,), (4,), 0)  # elements 0, 4, 8, 12: b's first
    _grads([a, b], 1)
    _assert_refused(opt, r"param_groups\[0\]\['params'\]\[1\].*shares memory")


@pytest.mark.parametrize("cls,key", [(af.AdamW, "amsgrad"), (af.RAdam, "decoupled_weight_decay"),
                                     (af.Adam, "bias_correction")], ids=lambda v: getattr(v, "__name__", v))
def test_a_flag_given_as_none_is_false(cls, key):
    """As torch.optim reads it (a config file's null)."""
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    q.data.copy_(p.data)
    opts = [cls([p], lr=0.1, weight_decay=0.1, **{key: None}), cls([q], lr=0.1, weight_decay=0.1, **{key: False})]
    for param, opt in zip((p, q), opts):
        param.grad = torch.ones(5)
        opt.step()
    assert torch.equal(p, q)


def test_group_values_as_arrays_and_sets():
    """ScaledAdamW's init_norm as a vector (a tensor or a NumPy array: one per
    param) and Amos's reduce_axes as a set, as earlier versions took them."""
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for norms in (torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])):
        opt = af.ScaledAdamW([{"params": ps, "init_norm": norms}], lr=1e-3)
        assert opt.param_groups[0]["init_norm"] == (1.0, 2.0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3)
    opt = af.Amos([{"params": [w], "reduce_axes": {1}}], lr=1e-2, eta=0.1)
    opt.step()
    assert opt.state[w]["v"].shape == (4, 1)


@pytest.mark.parametrize("value,means", [(1, True), (0, False), (None, False), (np.bool_(True), True)],
                         ids=["1", "0", "None", "np.True_"])
def test_maximize_is_read_as_torch_reads_it(value, means):
    """torch.optim's maximize taken as torch takes it (a config file's 0, 1 or null);
    a value whose truth is not a flag's is refused by name."""
    p, q, r = (torch.nn.Parameter(torch.ones(5)) for _ in range(3))
    ours = af.AdamW([p], lr=0.1, maximize=value)
    same = af.AdamW([q], lr=0.1, maximize=means)
    theirs = torch.optim.AdamW([r], lr=0.1, maximize=value, foreach=False)
    for param, opt in ((p, ours), (q, same), (r, theirs)):
        param.grad = torch.linspace(-1, 1, 5)
        opt.step()
    assert torch.equal(p, q)
    torch.testing.assert_close(p.detach(), r.detach())
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid maximize: 'yes' \(must be True or False\)"):
        af.AdamW([p], lr=0.1, maximize="yes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_half_life_whose_product_with_lr_underflows_is_named(backend):
    """p = c/(half_life·lr): each finite and > 0, their product 0 — refused by name,
    at construction and at a step after a scheduler wrote them, nothing written."""
    a, b = (torch.randn(64, 128, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with pytest.raises(ValueError, match=r"ScaledAdamW: .*Invalid half_life: 1e-170 at lr=1e-170 .*beyond float64"):
        af.ScaledAdamW([a], lr=1e-170, half_life=1e-170, backend=backend)
    for t in (a, b):
        t.grad = torch.randn_like(t)
    opt = af.ScaledAdamW([{"params": [a]}, {"params": [b], "half_life": 100.0}], lr=1e-2, backend=backend)
    opt.step()
    opt.param_groups[1].update(lr=1e-170, half_life=1e-170)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*Invalid half_life: 1e-170 at lr=1e-170"):
        opt.step()
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_master_on_its_own_params_memory_is_named(backend):
    """Not blamed on the grad, which has memory of its own."""
    a = torch.randn(64, 128, requires_grad=True)
    buf = torch.randn(4 * 64 * 128, dtype=torch.bfloat16)
    b = torch.nn.Parameter(buf[:64 * 128].view(64, 128))
    for t in (a, b):
        t.grad = torch.randn_like(t)
    opt = af.AdamW([a, b], lr=1e-2, master_weights=True, backend=backend)
    opt.step()
    opt.state[b]["master_param"] = buf.view(torch.float32)[:64 * 128].view(64, 128)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*state\['master_param'\] shares memory with the param "
                                         r"of the same param; every tensor a step writes needs memory of its own"):
        opt.step()
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("cls,swap", [(af.AdamW, "column-major"), (af.AdamW8bit, "column-major"),
                                      (af.AdamW8bit, "strided")], ids=lambda x: getattr(x, "__name__", x))
def test_a_skipped_step_after_a_layout_change_leaves_the_relayout_to_the_next_step(cls, swap):
    """A param given another layout, then a step that GradScaler's found_inf skips
    (it stores no re-laid state): the next step that runs re-lays them, and the
    run equals one without the skipped step."""
    backend = "reference" if swap == "strided" else "cpu"
    runs = []
    for skip in (False, True):
        p = torch.nn.Parameter(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)))
        opt = cls([p], lr=1e-2, backend=backend)
        _grads([p], 0)
        opt.step()
        p.data = _column_major(p.data) if swap == "column-major" else _strided_copy(p.data)
        if skip:
            p.grad = torch.full_like(p, float("inf"))
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
            opt.step()
            del opt.grad_scale, opt.found_inf
        _grads([p], 1)
        opt.step()
        runs.append((p.detach(), {k: v for k, v in opt.state[p].items()}))
    (p, state), (skipped_p, skipped_state) = runs
    assert torch.equal(p, skipped_p)
    for key, value in state.items():
        assert torch.equal(skipped_state[key], value) and skipped_state[key].stride() == value.stride(), key
