"""What an optimizer keeps of its params: like torch.optim, nothing once a param
has left every group and has no state — its last layout, master-weight write
mark, telemetry and its group's plan are dropped at the next step, so it is
freed; and the construction of many groups checks their memory overlap once."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import amos_fused as af
import amos_fused.checks as checks
import amos_fused.optimizer_base as optimizer_base

BACKENDS = ["cpu", "reference"]

CASES = {
    "matrix": (lambda ps, b: af.AdamW(ps, lr=1e-2, backend=b), torch.float32, (16, 8)),
    "masters": (lambda ps, b: af.AdamW(ps, lr=1e-2, master_weights=True, backend=b), torch.bfloat16, (64,)),
    "telemetry": (lambda ps, b: af.AdamW(ps, lr=1e-2, track_rms=True, backend=b), torch.float32, (64,)),
    "amos": (lambda ps, b: af.Amos(ps, lr=1e-2, eta=0.1, reduce_axes=(1,), backend=b), torch.float32, (16, 8)),
    "8bit": (lambda ps, b: af.AdamW8bit(ps, lr=1e-2, backend=b), torch.float32, (64, 128)),
}


def _param(dtype, shape):
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    p.grad = torch.randn(shape).to(dtype)
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["replaced", "group_removed", "state_deleted_after_a_step"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_param_that_left_the_optimizer_is_freed(case, how, backend):
    make, dtype, shape = CASES[case]
    keep, gone = _param(dtype, shape), _param(dtype, shape)
    opt = make([{"params": [keep]}, {"params": [gone]}], backend)
    opt.step()
    opt.step()
    if how == "replaced":
        opt.param_groups[1]["params"] = [_param(dtype, shape)]
    else:
        opt.param_groups.pop(1)
    if how == "state_deleted_after_a_step":  # (out of every group with its state, then without)
        opt.step()
    del opt.state[gone]
    ref = weakref.ref(gone)
    del gone
    opt.step()  # (the step that sees the change drops what it held)
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_removed_from_its_group_but_with_state_keeps_its_layout(backend):
    """A param out of every group but still in opt.state (torch keeps its state
    too) may come back: its last layout is kept, and a new layout is re-laid."""
    a, b = _param(torch.float32, (16, 8)), _param(torch.float32, (16, 8))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
    opt.step()
    opt.param_groups[1]["params"] = []
    opt.step()
    b.data = b.data.t().contiguous().t()  # another memory layout, same values
    opt.param_groups[1]["params"] = [b]
    opt.step()
    assert opt.state[b]["exp_avg"].stride() == b.stride()


def test_construction_and_load_check_overlap_once(monkeypatch):
    calls = []
    real = checks.first_overlap

    def counted(params):
        calls.append(len(params))
        return real(params)

    monkeypatch.setattr(optimizer_base, "first_overlap", counted)
    groups = [{"params": [_param(torch.float32, (3,)) for _ in range(4)]} for _ in range(30)]
    opt = af.AdamW(groups, lr=1e-2, backend="cpu")
    assert calls == [120]
    opt.step()
    calls.clear()
    opt.load_state_dict(opt.state_dict())
    assert calls == [120]
    shared = torch.zeros(8)
    with pytest.raises(ValueError, match="shares memory"):
        af.AdamW([{"params": [torch.nn.Parameter(shared[:5])]}, {"params": [torch.nn.Parameter(shared[3:])]}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_awaiting_its_master_after_a_torch_checkpoint_is_freed_once_it_left(backend):
    """A torch.optim checkpoint of bfloat16 params loaded with master_weights=True:
    each param awaits the master its next step makes; one that leaves its group
    without state before that step is not held by that wait."""
    keep, gone = _param(torch.bfloat16, (64,)), _param(torch.bfloat16, (64,))
    source = torch.optim.AdamW([keep, gone], lr=1e-2)
    source.step()
    saved = source.state_dict()
    del source
    opt = af.AdamW([keep, gone], lr=1e-2, master_weights=True, backend=backend)
    opt.load_state_dict(saved)
    del saved
    opt.param_groups[0]["params"] = [keep]
    del opt.state[gone]
    ref = weakref.ref(gone)
    del gone
    opt.step()
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["master", "complex"])
def test_the_rms_record_holds_no_tensor_of_a_deleted_state(kind, backend):
    """track_rms=True keeps each param's latest sums, not the tensor stepped: a
    float32 master (or a complex param's real view of a replaced storage) whose
    state is deleted is freed, as without telemetry."""
    if kind == "master":
        p = _param(torch.bfloat16, (64,))
        opt = af.AdamW([p], lr=1e-2, master_weights=True, track_rms=True, backend=backend)
        opt.step()
        held = weakref.ref(opt.state[p]["master_param"])
    else:
        p = _param(torch.complex64, (64,))
        opt = af.AdamW([p], lr=1e-2, track_rms=True, backend=backend)
        opt.step()
        old = p.data
        held = weakref.ref(old)
        p.data = torch.randn(64, dtype=torch.complex64)
        del old
    p.grad = None
    del opt.state[p]
    opt.step()
    gc.collect()
    assert held() is None, [type(r).__name__ for r in gc.get_referrers(held())]
    assert p in opt.rms()  # (its latest sums are still reported)
