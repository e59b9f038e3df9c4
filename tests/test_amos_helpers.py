"""amos_fused/amos_helpers.py and the per-tensor settings of Amos: the param-group
helper ``amos_param_groups`` (the table of η and reduce_axes per module kind,
overrides, both backends, checkpoints), the optimizer-state memory it buys, the
slot shapes each reduce_axes gives, and η inferred per tensor (eta=None).

Comparisons between backends use registry.TOL['cpu']['amos'] (scaled floor; see
test_cpu.py for the argument)."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import amos_fused as af
from conftest import clone_params, make_grads, make_params, set_grads, step_together
from registry import Case, assert_close_scaled, assert_states_equal, tolerance

pytestmark = pytest.mark.usefixtures("one_thread_outside_the_kernels")


def _amos(params, backend, **kwargs):
    return Case(af.Amos).make(params, backend, threads=True, **kwargs)

# ---------------------------------------------------------------------------
# amos_param_groups
# ---------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.block = _Block()
        self.conv = nn.Conv2d(3, 6, 3)
        self.gconv = nn.Conv2d(4, 8, (3, 5), groups=2, bias=False)
        self.conv1d = nn.Conv1d(3, 4, 5, bias=False)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: must appear once
        self.gain = nn.Parameter(torch.full((5,), 2.0))  # bare vector: η = its RMS
        self.offset = nn.Parameter(torch.zeros(4))  # bare zero vector: η = 0.5
        self.table = nn.Parameter(torch.randn(4, 6))  # bare matrix: sqrt(1/prod(shape[1:]))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


# name -> (η, reduce_axes, slot shape), by the table in amos_fused/amos_helpers.py
EXPECTED = {
    "emb.weight": (math.sqrt(1 / 8), (1,), (50, 1)),
    "block.fc.weight": (math.sqrt(1 / 16), (1,), (32, 1)),
    "block.fc.bias": (0.5, "all", ()),
    "block.ln.weight": (1.0, "all", ()),
    "block.ln.bias": (0.5, "all", ()),
    "conv.weight": (math.sqrt(1 / 27), (1, 2, 3), (6, 1, 1, 1)),
    "conv.bias": (0.5, "all", ()),
    "gconv.weight": (math.sqrt(1 / 30), (1, 2, 3), (8, 1, 1, 1)),  # in/groups · kh · kw = 2·3·5
    "conv1d.weight": (math.sqrt(1 / 15), (1, 2), (4, 1, 1)),
    "gain": (2.0, "all", ()),
    "offset": (0.5, "all", ()),
    "table": (math.sqrt(1 / 6), (1,), (4, 1)),
}


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return _Model().to(dtype)


def _by_name(groups):
    """name -> (η, reduce_axes, param, group) over all groups."""
    out = {}
    for group in groups:
        assert len(group["params"]) == len(group["param_names"]) == len(group["eta"])
        for name, param, eta in zip(group["param_names"], group["params"], group["eta"]):
            assert name not in out, f"{name} is in two groups"
            out[name] = (eta, group["reduce_axes"], param, group)
    return out


def _set_named_grads(model, step, seed=0):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = make_grads([p for _, p in named], step, seed)
    for (_, p), g in zip(named, grads):
        p.grad = g


def test_param_groups_follow_the_table():
    model = _model()
    groups = af.amos_param_groups(model, lr=0.02, momentum=0.9)
    found = _by_name(groups)
    assert set(found) == set(EXPECTED)  # tied weight once, frozen param left out
    for name, (eta, axes, _slot) in EXPECTED.items():
        got_eta, got_axes, param, _ = found[name]
        assert got_eta == eta, f"{name}: eta {got_eta} != {eta}"
        assert got_axes == axes, f"{name}: reduce_axes {got_axes} != {axes}"
        assert param is dict(model.named_parameters())[name]
    # one group per distinct reduce_axes, each carrying the lr and the group options
    assert sorted(map(str, (g["reduce_axes"] for g in groups))) == sorted({str(a) for _, a, _ in EXPECTED.values()})
    for group in groups:
        assert group["lr"] == 0.02 and group["momentum"] == 0.9
        assert isinstance(group["eta"], tuple)

    # the slots Amos creates have the table's shapes (and mu is full-size)
    opt = _amos(groups, "cpu", lr=0.02)
    _set_named_grads(model, 0)
    opt.step()
    for name, (_eta, _axes, slot) in EXPECTED.items():
        param = found[name][2]
        state = opt.state[param]
        assert tuple(state["v"].shape) == slot and tuple(state["b"].shape) == slot, name
        assert state["mu"].shape == param.shape, name


def test_param_groups_take_every_torch_bias_for_a_bias():
    """Biases by name: ``bias``, ``bias_*`` and ``*_bias`` (LSTM's, attention's,
    whatever their rank) get η 0.5 and one 'all' slot; LSTM's 2-D weights take the
    rank ≥ 2 rule, the fan-in of their rows."""
    model = nn.ModuleDict({"lstm": nn.LSTM(6, 4), "attn": nn.MultiheadAttention(8, 2, add_bias_kv=True)})
    found = _by_name(af.amos_param_groups(model, lr=0.01))
    for name in ("lstm.bias_ih_l0", "lstm.bias_hh_l0", "attn.in_proj_bias", "attn.bias_k", "attn.bias_v",
                 "attn.out_proj.bias"):
        assert found[name][:2] == (0.5, "all"), name
    assert found["lstm.weight_ih_l0"][:2] == (math.sqrt(1 / 6), (1,))
    assert found["lstm.weight_hh_l0"][:2] == (math.sqrt(1 / 4), (1,))


def test_param_groups_overrides():
    model = _model()
    with pytest.warns(UserWarning, match=r"overrides \['no.such.param'\] match no param name"):
        groups = af.amos_param_groups(
            model, lr=0.01,
            overrides={
                "block.*.weight": {"eta": 0.3},
                "block.fc.weight": {"eta": 0.2, "reduce_axes": None},  # later pattern wins
                "emb.weight": {"reduce_axes": "all"},
                "*bias": {"eta": 0.1},
                "table": {"reduce_axes": (-1,)},  # normalized to (1,)
                "no.such.param": {"eta": 9.0},  # matches nothing: changes nothing, with a warning
            },
        )
    found = _by_name(groups)
    assert found["block.fc.weight"][:2] == (0.2, None)
    assert found["block.ln.weight"][:2] == (0.3, "all")
    assert found["emb.weight"][:2] == (math.sqrt(1 / 8), "all")
    for name in ("block.fc.bias", "block.ln.bias", "conv.bias"):
        assert found[name][:2] == (0.1, "all"), name
    assert found["table"][:2] == (math.sqrt(1 / 6), (1,))
    assert found["conv.weight"][:2] == (math.sqrt(1 / 27), (1, 2, 3))  # untouched
    # the overridden slots are what Amos creates
    opt = af.Amos(groups, lr=0.01, backend="reference")
    _set_named_grads(model, 0)
    opt.step()
    fc = model.block.fc.weight
    assert opt.state[fc]["v"].shape == fc.shape
    assert opt.state[model.emb.weight]["v"].shape == ()


@pytest.mark.parametrize("override", [
    {"eta": 0.1, "lr": 0.5},
    {"reduce_axis": (1,)},
    {"weight_decay": 0.0},
])
def test_param_groups_unknown_override_key(override):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown"):
        af.amos_param_groups(model, lr=0.01, overrides={"block.fc.weight": override})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("override", [{"eta": 0.0}, {"eta": -1.0}, {"eta": "0.1"}, {"eta": None}, {"eta": True},
                                      {"reduce_axes": (2,)}, {"reduce_axes": "rows"}])
def test_param_groups_bad_override_value(override):
    """A bad override value is a ValueError naming the param it was set for."""
    with pytest.raises(ValueError, match="block.fc.weight"):
        af.amos_param_groups(_model(), lr=0.01, overrides={"block.fc.weight": override})


@pytest.mark.parametrize("model, overrides, kind, match", [
    ("params", None, TypeError, r"model must be an nn.Module .*got list"),
    ("model", [("*", {"eta": 0.1})], TypeError, r"overrides must be a mapping .*got list"),
    ("model", {"block.fc.weight": 0.5}, TypeError, r"overrides\['block.fc.weight'\] must be a mapping .*got float 0.5"),
    ("model", {"block.fc.weight": "eta"}, TypeError, r"overrides\['block.fc.weight'\] must be a mapping .*got str"),
    ("model", {0: {"eta": 0.1}}, TypeError, r"overrides' keys are patterns over param names \(str\), got int 0"),
])
def test_param_groups_name_a_model_or_overrides_of_the_wrong_kind(model, overrides, kind, match):
    net = _model()
    with pytest.raises(kind, match=match):
        af.amos_param_groups(list(net.parameters()) if model == "params" else net, lr=0.01, overrides=overrides)


def test_param_groups_name_a_lazy_param_and_a_meta_param_whose_eta_they_cannot_read():
    """A lazy module's uninitialized param is named (run a forward pass first); a
    1-D param on the meta device, whose η would be read from its values, is named
    too, and steps through once its η is given in ``overrides``."""
    with pytest.raises(ValueError, match=r"amos_param_groups: 1.weight is a lazy module's uninitialized param"):
        af.amos_param_groups(nn.Sequential(nn.Linear(2, 2), nn.LazyLinear(3)), lr=0.01)

    class WithTemperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.temperature = nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        model = WithTemperature()
    with pytest.raises(ValueError, match=r"amos_param_groups: temperature \(shape \(4,\)\): .*meta.*overrides"):
        af.amos_param_groups(model, lr=0.01)
    groups = af.amos_param_groups(model, lr=0.01, overrides={"temperature": {"eta": 0.25}})
    etas = {name: eta for g in groups for name, eta in zip(g["param_names"], g["eta"])}
    assert etas == {"lin.weight": 0.5, "lin.bias": 0.5, "temperature": 0.25}


def test_param_groups_warn_of_a_pattern_that_matches_no_param():
    """A misspelt pattern changes nothing, and says so."""
    with pytest.warns(UserWarning, match=r"overrides \['block.fc.wieght'\] match no param name"):
        groups = af.amos_param_groups(_model(), lr=0.01, overrides={"block.fc.wieght": {"eta": 2.0}})
    plain = af.amos_param_groups(_model(), lr=0.01)
    assert [(g["param_names"], g["eta"]) for g in groups] == [(g["param_names"], g["eta"]) for g in plain]


def test_param_groups_of_a_transposed_conv_follow_its_weight_layout():
    """nn.ConvTranspose2d's weight is (in, out/groups, k, k): η from torch's fan-in
    of that weight, out/groups·k², and one slot per dim-0 (input) channel."""
    model = nn.ConvTranspose2d(in_channels=8, out_channels=4, kernel_size=3, groups=2)
    groups = af.amos_param_groups(model, lr=0.01)
    by_name = {name: (eta, g["reduce_axes"]) for g in groups for name, eta in zip(g["param_names"], g["eta"])}
    assert by_name["weight"] == (math.sqrt(1 / (2 * 9)), (1, 2, 3))
    opt = af.Amos(groups, lr=0.01)
    model(torch.randn(1, 8, 5, 5)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["v"].shape == (8, 1, 1, 1)


def test_param_groups_both_backends_agree(capabilities):
    model_cpu, model_ref = _model(), _model()
    opts = {}
    for backend, model in (("cpu", model_cpu), ("reference", model_ref)):
        groups = af.amos_param_groups(model, lr=0.05, momentum=0.9, clip_value=1.0)
        opts[backend] = _amos(groups, backend, lr=0.05)
    initial = [p.detach().clone() for p in model_cpu.parameters()]
    for step in range(10):
        for backend, model in (("cpu", model_cpu), ("reference", model_ref)):
            if step == 6:
                for group in opts[backend].param_groups:
                    group["lr"] = 0.02
            _set_named_grads(model, step)
            opts[backend].step()
    tol = tolerance("cpu", "amos", torch.float64)
    named_ref = dict(model_ref.named_parameters())
    moved = 0
    for (name, pc), p0 in zip(model_cpu.named_parameters(), initial):
        pr = named_ref[name]
        assert_close_scaled(pc, pr, what=name, **tol)
        if not pc.requires_grad:
            continue
        moved += int(not torch.equal(pc.detach(), p0))
        sc, sr = opts["cpu"].state[pc], opts["reference"].state[pr]
        assert set(sc) == set(sr) == {"step", "v", "b", "mu"}
        assert float(sc["step"]) == float(sr["step"]) == 10.0
        for key in ("v", "b", "mu"):
            assert_close_scaled(sc[key], sr[key], what=f"{name} {key}", **tol)
    assert moved == len(initial) - 1  # every param but the frozen one


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_param_groups_state_dict_roundtrip(backend):
    model = _model()
    opt = _amos(af.amos_param_groups(model, lr=0.05, momentum=0.9), backend, lr=0.05)
    for step in range(4):
        _set_named_grads(model, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    twin = copy.deepcopy(model)  # the same (trained) weights, fresh optimizer built the same way
    twin_opt = _amos(af.amos_param_groups(twin, lr=0.05, momentum=0.9), backend, lr=0.05)
    # built from the trained weights, the bare vector's inferred η differs ...
    assert _by_name(twin_opt.param_groups)["gain"][0] != 2.0
    twin_opt.load_state_dict(saved)
    # ... and the checkpoint restores every group's η (and reduce_axes)
    for ga, gb in zip(opt.param_groups, twin_opt.param_groups):
        assert ga["eta"] == gb["eta"] and ga["reduce_axes"] == gb["reduce_axes"]
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    assert_states_equal(opt, params, twin_opt, twin_params)
    for step in range(4, 10):
        for m, o in ((model, opt), (twin, twin_opt)):
            _set_named_grads(m, step)
            o.step()
    assert_states_equal(opt, params, twin_opt, twin_params)
    assert float(twin_opt.state[twin.emb.weight]["step"]) == 10.0
    # the loaded state is a copy: stepping the twin never touched the original's tensors
    assert all(
        twin_opt.state[tp]["v"].data_ptr() != opt.state[p]["v"].data_ptr()
        for p, tp in zip(params, twin_params)
    )


# ---------------------------------------------------------------------------
# Optimizer-state memory
# ---------------------------------------------------------------------------

class _TransformerBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class _TinyTransformer(nn.Module):
    def __init__(self, vocab=512, context=64, d=128, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_TransformerBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _state_bytes(opt):
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _step_once(opt, model):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
    opt.step()


@pytest.mark.parametrize("momentum,limit", [(None, 0.02), (0.9, 0.51)])
def test_state_bytes_vs_adamw(momentum, limit):
    """AdamW keeps 2 full-size tensors; Amos keeps 2 slots per tensor, (out, 1) for
    the matrices, i.e. a fraction ~1/in of them (1/128 here), plus a full-size mu
    with momentum: 1/2 + ~1/256 of AdamW's bytes."""
    torch.manual_seed(0)
    model = _TinyTransformer()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    _step_once(adamw, model)
    adamw_bytes = _state_bytes(adamw)
    numel = sum(p.numel() for p in model.parameters())
    assert adamw_bytes == 2 * 4 * numel

    torch.manual_seed(0)
    model = _TinyTransformer()
    groups = af.amos_param_groups(model, lr=0.01, momentum=momentum)
    amos = _amos(groups, "cpu", lr=0.01)
    _step_once(amos, model)
    amos_bytes = _state_bytes(amos)
    # exactly the table's slots: (out, 1) for Linear/Embedding weights, scalars for
    # biases and LayerNorm, plus a full-size mu with momentum
    expected = 0
    for p in model.parameters():
        slot = p.shape[0] if p.dim() == 2 else 1
        expected += 4 * (2 * slot + (p.numel() if momentum is not None else 0))
    assert amos_bytes == expected
    assert amos_bytes <= limit * adamw_bytes, f"Amos state is {amos_bytes / adamw_bytes:.2%} of AdamW's"


# ---------------------------------------------------------------------------
# state layout and eta inference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("reduce_axes, expected", [
    (None, lambda shape: shape),
    ("all", lambda shape: ()),
    ((1,), lambda shape: (shape[0], 1) + shape[2:]),
    ((0,), lambda shape: (1,) + shape[1:]),
    ((-1,), lambda shape: shape[:-1] + (1,)),
    ((0, 1), lambda shape: (1, 1) + shape[2:]),
])
def test_state_keys_and_slot_shapes(reduce_axes, expected, momentum):
    shapes = [(6, 4), (5, 3, 2), (2, 7)]
    params = make_params(torch.float64, shapes=shapes)
    opt = af.Amos(params, lr=0.05, eta=0.5, reduce_axes=reduce_axes, momentum=momentum, backend="reference")
    set_grads(params, make_grads(params, 0))
    opt.step()
    for p in params:
        state = opt.state[p]
        keys = {"step", "v", "b"} | ({"mu"} if momentum is not None else set())
        assert set(state) == keys
        assert tuple(state["v"].shape) == expected(tuple(p.shape))
        assert tuple(state["b"].shape) == expected(tuple(p.shape))
        assert state["v"].dtype == p.dtype and state["b"].dtype == p.dtype
        if momentum is not None:
            assert state["mu"].shape == p.shape
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 1.0


def test_linear_weight_rows_slot():
    """nn.Linear(5 -> 37) weight with reduce_axes=(1,): one slot per output row."""
    weight = torch.nn.Linear(5, 37, dtype=torch.float64).weight
    weight.grad = torch.randn_like(weight)
    opt = af.Amos([weight], lr=0.05, reduce_axes=(1,), backend="reference")
    opt.step()
    assert opt.state[weight]["v"].shape == (37, 1)
    torch.testing.assert_close(opt.state[weight]["v"], (1 - 0.999) * weight.grad.square().mean(1, keepdim=True))


def test_eta_none_is_inferred_per_param():
    params = [
        torch.nn.Linear(30, 8, dtype=torch.float64).weight.detach().requires_grad_(True),
        torch.zeros(8, dtype=torch.float64, requires_grad=True),
        torch.ones(4, dtype=torch.float64, requires_grad=True),
        torch.empty(0, dtype=torch.float64, requires_grad=True),
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
    ]
    opt = af.Amos([{"params": params[:3]}, {"params": params[3:], "lr": 0.01}], lr=0.05, backend="reference")
    first, second = (g["eta"] for g in opt.param_groups)
    assert isinstance(first, tuple) and isinstance(second, tuple)
    assert len(first) == 3 and len(second) == 2
    expected_weight = params[0].detach().square().mean().sqrt().item()
    assert first[0] == pytest.approx(expected_weight, rel=1e-12)
    assert 0.05 < first[0] < 1 / math.sqrt(30)  # torch's default init: RMS ~ 1/sqrt(3*in)
    assert first[1] == 0.5 and first[2] == pytest.approx(1.0)
    assert second == (0.5, pytest.approx(2.5))
    # an explicit eta is kept as given
    opt2 = af.Amos(clone_params(params[:2]), lr=0.05, eta=0.25, backend="reference")
    assert opt2.param_groups[0]["eta"] == 0.25


def test_eta_survives_a_checkpoint():
    params = make_params(torch.float64, shapes=[(6, 4), (3,)])
    opt = af.Amos(params, lr=0.05, backend="reference")
    set_grads(params, make_grads(params, 0))
    opt.step()
    copies = clone_params(params)
    other = af.Amos(copies, lr=0.05, eta=0.9, backend="reference")
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["eta"] == opt.param_groups[0]["eta"]
    for step in (1, 2):
        step_together(make_grads(params, step), (params, opt), (copies, other))
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


def test_param_groups_of_zero_element_params():
    """Params with no elements (a fan-in of 0 included) get groups and step."""
    model = nn.Sequential(nn.Linear(0, 3), nn.Embedding(5, 0), nn.Linear(3, 2))
    groups = af.amos_param_groups(model, lr=0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = af.Amos(groups, lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("option", ["eta", "reduce_axes", "params", "param_names"])
def test_param_groups_refuse_options_they_set_per_param(option):
    with pytest.raises(ValueError, match=f"{option} cannot be group options"):
        af.amos_param_groups(nn.Linear(3, 2), 0.01, **{option: 0.3})


# ---- group values edited between steps: read as the group holds them now ---------

def _stepped_amos(reduce_axes=(0,), **kwargs):
    gen = torch.Generator().manual_seed(2)
    params = [nn.Parameter(torch.randn(4, 6, generator=gen)), nn.Parameter(torch.randn(5, 3, generator=gen))]
    opt = af.Amos(params, lr=0.01, reduce_axes=reduce_axes, **kwargs)
    _grads_step(params, opt, 0)
    return params, opt


def _grads_step(params, opt, step):
    gen = torch.Generator().manual_seed(10 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def _unchanged(params, opt):
    return [p.detach().clone() for p in params], {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}


def _assert_unchanged(params, opt, snapshot):
    before, states = snapshot
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    for p in params:
        assert all(torch.equal(v, opt.state[p][k]) for k, v in states[p].items())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("eta", ["abc", ("x", 0.5), (None, 0.5), torch.tensor([1.0, 2.0]), [float("nan"), 0.5]])
def test_a_bad_eta_set_between_steps_is_refused_by_name(eta, backend):
    params, opt = _stepped_amos(backend=backend)
    opt.param_groups[0]["eta"] = eta
    snapshot = _unchanged(params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*eta"):
        _grads_step(params, opt, 1)
    _assert_unchanged(params, opt, snapshot)


def test_an_eta_list_edited_in_place_is_read_as_it_is_now():
    """A list eta edited in place between steps steps like a new list of the same values."""
    runs = []
    for in_place in (True, False):
        params, opt = _stepped_amos()
        opt.param_groups[0]["eta"] = [0.3, 0.7]
        _grads_step(params, opt, 1)
        if in_place:
            opt.param_groups[0]["eta"][0] = 5.0
        else:
            opt.param_groups[0]["eta"] = [5.0, 0.7]
        _grads_step(params, opt, 2)
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_eta_set_to_none_between_steps_is_inferred_anew():
    """None means what it means at construction: η inferred from each param (as
    it is when the step begins)."""
    params, opt = _stepped_amos(eta=0.3)
    opt.param_groups[0]["eta"] = None
    expected = tuple(af.optim.initial_rms_eta(p) for p in params)
    _grads_step(params, opt, 1)
    assert opt.param_groups[0]["eta"] == expected


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_reduce_axes_list_edited_in_place_is_refused_before_any_write(backend):
    params, opt = _stepped_amos(backend=backend)
    axes = [1]
    opt.param_groups[0]["reduce_axes"] = axes
    opt.state.clear()
    _grads_step(params, opt, 1)  # slots of (1,) made afresh
    axes[0] = 0  # in place: another slot shape than the state's
    snapshot = _unchanged(params, opt)
    with pytest.raises(ValueError, match=r"params'\]\[0\].*state\['v'\].*reduce_axes=\[0\]"):
        _grads_step(params, opt, 2)
    _assert_unchanged(params, opt, snapshot)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_param_data_of_another_shape_is_refused_before_any_write(backend):
    """p.data swapped for a tensor of another shape: its slots no longer fit; the
    step names the param and writes nothing (the first param included)."""
    params, opt = _stepped_amos(reduce_axes=(1,), backend=backend)
    params[1].data = torch.randn(7, 3)
    params[1].grad = None
    snapshot = _unchanged(params, opt)
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    with pytest.raises(ValueError, match=r"params'\]\[1\].*state\['v'\] has shape"):
        opt.step()
    _assert_unchanged(params, opt, snapshot)


@pytest.mark.parametrize("eta", [(1e-300, 0.5), (1e300, 0.5)])
def test_a_per_param_eta_is_range_checked_in_its_own_params_dtype(eta):
    """A float64 param steps in float64: its eta entry is not held to float32's range
    because the group also has a float32 param (whose own entry still is)."""
    p64 = nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    p32 = nn.Parameter(torch.randn(16, 8))
    opt = af.Amos([p64, p32], lr=0.01, eta=eta, backend="cpu")
    for p in (p64, p32):
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match=r"Invalid eta\[0\] \(param_groups\[0\]\['params'\]\[0\]'s\)"):
        af.Amos([p32, p64], lr=0.01, eta=eta, backend="cpu")


@pytest.mark.parametrize("edit", ["reverse", "delete-first", "delete-first-then-add", "delete-first-then-refused-add"])
def test_inferred_etas_follow_their_params_when_groups_are_also_reordered(edit):
    """A param appended to a group gets its own inferred eta, and the others keep
    theirs, also when the groups were reordered or one removed in the same edit
    (and a group added after the removal, at the index the moved group had)."""
    torch.manual_seed(0)
    a, b, c, new = (nn.Parameter(torch.randn(20, 30)) for _ in range(4))
    opt = af.Amos([{"params": [a, b]}, {"params": [c]}], lr=0.01, backend="cpu")
    for p in (a, b, c, new):
        p.grad = torch.randn(20, 30)
    opt.step()
    eta_of = {id(a): opt.param_groups[0]["eta"][0], id(b): opt.param_groups[0]["eta"][1],
              id(c): opt.param_groups[1]["eta"][0]}
    expected_new = af.Amos([new], lr=0.01).param_groups[0]["eta"][0]
    if edit == "reverse":
        opt.param_groups[0]["params"].append(new)
        opt.param_groups.reverse()
    elif edit == "delete-first":
        opt.param_groups[1]["params"].append(new)
        del opt.param_groups[0]
    elif edit == "delete-first-then-add":
        added = nn.Parameter(torch.randn(20, 30))
        del opt.param_groups[0]
        opt.add_param_group({"params": [added], "eta": 0.25})
        opt.param_groups[0]["params"].append(new)
        eta_of[id(added)] = 0.25
    else:  # (a group refused by add_param_group changes nothing)
        del opt.param_groups[0]
        with pytest.raises(ValueError, match="learning rate"):
            opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": -1.0})
        opt.param_groups[0]["params"].insert(0, new)
    opt.step()
    for group in opt.param_groups:
        etas = group["eta"] if isinstance(group["eta"], tuple) else (group["eta"],) * len(group["params"])
        assert len(etas) == len(group["params"])
        for p, eta in zip(group["params"], etas):
            assert eta == (expected_new if p is new else eta_of[id(p)])


@pytest.mark.parametrize("where", ["constructor", "between steps"])
def test_a_per_param_value_beyond_float64_is_named(where):
    p = nn.Parameter(torch.randn(8, 8))
    if where == "constructor":
        with pytest.raises(ValueError, match=r"eta.*beyond float64's range"):
            af.Amos([p], lr=1e-3, eta=(10 ** 400,))
        return
    opt = af.Amos([p], lr=1e-3, eta=0.5)
    p.grad = torch.randn(8, 8)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0]["eta"] = (10 ** 400,)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['eta'\] holds a value beyond float64's range"):
        opt.step()
    assert torch.equal(p, before)


def test_a_numpy_array_reduce_axes_is_named():
    import numpy as np
    with pytest.raises(ValueError, match=r"reduce_axes must be None, 'all', a dim or a tuple of dims, got array"):
        af.Amos([nn.Parameter(torch.randn(6, 5))], lr=0.01, reduce_axes=np.array([0, 1]))


def test_param_groups_do_not_warn_of_a_pattern_naming_a_frozen_param():
    """A frozen param is left out of the groups, but a pattern naming it names a
    param of the model: no warning (an overrides config reused across freezing)."""
    import warnings

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    model[0].weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = af.amos_param_groups(model, lr=0.01, overrides={"0.weight": {"eta": 0.1}})
    assert [n for g in groups for n in g["param_names"]] == ["1.weight", "1.bias"]
