"""A step of FakeTensors (torch's FakeTensorMode, under which memory estimators run a
training step): the state a real step makes, with fake tensors, and nothing
computed; settings are checked as a real step checks them."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import amos_fused as af

MAKERS = {
    "AdamW": (lambda ps: af.AdamW(ps, lr=1e-3), torch.float32),
    "Adam-amsgrad": (lambda ps: af.Adam(ps, lr=1e-3, amsgrad=True), torch.float32),
    "RAdam": (lambda ps: af.RAdam(ps, lr=1e-3), torch.float32),
    "Lion": (lambda ps: af.Lion(ps, lr=1e-4), torch.float32),
    "AdamW8bit": (lambda ps: af.AdamW8bit(ps, lr=1e-3), torch.float32),
    "Lion8bit": (lambda ps: af.Lion8bit(ps, lr=1e-4), torch.float32),
    "Amos": (lambda ps: af.Amos(ps, lr=1e-2, eta=0.1, momentum=0.9), torch.float32),
    "Amos8bit": (lambda ps: af.Amos8bit(ps, lr=1e-2, eta=0.1, momentum=0.9), torch.float32),
    "ScaledAdamW": (lambda ps: af.ScaledAdamW(ps, lr=1e-3, half_life=10, sigma=0.02), torch.float32),
    "Lamb": (lambda ps: af.Lamb(ps, lr=1e-3), torch.float32),
    "AdamW-master": (lambda ps: af.AdamW(ps, lr=1e-3, master_weights=True), torch.bfloat16),
    "AdamW-bf16-sr": (lambda ps: af.AdamW(ps, lr=1e-3, bf16_stochastic_round=True), torch.bfloat16),
}
SHAPES = [(64, 80), (7,), (3, 5)]  # (FP8 states from 4096 elements)


def _params(dtype):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


def _layout(state):
    return {key: (value.dtype, tuple(value.shape), value.device) for key, value in state.items()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_fake_step_makes_the_states_a_real_step_makes(name):
    make, dtype = MAKERS[name]
    real = _params(dtype)
    opt = make(real)
    for p in real[:2]:  # (the third has no grad: no state, as in a real step)
        p.grad = torch.randn_like(p)
    opt.step()
    expected = [_layout(opt.state[p]) for p in real[:2]]
    with FakeTensorMode():
        fake = _params(dtype)
        opt = make(fake)
        for p in fake[:2]:
            p.grad = torch.randn_like(p)
        for _ in range(2):
            opt.step()
        assert [_layout(opt.state[p]) for p in fake[:2]] == expected
        assert fake[2] not in opt.state
        assert all(is_fake(v) for p in fake[:2] for v in opt.state[p].values())


def test_a_fake_step_checks_every_group_before_making_any_state():
    with FakeTensorMode():
        a, b = _params(torch.float32)[:2]
        opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-3)
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.param_groups[1]["lr"] = -1.0
        with pytest.raises(ValueError, match=r"param_groups\[1\].*Invalid learning rate: -1.0"):
            opt.step()
        assert len(opt.state) == 0


@pytest.mark.parametrize("make, setting", [(lambda ps: af.Amos(ps, lr=1e-2), "eta"),
                                           (lambda ps: af.ScaledAdamW(ps, lr=1e-3, half_life=10), "sigma")],
                         ids=["Amos", "ScaledAdamW"])
def test_a_setting_inferred_from_values_is_refused_for_fake_params_by_name(make, setting):
    with FakeTensorMode():
        with pytest.raises(ValueError, match=rf"cannot infer {setting} from a FakeTensor param"):
            make(_params(torch.float32))


@pytest.mark.parametrize("cls", [af.AdamW, af.AdamW8bit], ids=lambda c: c.__name__)
def test_torchs_memory_tracker_counts_the_states(cls):
    """torch.distributed._tools' MemTracker runs a training step under FakeTensorMode
    and counts the optimizer's state (OPT) at its peak: every state tensor,
    counters included, and nothing more (the 8-bit classes make FP8 codes without
    making full-precision moments first)."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    with FakeTensorMode():
        model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        opt = cls(model.parameters(), lr=1e-3)
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            model(torch.randn(8, 256)).sum().backward()
            opt.step()
        peak = {str(kind): value for kind, value in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
        state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert state_bytes > 0 and peak["_MemRefType.OPT"] == state_bytes


@pytest.mark.parametrize("fake_first", [True, False], ids=["fake-first", "real-first"])
def test_fake_and_real_params_in_one_step_are_refused_with_nothing_made(fake_first):
    mode = FakeTensorMode()
    with mode:
        fake = torch.nn.Parameter(torch.randn(10))
        fake.grad = torch.randn(10)
    real = torch.nn.Parameter(torch.randn(10))
    real.grad = torch.randn(10)
    before = real.detach().clone()
    opt = af.AdamW([fake, real] if fake_first else [real, fake], lr=0.1)
    with pytest.raises(ValueError, match=r"a real param in a step of FakeTensor params"):
        with mode:
            opt.step()
    with pytest.raises(ValueError, match=r"params'\]\[1\].*(a real param in a step of FakeTensor params|"
                                         r"the param is a FakeTensor \(FakeTensorMode\) in a step of real)"):
        opt.step()  # (outside the mode: the first param's kind decides)
    assert torch.equal(real.detach(), before)
    assert len(opt.state) == 0


def test_a_fake_step_outside_the_mode_advances_its_counters():
    """Fake params stepped after their FakeTensorMode block closed: the counters
    made then are real tensors, which a step advances, as torch.optim's does."""
    with FakeTensorMode():
        p = torch.nn.Parameter(torch.randn(10))
        p.grad = torch.randn(10)
    opt = af.AdamW([p], lr=1e-3)
    for _ in range(3):
        opt.step()
    assert not is_fake(opt.state[p]["step"]) and float(opt.state[p]["step"]) == 3.0


def test_a_fake_step_checks_grads_and_states_as_a_real_step_before_making_any_state():
    with FakeTensorMode():
        a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
        opt = af.AdamW([a, b], lr=1e-3)
        a.grad = torch.randn(10)
        b.grad = torch.randn(10).to_sparse()
        with pytest.raises(RuntimeError, match=r"params'\]\[1\].*sparse gradients are not supported"):
            opt.step()
        assert len(opt.state) == 0
        b.grad = torch.randn(10)
        opt.step()
        opt.state[b]["exp_avg"] = torch.zeros(3)
        with pytest.raises(ValueError, match=r"params'\]\[1\].*state\['exp_avg'\] \(shape \(3,\)\) must have"):
            opt.step()


def _fsdp_layouts(name, mesh, fake):
    """The state layouts (kind, dtype, shape; placements and local shape for a
    DTensor) after two steps of FSDP2-sharded params over a 4-rank fake process
    group, real tensors or fake ones; and, for fake ones, the optimizer-state peak
    FSDPMemTracker counts and the local bytes of the states."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def layout(v):
        if isinstance(v, DTensor):
            return ("DTensor", v.dtype, tuple(v.shape), tuple(v.placements), tuple(v.to_local().shape))
        return ("Tensor", v.dtype, tuple(v.shape), v.device)

    make, dtype = MAKERS[name]
    # rows of 64 elements (full-precision states: FP8 blocks would straddle rows) and
    # rows of 1024 (FP8 codes from 4096 elements: 16 rows of each 4-rank shard)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 64))
    if dtype != torch.float32:
        model.to(dtype)
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    opt = make(list(model.parameters()))
    x = torch.randn(8, 64, dtype=dtype)
    tracker = FSDPMemTracker(model, opt) if fake else None
    if tracker is not None:
        tracker.track_inputs((x,))
    with tracker if tracker is not None else contextlib.nullcontext():
        for _ in range(2):
            model(x).float().sum().backward()
            opt.step()
            opt.zero_grad()
    states = [opt.state[p] for p in model.parameters()]
    layouts = [{key: layout(value) for key, value in st.items()} for st in states]
    if not fake:
        return layouts, None, None
    local = [v.to_local() if isinstance(v, DTensor) else v for st in states for v in st.values()]
    assert all(is_fake(v) for v in local)
    peak = {str(kind): value for kind, value in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return layouts, peak["_FSDPRefType.OPT"], sum(v.numel() * v.element_size() for v in local)


def _fake_dtensor_steps(rank, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        for name in MAKERS:
            real, _, _ = _fsdp_layouts(name, mesh, fake=False)
            with FakeTensorMode():
                fake, peak, state_bytes = _fsdp_layouts(name, mesh, fake=True)
            results[name] = (real, fake, peak, state_bytes)
    finally:
        dist.destroy_process_group()


def test_fake_dtensor_params_of_fsdp2_get_the_states_a_real_step_makes():
    """FSDP2's memory estimator (torch.distributed._tools' FSDPMemTracker) runs a
    step of fake DTensor params over a fake process group: every class makes the
    states a real step of the same sharded params makes (DTensors placed like the
    param, FP8 codes and absmax for the 8-bit classes' wide rows, float32 masters),
    and the tracker's optimizer-state peak is their local bytes."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker")
    import torch.multiprocessing as mp

    with mp.Manager() as manager:  # (a process of its own: the default process group is global)
        results = manager.dict()
        mp.spawn(_fake_dtensor_steps, args=(results,), nprocs=1, join=True)
        results = dict(results)
    assert set(results) == set(MAKERS)
    for name, (real, fake, peak, state_bytes) in results.items():
        assert fake == real, name
        assert any(kind == "DTensor" for st in real for kind, *_ in st.values()), name
        assert state_bytes > 0 and peak == state_bytes, name
    for name in ("AdamW8bit", "Lion8bit", "Amos8bit"):  # (the 1024-wide rows keep FP8 codes)
        assert any(layout[1] == torch.uint8 for st in results[name][1] for layout in st.values()), name
