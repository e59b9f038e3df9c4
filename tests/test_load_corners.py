"""Corners of checkpoint loading and of params of unusual layouts:

* an 8-bit checkpoint loaded into a param of another memory layout: the codes'
  blocks follow the saved memory order, so they are decoded in it and quantized
  in the new one (bitwise what quantizing the decoded values in the new layout
  gives), or decoded exactly into a full-precision optimizer;
* an 8-bit checkpoint with float32 masters loaded into the full-precision class
  with masters: float32 states, bitwise the decoded codes, and it steps;
* a param written after load_state_dict gets its master remade from it (as
  between steps), while a step with no write resumes bitwise from the loaded
  master; the same after copy.deepcopy (``__setstate__``);
* non-dense params (strided views) on the reference backend: float32 masters
  (dense, as torch.empty_like makes them) and FP8 codes (the param's strides),
  stepped bitwise as a dense param of the same memory order; the cpu backend
  refuses them by name;
* ``master_weights`` of a loaded checkpoint's group wins; setting it to False
  after loading drops the masters;
* a load that raises leaves the optimizer exactly as it was.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import amos_fused as af
from amos_fused import fp8_states
from amos_fused.master_weights import MASTER_KEY

F32, BF16 = torch.float32, torch.bfloat16
FULL = {af.AdamW8bit: af.AdamW, af.Adam8bit: af.Adam, af.Lion8bit: af.Lion}
CLASSES_8BIT = list(FULL)
ROOT = fp8_states.ROOT_KEYS


def _saved(state_dict):
    """A state dict through torch.save / torch.load (as a checkpoint on disk)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _in_order(t, order):
    """A dense copy of t whose dims lie in memory in ``order`` (outermost first)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


# (shape, memory orders): each layout is a dense tensor with its dims in that order
LAYOUTS = {
    "4d": ((16, 16, 5, 5), {"contiguous": (0, 1, 2, 3), "channels_last": (0, 2, 3, 1)}),
    "2d": ((64, 80), {"contiguous": (0, 1), "transposed": (1, 0)}),
}
PAIRS = [(kind, a, b) for kind, (_, orders) in LAYOUTS.items() for a in orders for b in orders]


def _grads(shape, dtype, step):
    """Grads whose scale varies along dim 1, so that a block's absmax depends on
    which elements share it (the memory order)."""
    gen = torch.Generator().manual_seed(100 + step)
    scale = torch.logspace(-2, 2, shape[1]).view([1, shape[1]] + [1] * (len(shape) - 2))
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _trained(cls, param, steps=3, **kwargs):
    opt = cls([param], lr=1e-2, **kwargs)
    for step in range(steps):
        param.grad = _grads(param.shape, param.dtype, step)
        opt.step()
    return opt


def _keys(cls):
    return cls.fp8_state_keys


def _param_in(values, order, dtype):
    return torch.nn.Parameter(_in_order(values.to(dtype), order))


# ---------------------------------------------------------------------------
# 1. 8-bit checkpoints and memory layouts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,saved_as,loaded_as", PAIRS)
@pytest.mark.parametrize("cls", CLASSES_8BIT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_8bit_checkpoint_into_another_layout_is_requantized(kind, saved_as, loaded_as, cls, dtype):
    """The loaded codes have the new param's strides and are bitwise the saved
    values (decoded in the saved memory order) quantized in the new memory order;
    unchanged codes and absmax when both layouts cut the same blocks."""
    shape, orders = LAYOUTS[kind]
    values = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    p = _param_in(values, orders[saved_as], dtype)
    opt = _trained(cls, p, backend="cpu")
    q = _param_in(p.detach(), orders[loaded_as], dtype)
    loaded = cls([q], lr=1e-2, backend="cpu")
    loaded.load_state_dict(_saved(opt.state_dict()))
    for key in _keys(cls):
        root, absmax_key = key in ROOT, fp8_states.absmax_key(key)
        codes, absmax = loaded.state[q][key], loaded.state[q][absmax_key]
        assert codes.dtype == torch.uint8 and codes.stride() == q.stride(), key
        if saved_as == loaded_as:
            assert torch.equal(codes, opt.state[p][key]) and torch.equal(absmax, opt.state[p][absmax_key])
            continue
        expected_codes, expected_absmax = fp8_states.new_state(q)
        saved = fp8_states.decoded(opt.state[p][key], opt.state[p][absmax_key], root)
        fp8_states.store(saved, expected_codes, expected_absmax, root)
        assert torch.equal(codes, expected_codes), key
        assert torch.equal(absmax, expected_absmax), key
        # decoded: the saved moments up to one requantization (E4M3: 3 mantissa bits)
        now = fp8_states.decoded(codes, absmax, root)
        err = (now - saved).abs() / saved.abs().clamp_min(1e-30)
        assert float(err[saved.abs() > absmax.max() / 64].max()) <= (0.13 if root else 0.0625), key


@pytest.mark.parametrize("kind,saved_as,loaded_as", [pair for pair in PAIRS if pair[1] != pair[2]])
@pytest.mark.parametrize("cls", CLASSES_8BIT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_8bit_checkpoint_into_full_precision_of_another_layout_decodes_exactly(kind, saved_as, loaded_as, cls,
                                                                               dtype):
    """Into the full-precision class: each state is the saved codes decoded in their
    own memory order (bitwise, rounded to the param's dtype), in the param's layout."""
    shape, orders = LAYOUTS[kind]
    values = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    p = _param_in(values, orders[saved_as], dtype)
    opt = _trained(cls, p, backend="cpu")
    q = _param_in(p.detach(), orders[loaded_as], dtype)
    full = FULL[cls]([q], lr=1e-2, backend="cpu")
    full.load_state_dict(_saved(opt.state_dict()))
    assert set(full.state[q]) == {"step"} | set(_keys(cls))
    for key in _keys(cls):
        saved = fp8_states.decoded(opt.state[p][key], opt.state[p][fp8_states.absmax_key(key)], key in ROOT)
        state = full.state[q][key]
        assert state.dtype == dtype and state.stride() == q.stride(), key
        assert torch.equal(state, saved.to(dtype)), key
    q.grad = _grads(shape, dtype, 9)
    full.step()
    assert float(full.state[q]["step"]) == 4


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", CLASSES_8BIT, ids=lambda c: c.__name__)
def test_relaid_8bit_checkpoint_steps_like_its_requantized_state(backend, cls):
    """After a layout-changing load, a step equals (bitwise) a step from the
    requantized state set by hand."""
    shape, orders = LAYOUTS["4d"]
    values = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    p = _param_in(values, orders["channels_last"], F32)
    opt = _trained(cls, p, backend=backend)
    q = _param_in(p.detach(), orders["contiguous"], F32)
    loaded = cls([q], lr=1e-2, backend=backend)
    loaded.load_state_dict(_saved(opt.state_dict()))
    r = _param_in(p.detach(), orders["contiguous"], F32)
    by_hand = cls([r], lr=1e-2, backend=backend)
    state = {"step": torch.tensor(3.0)}
    for key in _keys(cls):
        root = key in ROOT
        codes, absmax = fp8_states.new_state(r)
        fp8_states.store(fp8_states.decoded(opt.state[p][key], opt.state[p][fp8_states.absmax_key(key)], root),
                         codes, absmax, root)
        state[key], state[fp8_states.absmax_key(key)] = codes, absmax
    by_hand.state[r] = state
    for x, o in ((q, loaded), (r, by_hand)):
        x.grad = _grads(shape, F32, 5)
        o.step()
    assert torch.equal(q.detach(), r.detach())
    for key, value in by_hand.state[r].items():
        assert torch.equal(loaded.state[q][key], value), key


# ---------------------------------------------------------------------------
# 2. 8-bit checkpoints with masters into the full-precision class with masters
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", CLASSES_8BIT, ids=lambda c: c.__name__)
def test_8bit_master_checkpoint_into_full_precision_master(backend, cls):
    """float32 states equal to the decoded codes (no rounding to bf16), the master
    kept, and the next step equals a step from that state set by hand."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 80, generator=gen).to(BF16))
    opt = _trained(cls, p, backend=backend, master_weights=True)
    q = torch.nn.Parameter(p.detach().clone())
    full = FULL[cls]([q], lr=1e-2, backend=backend, master_weights=True)
    full.load_state_dict(_saved(opt.state_dict()))
    state = full.state[q]
    assert set(state) == {"step", MASTER_KEY} | set(_keys(cls))
    assert torch.equal(state[MASTER_KEY], opt.state[p][MASTER_KEY])
    for key in _keys(cls):
        decoded = fp8_states.decoded(opt.state[p][key], opt.state[p][fp8_states.absmax_key(key)], key in ROOT)
        assert state[key].dtype == F32 and state[key].stride() == q.stride(), key
        assert torch.equal(state[key], decoded), key
    r = torch.nn.Parameter(p.detach().clone())
    by_hand = FULL[cls]([r], lr=1e-2, backend=backend, master_weights=True)
    by_hand.state[r] = {k: v.clone() for k, v in state.items()}
    for x, o in ((q, full), (r, by_hand)):
        x.grad = _grads(q.shape, BF16, 6)
        o.step()
    assert torch.equal(q.detach(), r.detach())
    assert torch.equal(full.state[q][MASTER_KEY], by_hand.state[r][MASTER_KEY])


# ---------------------------------------------------------------------------
# 3. writes after load_state_dict
# ---------------------------------------------------------------------------

def _master_run(cls, backend, numel):
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(numel, generator=gen).to(BF16))
    opt = cls([p], lr=1e-3, backend=backend, master_weights=True)
    for step in range(3):
        p.grad = torch.randn(numel, generator=gen).to(BF16)
        opt.step()
    return p, opt


WRITES = {
    "copy_": lambda q, new: q.copy_(new),
    "data": lambda q, new: setattr(q, "data", new.clone()),
    "fill_": lambda q, new: q.fill_(0.25),
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,numel", [(af.AdamW, 1000), (af.Lion, 1000), (af.AdamW8bit, 5000)],
                         ids=["AdamW", "Lion", "AdamW8bit"])
def test_param_written_after_load_gets_its_master_remade(write, backend, cls, numel):
    p, opt = _master_run(cls, backend, numel)
    checkpoint = _saved(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    loaded = cls([q], lr=0.0, backend=backend, master_weights=True)
    loaded.load_state_dict(checkpoint)
    loaded.param_groups[0]["lr"] = 0.0  # a step that moves nothing: the param must stay as written
    new = torch.linspace(-2, 2, numel).to(BF16)
    with torch.no_grad():
        WRITES[write](q, new)
    written = q.detach().clone()
    q.grad = torch.zeros_like(q)
    loaded.step()
    assert torch.equal(q.detach(), written)
    assert torch.equal(loaded.state[q][MASTER_KEY], written.float())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,numel", [(af.AdamW, 1000), (af.AdamW8bit, 5000)], ids=["AdamW", "AdamW8bit"])
def test_load_then_step_without_write_resumes_from_the_master(backend, cls, numel):
    """Marks are made at load: no write in between, so the loaded master (not the
    rounded param) is stepped, bitwise as the saving optimizer's next step."""
    p, opt = _master_run(cls, backend, numel)
    q = torch.nn.Parameter(p.detach().clone())
    loaded = cls([q], lr=1e-3, backend=backend, master_weights=True)
    loaded.load_state_dict(_saved(opt.state_dict()))
    grad = torch.linspace(-1, 1, numel).to(BF16)
    for x, o in ((p, opt), (q, loaded)):
        x.grad = grad.clone()
        o.step()
    assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt.state[p][MASTER_KEY], loaded.state[q][MASTER_KEY])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_deepcopied_optimizer_sees_param_writes(backend):
    """copy.deepcopy goes through __setstate__, which marks the masters too."""
    p, opt = _master_run(af.AdamW, backend, 1000)
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    twin.param_groups[0]["lr"] = 0.0
    with torch.no_grad():
        q.fill_(0.5)
    q.grad = torch.zeros_like(q)
    twin.step()
    assert bool((q.detach() == 0.5).all())
    assert bool((twin.state[q][MASTER_KEY] == 0.5).all())


# ---------------------------------------------------------------------------
# 4, 5. non-dense params: masters and FP8 codes on the reference
# ---------------------------------------------------------------------------

def _views(dtype):
    """(non-dense view, dense copy with the same memory order) pairs."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(128, 160, generator=gen).to(dtype)[:, ::2]             # strides (160, 2): row-major
    cols = torch.randn(160, 128, generator=gen).to(dtype).t()[:, ::2]         # strides (1, 256): column-major
    conv = torch.randn(16, 16, 5, 10, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)[..., ::2]                          # channels_last order
    out = []
    for view in (rows, cols, conv):
        order = sorted(range(view.dim()), key=lambda d: -view.stride(d))
        out.append((view, _in_order(view, order)))
    return out


def _step_pair(cls, view, dense, steps=3, **kwargs):
    """Steps a non-dense param and a dense one of the same values and memory order
    alike, on the reference; returns both optimizers and params."""
    p, q = torch.nn.Parameter(view), torch.nn.Parameter(dense.clone())
    assert not p.is_contiguous() and torch.equal(p.detach(), q.detach())
    a = cls([p], lr=1e-2, backend="reference", **kwargs)
    b = cls([q], lr=1e-2, backend="reference", **kwargs)
    for step in range(steps):
        grad = _grads(p.shape, p.dtype, 20 + step)
        p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    return p, a, q, b


def _assert_same_states(a, p, b, q, keys):
    """p's states (a's) equal q's (b's): decoded when coded, whose codes have the
    strides of the tensor the step writes (the param, or its master)."""
    stepped = a.state[p].get(MASTER_KEY, p)
    for key in keys:
        x, y = a.state[p][key], b.state[q][key]
        if x.dtype == torch.uint8:
            assert x.stride() == stepped.stride(), key  # as the step's check asks
            root = key in ROOT
            x = fp8_states.decoded(x, a.state[p][fp8_states.absmax_key(key)], root)
            y = fp8_states.decoded(y, b.state[q][fp8_states.absmax_key(key)], root)
        assert torch.equal(x, y), key


@pytest.mark.parametrize("cls", [af.AdamW, af.Adam, af.Lion, af.AdamW8bit, af.Lion8bit],
                         ids=lambda c: c.__name__)
def test_non_dense_param_with_master_on_the_reference(cls):
    """The master of a strided view is dense (torch.empty_like's layout), and the
    view steps bitwise as a dense param of the same values."""
    for view, dense in _views(BF16):
        p, a, q, b = _step_pair(cls, view, dense, master_weights=True)
        master = a.state[p][MASTER_KEY]
        assert master.stride() == torch.empty_like(p, dtype=F32).stride() != p.stride()
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(master, b.state[q][MASTER_KEY])
        _assert_same_states(a, p, b, q, cls.state_keys[:1])


@pytest.mark.parametrize("cls", CLASSES_8BIT + [af.RAdam8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_non_dense_8bit_param_on_the_reference(cls, dtype):
    """FP8 codes of a strided view have its strides and cut its elements into the
    blocks of its memory order: bitwise the dense param's states and result."""
    for view, dense in _views(dtype):
        p, a, q, b = _step_pair(cls, view, dense)
        assert torch.equal(p.detach(), q.detach())
        for key in _keys(cls):
            assert a.state[p][key].stride() == p.stride(), key
            assert torch.equal(a.state[p][fp8_states.absmax_key(key)], b.state[q][fp8_states.absmax_key(key)])
        _assert_same_states(a, p, b, q, _keys(cls))


@pytest.mark.parametrize("cls,kwargs", [(af.AdamW, dict(master_weights=True)), (af.AdamW8bit, {}),
                                        (af.Lion8bit, dict(master_weights=True))],
                         ids=["AdamW-master", "AdamW8bit", "Lion8bit-master"])
def test_non_dense_param_on_cpu_is_refused_by_name(cls, kwargs):
    view, _ = _views(BF16)[0]
    p = torch.nn.Parameter(view)
    opt = cls([p], lr=1e-2, backend="cpu", **kwargs)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*backend='reference'"):
        opt.step()
    assert torch.equal(p.detach(), before) and len(opt.state) == 0


def test_master_with_wrong_strides_is_refused_with_the_expected_strides():
    view, _ = _views(BF16)[0]
    p = torch.nn.Parameter(view)
    opt = af.AdamW([p], lr=1e-2, backend="reference", master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p][MASTER_KEY] = torch.empty_strided(p.shape, p.stride(), dtype=F32).copy_(p.detach())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*'master_param' has strides "
                                         r"\(160, 2\); expected the dense layout.*\(80, 1\)"):
        opt.step()


@pytest.mark.parametrize("loaded_as", ["rows", "contiguous", "transposed"])
def test_non_dense_8bit_checkpoint_loads(loaded_as):
    """Codes saved from a strided view (its strides) load into a dense param of the
    same memory order as they are, into another order requantized."""
    view, dense = _views(F32)[0]
    p, a, _, _ = _step_pair(af.AdamW8bit, view, dense)
    if loaded_as == "rows":
        target = torch.zeros(128, 160)[:, ::2].copy_(dense)  # a strided view again
    else:
        target = dense.clone() if loaded_as == "contiguous" else _in_order(dense, (1, 0))
    q = torch.nn.Parameter(target)
    loaded = af.AdamW8bit([q], lr=1e-2, backend="reference")
    loaded.load_state_dict(_saved(a.state_dict()))
    for key in _keys(af.AdamW8bit):
        root, absmax_key = key in ROOT, fp8_states.absmax_key(key)
        codes = loaded.state[q][key]
        assert codes.stride() == q.stride()
        if loaded_as != "transposed":  # the same blocks: the codes as saved
            assert torch.equal(codes, a.state[p][key]) and torch.equal(loaded.state[q][absmax_key],
                                                                       a.state[p][absmax_key])
        else:
            expected, expected_absmax = fp8_states.new_state(q)
            fp8_states.store(fp8_states.decoded(a.state[p][key], a.state[p][absmax_key], root), expected,
                             expected_absmax, root)
            assert torch.equal(codes, expected) and torch.equal(loaded.state[q][absmax_key], expected_absmax)
    q.grad = torch.ones_like(q)
    loaded.step()


# ---------------------------------------------------------------------------
# 6. master_weights of a loaded checkpoint
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls,numel", [(af.AdamW, 1000), (af.Lion, 1000), (af.AdamW8bit, 5000)],
                         ids=["AdamW", "Lion", "AdamW8bit"])
def test_checkpoint_group_master_weights_wins_and_can_be_switched_off(backend, cls, numel):
    p, opt = _master_run(cls, backend, numel)
    q = torch.nn.Parameter(p.detach().clone())
    loaded = cls([q], lr=1e-3, backend=backend, master_weights=False)
    loaded.load_state_dict(_saved(opt.state_dict()))
    assert loaded.param_groups[0]["master_weights"] is True and MASTER_KEY in loaded.state[q]
    loaded.param_groups[0]["master_weights"] = False
    q.grad = torch.zeros_like(q)
    loaded.step()
    assert MASTER_KEY not in loaded.state[q]
    for key, value in loaded.state[q].items():
        if key != "step" and not key.endswith("_absmax") and value.dtype != torch.uint8:
            assert value.dtype == BF16, key


# ---------------------------------------------------------------------------
# 7. telemetry with masters (documented: the master is measured)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rms_with_master_measures_the_master(backend):
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(4000, generator=gen).half())
    opt = af.Lion([p], lr=1e-3, master_weights=True, track_rms=True, backend=backend)
    p.grad = torch.randn(4000, generator=gen).half()
    before = p.detach().double()
    opt.step()
    master = opt.state[p][MASTER_KEY].double()
    rms = opt.rms()[p]
    assert rms.update == pytest.approx(float((master - before).pow(2).mean().sqrt()) / 1e-3, rel=1e-5)
    assert rms.weight == pytest.approx(float(master.pow(2).mean().sqrt()), rel=1e-5)


# ---------------------------------------------------------------------------
# 8. a load that raises changes nothing
# ---------------------------------------------------------------------------

def _snapshot(opt):
    groups = [{k: v for k, v in g.items()} for g in opt.param_groups]
    states = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
              for p, st in opt.state.items()}
    objects = (opt.state, [id(g) for g in opt.param_groups], opt._plans, opt._telemetry, opt._master_marks)
    return groups, states, objects


def _assert_as_before(opt, snap):
    groups, states, objects = snap
    assert [dict(g) for g in opt.param_groups] == groups
    assert objects[0] is opt.state and [id(g) for g in opt.param_groups] == objects[1]
    assert opt._plans is objects[2] and opt._telemetry is objects[3] and opt._master_marks is objects[4]
    assert set(opt.state) == set(states)
    for p, st in states.items():
        assert set(opt.state[p]) == set(st)
        for key, value in st.items():
            now = opt.state[p][key]
            assert (torch.equal(now, value) and now.dtype == value.dtype) if isinstance(value, torch.Tensor) \
                else now == value, key


def _torch_amsgrad_checkpoint(params):
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.05, amsgrad=True)
    for p in theirs.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    theirs.step()
    return _saved(theirs.state_dict())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_failed_load_changes_nothing(backend):
    """torch.optim.AdamW(amsgrad=True) into AdamW8bit raises (amsgrad refused);
    afterwards groups, states, caches and marks are as before, and the next steps
    equal an untouched twin's bitwise."""
    gen = torch.Generator().manual_seed(11)
    values = [torch.randn(4096, generator=gen), torch.randn(5, generator=gen)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    twins = [torch.nn.Parameter(v.clone()) for v in values]
    opt = af.AdamW8bit(params, lr=1e-3, backend=backend, track_rms=True)
    twin = af.AdamW8bit(twins, lr=1e-3, backend=backend, track_rms=True)
    for ps, o in ((params, opt), (twins, twin)):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.5 + i)
        o.step()
    snap, rms = _snapshot(opt), opt.rms()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(_torch_amsgrad_checkpoint(params))
    _assert_as_before(opt, snap)
    assert opt.rms() == rms
    for step in range(2):
        for ps, o in ((params, opt), (twins, twin)):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, -0.25 * (step + 1) + i)
            o.step()
    for p, t in zip(params, twins):
        assert torch.equal(p.detach(), t.detach())
        for key, value in twin.state[t].items():
            assert torch.equal(opt.state[p][key], value), key


def test_failed_load_keeps_master_marks():
    """After a failed load, a write to a param with a master is still seen."""
    p, opt = _master_run(af.AdamW, "cpu", 1000)
    bad = _saved(opt.state_dict())
    bad["param_groups"][0]["lr"] = -1.0  # refused by the group check, after the states were converted
    snap = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    _assert_as_before(opt, snap)
    opt.param_groups[0]["lr"] = 0.0
    with torch.no_grad():
        p.fill_(0.75)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert bool((opt.state[p][MASTER_KEY] == 0.75).all()) and bool((p.detach() == 0.75).all())


def test_failed_decode_changes_nothing():
    """A load that fails while converting states (codes whose absmax has the wrong
    number of blocks, decoded into a full-precision optimizer) is undone too."""
    p = torch.nn.Parameter(torch.randn(50, 100))
    opt8 = _trained(af.AdamW8bit, p, steps=1, backend="cpu")
    bad = _saved(opt8.state_dict())
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:3].clone()
    q = torch.nn.Parameter(p.detach().clone())
    full = _trained(af.AdamW, q, steps=1, backend="cpu")
    snap = _snapshot(full)
    with pytest.raises(ValueError, match=r"AdamW: cannot load state 'exp_avg_absmax'.*expected 20 float32 values"):
        full.load_state_dict(bad)
    _assert_as_before(full, snap)
    q.grad = torch.ones_like(q)
    full.step()


@pytest.mark.parametrize("cls", [af.AdamW8bit, af.Lion8bit], ids=lambda c: c.__name__)
def test_an_8bit_checkpoint_of_other_shapes_loads_and_the_step_names_the_param(cls):
    """As torch.optim: a checkpoint saved with the params in another order loads
    (positions only), and the step then refuses the mismatched state, naming the
    param, before anything is written."""
    def model(shapes):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        return params
    saved = cls(model([(4096,), (300,)]), lr=1e-2)
    saved.step()
    params = model([(300,), (4096,)])
    opt = cls(params, lr=1e-2)
    opt.load_state_dict(saved.state_dict())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*state\['exp_avg'\]"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("step", ["3", b"3", None.__class__, [3.0]], ids=["str", "bytes", "type", "list"])
def test_a_checkpoint_step_that_is_not_a_count_is_named_and_changes_nothing(step):
    """A number (NumPy's too) or a one-element tensor loads; anything else is named
    by its checkpoint key, before anything is loaded."""
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = af.AdamW([p], lr=1e-3)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    bad = copy.deepcopy(saved)
    bad["state"][0]["step"] = step
    bad["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"AdamW: cannot load the checkpoint's state\[0\]\['step'\]: it must be a count"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(before[k], v) for k, v in opt.state[p].items())
    for good in (7, 7.0, torch.tensor(7.0), __import__("numpy").float32(7)):
        ok = copy.deepcopy(saved)
        ok["state"][0]["step"] = good
        opt.load_state_dict(ok)
        assert float(opt.state[p]["step"]) == 7.0


@pytest.mark.parametrize("entry", [5, None, [1.0], "state"], ids=["int", "None", "list", "str"])
@pytest.mark.parametrize("cls", [af.AdamW, af.AdamW8bit], ids=lambda c: c.__name__)
def test_a_params_checkpoint_state_that_is_not_a_dict_is_named_and_changes_nothing(cls, entry):
    """A param's entry of the checkpoint's state must be a dict: anything else is
    refused by its key with a TypeError (torch.optim's load raises one from deep
    inside), before anything is loaded; an entry of no param is kept as saved."""
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = cls([p], lr=1e-3)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    bad = copy.deepcopy(saved)
    bad["state"][0] = entry
    bad["param_groups"][0]["lr"] = 0.5
    with pytest.raises(TypeError, match=rf"{cls.__name__}: cannot load the checkpoint's state\[0\]: a param's "
                                        r"state must be a dict"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert set(opt.state[p]) == set(before) and all(torch.equal(before[k], v) for k, v in opt.state[p].items())
    extra = copy.deepcopy(saved)
    extra["state"]["notes"] = entry  # (no param's: kept)
    opt.load_state_dict(extra)
    assert opt.state["notes"] == entry


LOAD_HOOK_CASES = {
    "AdamW": (lambda ps: af.AdamW(ps, lr=1e-2), torch.float32, "exp_avg"),
    "AdamW8bit": (lambda ps: af.AdamW8bit(ps, lr=1e-2), torch.float32, "exp_avg"),
    "AdamW-master": (lambda ps: af.AdamW(ps, lr=1e-2, master_weights=True), torch.bfloat16, "exp_avg"),
}


@pytest.mark.parametrize("name", list(LOAD_HOOK_CASES))
def test_load_state_dict_hooks_run_as_torch_runs_them(name):
    """A pre-hook's returned state_dict is the one loaded, all of it (8-bit codes
    and float32 master states too); post-hooks see the finished load (codes as
    uint8, master states in float32) and what they write stays; a load that raises
    runs no post-hook."""
    make, dtype, key = LOAD_HOOK_CASES[name]
    p = torch.nn.Parameter(torch.randn(64, 80).to(dtype))  # 5120 elements: FP8 states for AdamW8bit
    p.grad = torch.randn(64, 80).to(dtype)
    opt = make([p])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    want_dtype = opt.state[p][key].dtype

    def zeroing_pre_hook(optimizer, state_dict):
        edited = copy.deepcopy(state_dict)
        edited["state"][0][key] = torch.zeros_like(edited["state"][0][key])
        return edited

    seen = []

    def post_hook(optimizer):
        seen.append((optimizer.state[p][key].dtype, optimizer.param_groups[0]["lr"]))
        optimizer.state[p]["exp_avg_sq"].fill_(1)

    fresh = make([p])
    pre = fresh.register_load_state_dict_pre_hook(zeroing_pre_hook)
    post = fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(saved)
    assert not fresh.state[p][key].any()
    assert seen == [(want_dtype, 1e-2)]
    assert (fresh.state[p]["exp_avg_sq"] == 1).all()
    pre.remove()
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        fresh.load_state_dict(bad)
    assert len(seen) == 1 and fresh.param_groups[0]["lr"] == 1e-2
    post.remove()


@pytest.mark.parametrize("master_weights", [True, False])
def test_master_checkpoint_that_went_through_torch_resumes_from_the_param(master_weights):
    """torch.optim carries our 'master_param' along and its load casts it to the
    param's dtype; after torch's steps it is stale too.  Loaded back, that master is
    dropped like a missing one: the next step remakes it from the param (states
    upcast), exactly as loading torch's checkpoint without it does."""
    p = torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))
    p.grad = torch.randn(64, 64).to(torch.bfloat16)
    ours = af.AdamW([p], lr=1e-2, master_weights=True)
    ours.step()
    theirs = torch.optim.AdamW([p], lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    p.grad = torch.randn(64, 64).to(torch.bfloat16)
    theirs.step()
    saved = theirs.state_dict()
    assert saved["state"][0][MASTER_KEY].dtype == torch.bfloat16
    without = copy.deepcopy(saved)
    del without["state"][0][MASTER_KEY]
    q = torch.nn.Parameter(p.detach().clone())
    loaded, twin = af.AdamW([p], lr=1e-2, master_weights=master_weights), af.AdamW([q], lr=1e-2,
                                                                               master_weights=master_weights)
    loaded.load_state_dict(saved)
    twin.load_state_dict(without)
    assert MASTER_KEY not in loaded.state[p]
    for step in range(2):
        p.grad = q.grad = _grads((64, 64), torch.bfloat16, step)
        loaded.step()
        twin.step()
    assert torch.equal(p, q)
    assert set(loaded.state[p]) == set(twin.state[q])
    for key, value in loaded.state[p].items():
        assert torch.equal(value, twin.state[q][key]), key
    if master_weights:
        assert loaded.state[p][MASTER_KEY].dtype == torch.float32


@pytest.mark.parametrize("cls", [torch.optim.AdamW, af.AdamW, af.AdamW8bit, af.Amos])
def test_state_entries_of_no_param_load_as_torch_keeps_them(cls):
    """torch.optim keeps a checkpoint's state entries that belong to no param as they
    are (wrappers keep counters in opt.state): a checkpoint with one loads and steps."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    kwargs = {"eta": 0.5} if cls is af.Amos else {}
    opt = cls([p], lr=1e-2, **kwargs)
    p.grad = torch.ones(8, 8)
    opt.step()
    opt.state["custom"] = {"counter": 3}
    opt.step()
    saved = opt.state_dict()
    saved["state"][5] = {"step": torch.tensor(1.0)}
    saved["state"]["tensors"] = {"counter": torch.tensor(3.0)}
    loaded = cls([p], lr=1e-2, **kwargs)
    loaded.load_state_dict(saved)
    assert loaded.state["custom"] == {"counter": 3} and 5 in loaded.state
    if cls is not torch.optim.AdamW:  # (which aliases them) copied as every loaded tensor is: the
        saved["state"]["tensors"]["counter"].add_(100)  # caller's dict edited afterwards changes nothing here
        saved["state"][5]["step"].add_(100)
        assert float(loaded.state["tensors"]["counter"]) == 3.0 and float(loaded.state[5]["step"]) == 1.0
    loaded.step()
    assert sorted(map(str, loaded.state_dict()["state"])) == ["0", "5", "custom", "tensors"]


def test_state_dict_post_hook_may_return_another_dict():
    """torch.optim returns what a state_dict post-hook returns."""
    p = torch.nn.Parameter(torch.randn(8))
    opt = af.AdamW([p], lr=1e-2, backend="reference")
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(dict(sd["param_groups"][0])) or {"wrapped": sd})
    wrapped = opt.state_dict()
    assert list(wrapped) == ["wrapped"] and "backend" not in seen[0]


@pytest.mark.parametrize("bad", [None, torch.tensor([1.0, 2.0]), torch.tensor([]), 10 ** 400, torch.tensor(True),
                                 torch.tensor([3.0]).to_sparse()], ids=["None", "two", "empty", "huge", "bool", "sparse"])
def test_a_checkpoint_step_that_is_not_a_count_is_named(bad):
    """Named by its checkpoint key before anything changes (not a bare TypeError,
    OverflowError or 'only one element tensors' from the conversion)."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = _trained(af.AdamW, p, steps=1)
    saved = opt.state_dict()
    saved["state"][0] = dict(saved["state"][0], step=bad)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"AdamW: cannot load the checkpoint's state\[0\]\['step'\]: it must be a count"):
        opt.load_state_dict(saved)
    _assert_as_before(opt, snap)


@pytest.mark.parametrize("into", [af.AdamW8bit, af.AdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [None, 1.0, "x"], ids=repr)
def test_an_absmax_that_is_not_a_tensor_is_named(bad, into):
    p = torch.nn.Parameter(torch.randn(64, 80))
    saved = _trained(af.AdamW8bit, p, steps=1).state_dict()
    saved["state"][0] = dict(saved["state"][0], exp_avg_absmax=bad)
    q = torch.nn.Parameter(p.detach().clone())
    opt = _trained(into, q, steps=1)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"{into.__name__}: cannot load state 'exp_avg_absmax' of a param of "
                                         r"shape \(64, 80\): it must be a float32 tensor"):
        opt.load_state_dict(saved)
    _assert_as_before(opt, snap)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [BF16, torch.float64], ids=str)
def test_a_master_checkpoint_loads_its_other_states_in_float32(dtype, backend):
    """Beside a float32 master kept by the load, every floating state steps in float32:
    one saved in another dtype (a bfloat16 or float64 exp_avg) is loaded as its
    float32 value (not cast to the param's dtype, then refused by the step)."""
    p = torch.nn.Parameter(torch.randn(64, 80).to(BF16))
    saved = _trained(af.AdamW, p, steps=1, master_weights=True, backend=backend).state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].to(dtype)
    q = torch.nn.Parameter(p.detach().clone())
    opt = af.AdamW([q], lr=1e-2, master_weights=True, backend=backend)
    opt.load_state_dict(saved)
    assert all(opt.state[q][k].dtype == F32 for k in ("exp_avg", "exp_avg_sq", MASTER_KEY))
    assert torch.equal(opt.state[q]["exp_avg"], saved["state"][0]["exp_avg"].float())
    q.grad = _grads(q.shape, BF16, 5)
    opt.step()
    assert opt.state[q]["step"] == 2


def _stepped(make, values):
    """An optimizer made by ``make(params)`` over fresh params of ``values``, stepped twice."""
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = make(params)
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.25 * (step + 1) - i)
        opt.step()
    return params, opt


# (saver, loader, a setting every group of the loader has and the saver's lacks)
_OTHER_OPTIMIZERS = [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: af.AdamW(ps, lr=1e-3), "betas"),
    (lambda ps: af.Lion(ps, lr=1e-4), lambda ps: af.AdamW(ps, lr=1e-3), "eps"),
    (lambda ps: af.Lion(ps, lr=1e-4), lambda ps: af.RAdam(ps, lr=1e-3), "eps"),
    (lambda ps: af.Amos(ps, lr=0.01), lambda ps: af.AdamW8bit(ps, lr=1e-3), "betas"),
    (lambda ps: af.AdamW(ps, lr=1e-3), lambda ps: af.Amos(ps, lr=0.01), "eta"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: af.Lion(ps, lr=1e-4), "betas"),
    (lambda ps: af.Lion(ps, lr=1e-4), lambda ps: af.Lamb(ps, lr=1e-3), "eps"),
]


@pytest.mark.parametrize("saver, loader, missing", _OTHER_OPTIMIZERS)
def test_a_checkpoint_of_another_optimizer_is_refused_and_changes_nothing(saver, loader, missing):
    """A checkpoint whose group lacks a setting every group of the loading class has
    (an SGD's into AdamW, a Lion's into AdamW, an AdamW's into Amos …) is refused at
    load, naming the setting, with an error both `except KeyError` (torch.optim's
    kind for SGD's into AdamW) and `except ValueError` catch, rather than stepped
    with the missing settings taken from the loader's defaults; the optimizer is as
    it was, and steps bitwise as an untouched twin."""
    values = [torch.randn(4096, generator=torch.Generator().manual_seed(5)), torch.randn(7)]
    _, other = _stepped(saver, values)
    saved = _saved(other.state_dict())
    params, opt = _stepped(loader, values)
    twins, twin = _stepped(loader, values)
    snap = _snapshot(opt)
    with pytest.raises(KeyError, match=rf"no {missing!r}.*another optimizer") as raised:
        opt.load_state_dict(saved)
    assert isinstance(raised.value, ValueError)
    _assert_as_before(opt, snap)
    for ps, o in ((params, opt), (twins, twin)):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 1.5 - i)
        o.step()
    for p, t in zip(params, twins):
        assert torch.equal(p.detach(), t.detach())


@pytest.mark.parametrize("saver, loader", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), lambda ps: af.AdamW(ps, lr=1e-3)),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3), lambda ps: af.AdamW8bit(ps, lr=1e-3)),
    (lambda ps: torch.optim.RAdam(ps, lr=1e-3), lambda ps: af.RAdam(ps, lr=1e-3)),
    (lambda ps: af.AdamW(ps, lr=1e-3), lambda ps: af.Lion(ps, lr=1e-4)),
])
def test_a_checkpoint_with_every_core_setting_loads(saver, loader):
    """Checkpoints of the torch.optim peer (which lack this library's own settings:
    track_rms, master_weights, bias_correction …, filled from the defaults) and of a
    class with the same settings load, as torch.optim loads Adam's into AdamW."""
    values = [torch.randn(4096, generator=torch.Generator().manual_seed(6)), torch.randn(7)]
    _, other = _stepped(saver, values)
    saved = _saved(other.state_dict())
    params, opt = _stepped(loader, values)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
    assert "track_rms" in opt.param_groups[0]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("into", [af.AdamW8bit, af.AdamW])
@pytest.mark.parametrize("turned", ["through torch.optim", "int8", "int8 view", "float8_e4m3fn view"])
def test_codes_turned_into_numbers_are_refused_and_change_nothing(turned, into):
    """An 8-bit checkpoint whose codes are no longer uint8 beside their absmax — loaded
    into torch.optim.AdamW and saved again (its load casts every state to the param's
    dtype: codes 0…255 become float32 numbers), cast to int8, or the same bytes viewed
    as int8 or float8_e4m3fn — is refused, naming the state and the dtype it was
    saved with, by AdamW8bit and by AdamW alike, rather than quantized or stepped as
    moments; the optimizer is as it was."""
    values = [torch.randn(64, 80, generator=torch.Generator().manual_seed(8)), torch.randn(7)]
    _, saver = _stepped(lambda ps: af.AdamW8bit(ps, lr=1e-3), values)
    saved = saver.state_dict()
    if turned == "int8":
        saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].to(torch.int8)
    elif turned.endswith("view"):
        saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].view(getattr(torch, turned.split()[0]))
    else:
        through = torch.optim.AdamW([torch.nn.Parameter(v.clone()) for v in values], lr=1e-3)
        through.load_state_dict(saved)
        saved = through.state_dict()
        assert saved["state"][0]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" in saved["state"][0]
    _, opt = _stepped(lambda ps: into(ps, lr=1e-3), values)
    snap = _snapshot(opt)
    dtype = saved["state"][0]["exp_avg"].dtype
    why = "codes turned into numbers" if turned == "through torch.optim" else r"read back with `\.view\(torch\.uint8\)`"
    with pytest.raises(ValueError, match=rf"'exp_avg'\]: it is {dtype} beside 'exp_avg_absmax'.*{why}"):
        opt.load_state_dict(_saved(saved))
    _assert_as_before(opt, snap)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_checkpoint_without_step_or_master_gets_its_states_upcast_with_master_weights(backend):
    """A bfloat16 checkpoint without a master and without `step`, its group given
    master_weights=True after the load: its moments are upcast beside the new master
    (as with a `step`), and the count restarts, as missing state is made afresh."""
    p = torch.nn.Parameter(torch.randn(64, 80).bfloat16())
    source = af.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.ones_like(p)
    source.step()
    saved = source.state_dict()
    del saved["state"][0]["step"]
    opt = af.AdamW([p], lr=1e-2, backend=backend)
    opt.load_state_dict(saved)
    opt.param_groups[0]["master_weights"] = True  # (a load takes the checkpoint group's setting)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert float(state["step"]) == 1.0 and state["master_param"].dtype == torch.float32


def test_state_entries_of_no_param_that_cannot_be_deep_copied_still_load():
    """An entry of no param holding a non-leaf tensor that requires grad, or an
    object that cannot be copied (a lock), loads as torch.optim loads it: its
    tensors copied, anything else kept as it is."""
    import threading
    p = torch.nn.Parameter(torch.randn(8))
    opt = af.AdamW([p], lr=1e-2)
    p.grad = torch.ones(8)
    opt.step()
    saved = opt.state_dict()
    leaf = torch.ones(3, requires_grad=True)
    lock = threading.Lock()
    saved["state"]["extra"] = {"non_leaf": leaf * 2, "lock": lock}
    loaded = af.AdamW([p], lr=1e-2)
    loaded.load_state_dict(saved)
    assert loaded.state["extra"]["lock"] is lock
    assert torch.equal(loaded.state["extra"]["non_leaf"], torch.full((3,), 2.0))
    assert loaded.state["extra"]["non_leaf"] is not saved["state"]["extra"]["non_leaf"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masters_turned_off_after_loading_states_without_step_or_master(backend):
    """float32 states of a bf16 param without a master or a `step` (a load with
    master_weights=True), masters turned off before the next step: the states are
    rounded to the param's dtype, as with a `step`, and the step runs."""
    p = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    source = af.AdamW([p], lr=1e-2, master_weights=True, backend=backend)
    p.grad = torch.ones_like(p)
    source.step()
    saved = source.state_dict()
    for key in ("step", "master_param"):
        del saved["state"][0][key]
    opt = af.AdamW([p], lr=1e-2, master_weights=True, backend=backend)
    opt.load_state_dict(saved)
    opt.param_groups[0]["master_weights"] = False
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("make", [lambda ps: af.AdamW(ps, lr=0.1), lambda ps: af.AdamW8bit(ps, lr=0.1)],
                         ids=["AdamW", "AdamW8bit"])
def test_a_load_under_inference_mode_makes_states_a_normal_step_updates(make):
    """torch.optim's load under torch.inference_mode() keeps the caller's tensors;
    the copies here are normal tensors too, not inference tensors, which a step
    outside the mode could not update in place."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = make([p])
    p.grad = torch.randn(64, 80)
    opt.step()
    saved = opt.state_dict()
    twin = make([p])
    with torch.inference_mode():
        twin.load_state_dict(saved)
    assert not any(v.is_inference() for v in twin.state[p].values())
    twin.step()
    assert float(twin.state[p]["step"]) == 2.0
