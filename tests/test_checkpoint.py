"""Checkpoints move between torch.optim and amos_fused in both directions
(same state keys), directly and through torch.save/torch.load;
loading copies (never aliases) the source tensors; maximize=True is honoured."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import amos_fused as af
from conftest import (
    assert_params_close,
    assert_state_close,
    clone_params,
    make_grads,
    make_params,
    param_groups,
    set_grads,
    states_of,
)
from registry import ALL_CLASS_CASES, CASES, backends, seeded_grads, seeded_params

# family -> (ours for a backend, torch.optim's twin), from the registry
FAMILIES = {
    key: (lambda g, backend, case=CASES[name]: case.make(g, backend), CASES[name].torch_factory())
    for key, name in {"adamw": "adamw-wd-amsgrad", "adam": "adam-l2", "radam": "radam",
                      "radam-decoupled": "radam-decoupled"}.items()
}
BACKENDS = backends("reference", "cpu")
# None grads before the checkpoint: the saved step counters differ per param.
NONE_BEFORE = {0: (2,), 2: (5,)}


def _steps(opt, params, first, count, none=None):
    none = none or {}
    for step in range(first, first + count):
        set_grads(params, make_grads(params, step), none.get(step, ()))
        opt.step()


def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("via_bytes", [False, True], ids=["direct", "bytesio"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_checkpoint_into_ours(family, backend, via_bytes):
    make_ours, make_torch = FAMILIES[family]
    params = make_params(torch.float64)
    source = make_torch(param_groups(params))
    _steps(source, params, 0, 5, NONE_BEFORE)
    saved = source.state_dict()
    if via_bytes:
        saved = _through_bytes(saved)

    ours_params = clone_params(params)
    ours = make_ours(param_groups(ours_params), backend)
    ours.load_state_dict(saved)
    assert_state_close(states_of(ours, ours_params), states_of(source, params))

    # Both continue from the same point.
    _steps(source, params, 5, 6)
    _steps(ours, ours_params, 5, 6)
    assert_params_close(ours_params, params)
    assert_state_close(states_of(ours, ours_params), states_of(source, params))
    assert ours.defaults["backend"] == backend and all("backend" not in g for g in ours.param_groups)


@pytest.mark.parametrize("via_bytes", [False, True], ids=["direct", "bytesio"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_our_checkpoint_into_torch(family, backend, via_bytes):
    make_ours, make_torch = FAMILIES[family]
    params = make_params(torch.float64)
    ours = make_ours(param_groups(params), backend)
    _steps(ours, params, 0, 5, NONE_BEFORE)
    saved = ours.state_dict()
    if via_bytes:
        saved = _through_bytes(saved)

    torch_params = clone_params(params)
    target = make_torch(param_groups(torch_params))
    # torch.optim's load_state_dict aliases same-dtype/device tensors (its own
    # tests deepcopy too); without the copy both optimizers would step one state.
    target.load_state_dict(copy.deepcopy(saved))
    assert_state_close(states_of(target, torch_params), states_of(ours, params))

    _steps(ours, params, 5, 6)
    _steps(target, torch_params, 5, 6)
    assert_params_close(params, torch_params)
    assert_state_close(states_of(ours, params), states_of(target, torch_params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_our_checkpoint_roundtrip(family, backend):
    """Ours -> bytes -> a fresh one of ours continues bitwise like the original."""
    make_ours, _ = FAMILIES[family]
    params = make_params(torch.float32)
    first = make_ours(param_groups(params), backend)
    _steps(first, params, 0, 4, NONE_BEFORE)
    copy_params = clone_params(params)
    second = make_ours(param_groups(copy_params), backend)
    second.load_state_dict(_through_bytes(first.state_dict()))
    _steps(first, params, 4, 4)
    _steps(second, copy_params, 4, 4)
    for a, b in zip(params, copy_params):
        assert torch.equal(a, b)
    for sa, sb in zip(states_of(first, params), states_of(second, copy_params)):
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_into_a_different_dtype(backend):
    """A float64 checkpoint loads into float32 params: state follows the param's dtype."""
    params64 = make_params(torch.float64)
    source = torch.optim.AdamW(param_groups(params64), lr=1e-2)
    _steps(source, params64, 0, 3)
    params32 = [p.detach().float().requires_grad_(True) for p in params64]
    ours = af.AdamW(param_groups(params32), lr=1e-2, backend=backend)
    ours.load_state_dict(source.state_dict())
    for p, state in zip(params32, states_of(ours, params32)):
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == p.shape
        assert state["step"].dtype == torch.float32
    _steps(ours, params32, 3, 2)  # the fused kernels accept the converted state
    _steps(source, params64, 3, 2)
    for a, b in zip(params32, params64):
        torch.testing.assert_close(a, b.float())


# ---------------------------------------------------------------------------
# loading copies
# ---------------------------------------------------------------------------

def _source_state_dict():
    params = make_params(torch.float64)
    source = torch.optim.AdamW(param_groups(params), lr=1e-2, amsgrad=True)
    _steps(source, params, 0, 3)
    return params, source.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_copies_state(backend):
    params, saved = _source_state_dict()
    ours_params = clone_params(params)
    ours = af.AdamW(param_groups(ours_params), lr=1e-2, amsgrad=True, backend=backend)
    ours.load_state_dict(saved)
    loaded = states_of(ours, ours_params)

    source_ptrs = {
        value.data_ptr()
        for state in saved["state"].values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.numel() > 0
    }
    for state in loaded:
        for key, value in state.items():
            assert value.numel() == 0 or value.data_ptr() not in source_ptrs, f"{key} aliases the source"

    snapshot = [{k: v.clone() for k, v in state.items()} for state in loaded]
    # Mutate every tensor of the source state_dict in place.
    for state in saved["state"].values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.add_(100.0)
    for before, state in zip(snapshot, states_of(ours, ours_params)):
        for key, value in state.items():
            assert torch.equal(value, before[key]), f"{key} changed with the source"

    # And stepping ours does not write into the source.
    source_copy = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in saved["state"].items()}
    _steps(ours, ours_params, 3, 2)
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, source_copy[index][key])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(ALL_CLASS_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16-masters"])
def test_load_copies_every_state_of_every_class(name, dtype, backend):
    """Loading copies every tensor: the 8-bit codes and absmax, Amos's slots and
    momentum, masters; the loaded optimizer shares no memory with the checkpoint,
    and later writes to either side leave the other as it was."""
    case = ALL_CLASS_CASES[name]
    extra = {"master_weights": True} if dtype == torch.bfloat16 else {}
    source_params = seeded_params([(64, 80), (5000,), (7,)], dtype)
    source = case.make(source_params, backend, **extra)
    for step in range(2):
        for p, g in zip(source_params, seeded_grads(source_params, step)):
            p.grad = g
        source.step()
    saved = source.state_dict()
    params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    opt = case.make(params, backend, **extra)
    opt.load_state_dict(saved)
    source_ptrs = {value.untyped_storage().data_ptr() for state in saved["state"].values()
                   for value in state.values() if isinstance(value, torch.Tensor) and value.numel() > 0}
    loaded = [opt.state[p] for p in params]
    for state in loaded:
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                assert value.untyped_storage().data_ptr() not in source_ptrs, f"{name}: {key} aliases the checkpoint"
    before = [{k: v.clone() for k, v in state.items()} for state in loaded]
    for state in saved["state"].values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                value.add_(1 if value.dtype == torch.uint8 else 100.0)
    for state, kept in zip(loaded, before):
        for key, value in state.items():
            assert torch.equal(value, kept[key]), f"{name}: {key} changed with the checkpoint"


@pytest.mark.parametrize("source_step", ["float32", "float64", "int64", "python-int"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_step_is_float32_cpu_scalar(backend, source_step):
    params, saved = _source_state_dict()
    for state in saved["state"].values():
        value = float(state["step"])
        state["step"] = {
            "float32": lambda: torch.tensor(value, dtype=torch.float32),
            "float64": lambda: torch.tensor(value, dtype=torch.float64),
            "int64": lambda: torch.tensor(int(value), dtype=torch.int64),
            "python-int": lambda: int(value),
        }[source_step]()
    ours_params = clone_params(params)
    ours = af.AdamW(param_groups(ours_params), lr=1e-2, amsgrad=True, backend=backend)
    ours.load_state_dict(saved)
    for state in states_of(ours, ours_params):
        step = state["step"]
        assert isinstance(step, torch.Tensor)
        assert step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu"
        assert float(step) == 3.0
    _steps(ours, ours_params, 3, 1)
    assert all(float(s["step"]) == 4.0 for s in states_of(ours, ours_params))


# ---------------------------------------------------------------------------
# maximize: a torch.optim checkpoint with maximize=True keeps maximizing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["adamw", "adam", "radam"])
def test_maximize_checkpoint_keeps_maximizing(family, backend):
    make_ours, _ = FAMILIES[family]
    torch_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}[family]
    params = make_params(torch.float64)
    source = torch_cls(param_groups(params), lr=1e-2, maximize=True)
    _steps(source, params, 0, 2)

    ours_params = clone_params(params)
    ours = make_ours(param_groups(ours_params), backend)
    ours.load_state_dict(source.state_dict())
    assert all(g["maximize"] for g in ours.param_groups)
    _steps(source, params, 2, 3)
    _steps(ours, ours_params, 2, 3)
    assert_params_close(ours_params, params)
    assert_state_close(states_of(ours, ours_params), states_of(source, params))
