"""master_weights=True: a bfloat16 / float16 param is stepped as its float32 master
(state 'master_param', float32 states), and written as the master rounded to
nearest.  Held to: the float32 step of a float32 param with the same (upcast)
grads, bitwise, on every optimizer and backend; the same-pass CPU kernels and
the second-pass copy agree bitwise; checkpoints, the toggling of the flag, bad
input (nothing written) and the point of it all (tiny updates accumulate)."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import amos_fused as af
from amos_fused.master_weights import MASTER_KEY
from registry import AMOS_REDUCE_AXES, CASES, CLASS_CASES, FP8_CLASS_CASES, Case, amos_case, seeded_params, seeded_grads

LOW = [torch.bfloat16, torch.float16]
SHAPES = [(37, 70), (5001,), (3, 4, 5, 6), (), (0, 3), (2, 9000)]
BACKENDS = ["reference", "cpu"]


def _run(case, backend, dtype, steps=3, shapes=SHAPES, **extra):
    """(optimizer, params) after ``steps`` steps of low-precision params with master weights."""
    params = seeded_params(shapes, dtype)
    opt = case.make(params, backend, master_weights=True, **extra)
    for step in range(steps):
        for p, g in zip(params, seeded_grads(params, step)):
            p.grad = g
        opt.step()
    return opt, params


def _run_float32(case, backend, dtype, steps=3, shapes=SHAPES):
    """The same run on float32 params that start from the low-precision values,
    with the low-precision grads upcast: what the masters must hold."""
    low = seeded_params(shapes, dtype)
    params = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt = case.make(params, backend)
    for step in range(steps):
        for p, g in zip(params, seeded_grads(low, step)):
            p.grad = g.float()
        opt.step()
    return opt, params


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def step_side_by_side(opt, ref, low, full, steps):
    """Steps ``opt`` (low-precision params ``low`` with masters) and ``ref`` (their
    float32 copies ``full``) with the same grads, upcast for ``ref``."""
    for step in range(steps):
        for p, q, g in zip(low, full, seeded_grads(low, step)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_master_steps_like_a_float32_param(name, dtype, backend):
    """Every optimizer: the masters (and every float32 state) are bitwise the float32
    run's params and states; each param is its master rounded to nearest."""
    case = CASES[CLASS_CASES[name]]
    opt, params = _run(case, backend, dtype)
    ref_opt, ref_params = _run_float32(case, backend, dtype)
    for p, q in zip(params, ref_params):
        state, ref_state = opt.state[p], ref_opt.state[q]
        master = state[MASTER_KEY]
        assert master.dtype == torch.float32 and master.stride() == p.stride()
        assert torch.equal(_bits(master), _bits(q)), f"{name}: master of {tuple(p.shape)}"
        assert torch.equal(_bits(p), _bits(master.to(dtype))), f"{name}: param is not its master rounded"
        assert set(state) == set(ref_state) | {MASTER_KEY}
        for key, value in ref_state.items():
            assert state[key].dtype == value.dtype, key
            assert torch.equal(_bits(state[key]), _bits(value)), f"{name}: state {key!r} of {tuple(p.shape)}"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["adamw", "adam-l2-amsgrad", "radam", "lion", "amos-all-momentum-clip",
                                  "amos-eta-momentum", "scaled-square-p", "lamb-plain"])
def test_same_pass_kernel_equals_the_copy_after(name, dtype, monkeypatch):
    """The CPU kernels that write the params in the same pass (master_algorithms)
    give bitwise what the second-pass copy gives, at 1, 2 and 3 threads."""
    case = CASES[name]
    assert case.cls.algorithm in af.contracts.master_algorithms()
    runs = []
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(_run(case, "cpu", dtype))
        finally:
            torch.set_num_threads(before)
    monkeypatch.setattr(af.optimizer_base, "writes_low_params", lambda *args: False)
    runs.append(_run(case, "cpu", dtype))
    (opt, params), others = runs[0], runs[1:]
    for other_opt, other_params in others:
        for p, q in zip(params, other_params):
            assert torch.equal(_bits(p), _bits(q))
            for key in opt.state[p]:
                assert torch.equal(_bits(opt.state[p][key]), _bits(other_opt.state[q][key])), key


def test_channels_last_and_transposed_params_keep_their_layout():
    conv = torch.randn(8, 6, 5, 5).to(torch.bfloat16).to(memory_format=torch.channels_last)
    params = [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(40, 30).bfloat16().t())]
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = af.AdamW(params, lr=1e-2, master_weights=True, backend="cpu")
    step_side_by_side(opt, af.AdamW(ref, lr=1e-2, backend="cpu"), params, ref, steps=2)
    for p, q in zip(params, ref):
        master = opt.state[p][MASTER_KEY]
        assert master.stride() == p.stride() and opt.state[p]["exp_avg"].stride() == p.stride()
        assert torch.equal(master, q.detach()) and torch.equal(p.detach(), master.bfloat16())


def test_float32_params_have_no_master():
    p = torch.nn.Parameter(torch.randn(10, 10))
    opt = af.AdamW([p], master_weights=True)
    p.grad = torch.randn(10, 10)
    opt.step()
    assert MASTER_KEY not in opt.state[p] and opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_updates_accumulate_in_the_master(backend):
    """The point of master weights: an update far below the param's bfloat16 ulp
    is lost by rounding every step, but accumulates in the master."""
    def final(master_weights):
        p = torch.nn.Parameter(torch.ones(5000, dtype=torch.bfloat16))
        opt = af.Lion([p], lr=1e-4, weight_decay=0.0, master_weights=master_weights, backend=backend)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().float()
    assert torch.equal(final(False), torch.ones(5000))          # 1 − 1e-4 rounds back to 1
    moved = final(True)                                          # 1 − 200·1e-4 = 0.98
    assert torch.allclose(moved, torch.full((5000,), 0.98), atol=4e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_is_bitwise(backend):
    case = CASES["adamw"]
    opt, params = _run(case, backend, torch.bfloat16, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    clone_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    clone = case.make(clone_params, backend, master_weights=True)
    clone.load_state_dict(saved)
    for p, q in zip(params, clone_params):
        for key, value in opt.state[p].items():
            assert clone.state[q][key].dtype == value.dtype and torch.equal(clone.state[q][key], value), key
    for step in range(2, 4):
        for group in (params, clone_params):
            for p, g in zip(group, seeded_grads(group, step)):
                p.grad = g
        opt.step()
        clone.step()
    for p, q in zip(params, clone_params):
        assert torch.equal(_bits(p), _bits(q))
        assert torch.equal(opt.state[p][MASTER_KEY], clone.state[q][MASTER_KEY])


def test_torch_checkpoint_of_bfloat16_params_gets_a_master():
    """A torch.optim.AdamW checkpoint (bfloat16 states, no master) loads; the next step
    makes the master from the param and the states float32."""
    params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    for p, g in zip(params, seeded_grads(params, 0)):
        p.grad = g
    torch_opt.step()
    opt = af.AdamW(params, lr=1e-2, master_weights=True)
    opt.load_state_dict(torch_opt.state_dict())
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    expected = {p: {k: v.float() for k, v in torch_opt.state[p].items() if k != "step"} for p in params}
    starts = [p.detach().float() for p in params]
    for p, g in zip(params, seeded_grads(params, 1)):
        p.grad = g
    opt.step()
    ref = [torch.nn.Parameter(s) for s in starts]
    ref_opt = af.AdamW(ref, lr=1e-2)
    for p, q in zip(params, ref):
        ref_opt.state[q].update(step=torch.tensor(1.0), **expected[p])
        q.grad = p.grad.float()
    ref_opt.step()
    for p, q in zip(params, ref):
        assert opt.state[p][MASTER_KEY].dtype == torch.float32
        assert torch.equal(opt.state[p][MASTER_KEY], q.detach())
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


def test_master_checkpoint_into_an_optimizer_without_masters():
    opt, params = _run(CASES["adamw"], "cpu", torch.bfloat16, steps=2)
    plain = af.AdamW(params, lr=1e-2, weight_decay=0.1)
    state_dict = opt.state_dict()
    for group in state_dict["param_groups"]:
        group["master_weights"] = False
    plain.load_state_dict(state_dict)
    for p in params:
        assert MASTER_KEY not in plain.state[p]
        assert plain.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(plain.state[p]["exp_avg"], opt.state[p]["exp_avg"].bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
def test_toggling_master_weights_between_steps(backend):
    """param_groups[i]['master_weights'] edited between steps, like any torch.optim
    group setting: on → master from the param, states upcast; off → states rounded,
    master dropped; each step then is that of the new setting."""
    params = seeded_params([(30, 40), (6000,)], torch.bfloat16)
    opt = af.AdamW(params, lr=1e-2, backend=backend)
    for step in range(4):
        on = step in (1, 2)
        opt.param_groups[0]["master_weights"] = on
        before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
        starts = [p.detach().clone() for p in params]
        grads = seeded_grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, start, g in zip(params, starts, grads):
            state = opt.state[p]
            assert (MASTER_KEY in state) == on
            assert state["exp_avg"].dtype == (torch.float32 if on else torch.bfloat16)
            # replay the step on float32 (on) or bfloat16 (off) copies
            kind = torch.float32 if on else torch.bfloat16
            origin = before[p].get(MASTER_KEY, start) if on else start
            q = torch.nn.Parameter(origin.to(kind).clone())
            replay = af.AdamW([q], lr=1e-2, backend=backend)
            if before[p]:
                replay.state[q].update({k: v.to(kind) if k != "step" else v
                                        for k, v in before[p].items() if k != MASTER_KEY})
            q.grad = g.to(kind)
            replay.step()
            assert torch.equal(p.detach(), q.detach().to(torch.bfloat16)), f"step {step}"


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def _assert_unchanged(opt, params, snap):
    values, states = snap
    for p, v in zip(params, values):
        assert torch.equal(_bits(p), _bits(v))
    for p in params:
        if id(p) in states:
            assert set(opt.state[p]) == set(states[id(p)])
            for k, v in states[id(p)].items():
                same = torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v
                assert same, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_master_is_refused_before_any_write(backend):
    opt, params = _run(CASES["adamw"], backend, torch.bfloat16, steps=1, shapes=[(30, 40), (5000,)])
    for bad in (torch.zeros(30, 40, dtype=torch.float64), torch.zeros(40, 30).t(), torch.zeros(30, 41), 1.5):
        opt.state[params[0]][MASTER_KEY] = bad
        for p, g in zip(params, seeded_grads(params, 5)):
            p.grad = g
        snap = _snapshot(opt, params)
        with pytest.raises(ValueError, match="master_param"):
            opt.step()
        _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_grad_is_refused_before_any_write(backend):
    opt, params = _run(CASES["adamw"], backend, torch.bfloat16, steps=1, shapes=[(30, 40), (5000,)])
    for p, g in zip(params, seeded_grads(params, 5)):
        p.grad = g
    params[1].grad_dtype = None  # let torch accept a grad of another dtype
    params[1].grad = params[1].grad.float()  # a float32 grad of a bfloat16 param
    snap = _snapshot(opt, params)
    with pytest.raises((TypeError, ValueError), match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_flags_are_checked():
    p = torch.nn.Parameter(torch.randn(3).bfloat16())
    with pytest.raises(ValueError, match="master_weights"):
        af.AdamW([p], master_weights=1)
    with pytest.raises(ValueError, match="exclude each other"):
        af.AdamW([p], master_weights=True, bf16_stochastic_round=True)


def test_step_op_checks_low_params():
    """The op itself: low_params must match the masters, only for the algorithms of
    master_algorithms() (on CPU: all), and not with stochastic rounding."""
    ops = torch.ops.amos_fused
    master = torch.randn(4096)
    low = master.bfloat16()
    grad = torch.randn(4096).bfloat16()
    m, v, step = torch.zeros(4096), torch.zeros(4096), torch.tensor(0.0)
    hyper = af.contracts.hyper_values("adam", dict(lr=1e-3, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.999, eps=1e-8,
                                                   weight_decay=0.0, decoupled=True, amsgrad=False,
                                                   bias_correction=True))
    with pytest.raises(ValueError, match="low_params"):
        ops.step("adam", [master], [grad], [m, v], [step], hyper, [], low_params=[low[:100]])
    with pytest.raises(ValueError, match="low_params"):
        ops.step("adam", [master], [grad], [m, v], [step], hyper, [], round_keys=[1], low_params=[low])
    with pytest.raises(ValueError, match="1 params but 0 low_params"):
        ops.step("adam", [master], [grad], [m, v], [step], hyper, [], low_params=[])
    with pytest.raises((TypeError, ValueError), match="grads"):
        ops.step("adam", [master], [grad.float()], [m, v], [step], hyper, [], low_params=[low])
    assert torch.equal(m, torch.zeros(4096)) and float(step) == 0.0
    ops.step("adam", [master], [grad], [m, v], [step], hyper, [], low_params=[low])
    assert torch.equal(low, master.bfloat16()) and float(step) == 1.0
    assert set(af.contracts.master_algorithms()) == set(af.contracts.algorithms())  # every CPU kernel
    # the FP8 op takes them too
    codes, absmax = [torch.zeros(4096, dtype=torch.uint8)] * 2, [torch.zeros(16)] * 2
    with pytest.raises(ValueError, match="low_params"):
        ops.step_fp8("adam", [master], [grad], codes, absmax, [step], hyper, low_params=[low[:100]])
    ops.step_fp8("adam", [master], [grad], [c.clone() for c in codes], [a.clone() for a in absmax], [step], hyper,
                 low_params=[low])
    assert torch.equal(low, master.bfloat16()) and float(step) == 2.0


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.sampled_from([(), (1,), (7,), (33, 5), (4, 1, 9), (4097,), (0, 2)]), min_size=1, max_size=4),
       dtype=st.sampled_from(LOW),
       name=st.sampled_from(["adamw", "adam-l2-amsgrad", "radam", "lion", "amos-eta-momentum", "amos-clip"]),
       threads=st.sampled_from([1, 2]), missing=st.sets(st.integers(0, 3), max_size=2),
       maximize=st.booleans())
def test_property_same_pass_kernels_equal_the_float32_step(shapes, dtype, name, threads, missing, maximize):
    """Any shapes, dtype, thread count, params without a grad and maximize: the CPU
    same-pass step's masters are bitwise the float32 step of float32 params, and a
    param without a grad is not touched (no master, no state)."""
    case = CASES[name]
    low = seeded_params(shapes, dtype)
    full = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt = case.make(low, "cpu", master_weights=True, maximize=maximize)
    ref = case.make(full, "cpu", maximize=maximize)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(2):
            for i, (p, q, g) in enumerate(zip(low, full, seeded_grads(low, step))):
                p.grad, q.grad = (None, None) if i in missing else (g, g.float())
            opt.step()
            ref.step()
    finally:
        torch.set_num_threads(before)
    for i, (p, q) in enumerate(zip(low, full)):
        if i in missing:
            assert p not in opt.state or not opt.state[p]
            continue
        assert torch.equal(_bits(opt.state[p][MASTER_KEY]), _bits(q))
        assert torch.equal(_bits(p), _bits(q.detach().to(dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion", "amos-eta-momentum"])
def test_grad_scaler_skips_and_unscales(name, backend):
    """torch.amp.GradScaler on bfloat16 params with masters: a step whose grads hold
    an inf changes nothing (params, masters, states, step counters); the others
    equal the optimizer fed the unscaled grads (a power-of-two scale: exact)."""
    case = CASES[name]
    params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
    plain_params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
    opt = case.make(params, backend, master_weights=True)
    plain = case.make(plain_params, backend, master_weights=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)
    for step in range(4):
        grads = seeded_grads(params, step)
        if step == 2:
            grads[1][17] = float("inf")
        for p in params:
            p.grad = None
        loss = sum((p * g).float().sum() for p, g in zip(params, grads))
        scaler.scale(loss).backward()
        snap = _snapshot(opt, params)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            _assert_unchanged(opt, params, snap)
            continue
        for p, g in zip(plain_params, grads):
            p.grad = g
        plain.step()
        for p, q in zip(params, plain_params):
            assert torch.equal(_bits(p), _bits(q))
            for key, value in plain.state[q].items():
                assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("config", ["plain", "everything"])
@pytest.mark.parametrize("layout", sorted(AMOS_REDUCE_AXES))
def test_amos_same_pass_every_layout(layout, config):
    """Amos on the CPU kernels with master weights, every slot layout (elementwise,
    rows reduced in cache, general layouts in two passes) and configuration: the
    masters, slots and momentum bitwise those of float32 params."""
    case = amos_case(AMOS_REDUCE_AXES[layout], config)
    shapes = [(6, 10, 7), (4, 33, 5), (2, 9, 300)]
    opt, params = _run(case, "cpu", torch.bfloat16, steps=3, shapes=shapes)
    ref_opt, ref_params = _run_float32(case, "cpu", torch.bfloat16, steps=3, shapes=shapes)
    for p, q in zip(params, ref_params):
        assert torch.equal(_bits(opt.state[p][MASTER_KEY]), _bits(q)), f"{layout} {config}: {tuple(p.shape)}"
        assert torch.equal(_bits(p), _bits(q.detach().bfloat16()))
        for key, value in ref_opt.state[q].items():
            assert torch.equal(_bits(opt.state[p][key]), _bits(value)), f"{layout} {config}: state {key!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["no_grad-copy_", "replaced-data", "init"])
def test_param_written_between_steps_restarts_its_master(how, backend):
    """Like torch.optim, a step starts from the param's value when the user wrote it
    between steps (in place through autograd, p.data replaced, torch.nn.init): its
    master is remade from it; the other params keep theirs."""
    params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
    opt = af.AdamW(params, lr=1e-2, master_weights=True, backend=backend)
    for step in range(2):
        for p, g in zip(params, seeded_grads(params, step)):
            p.grad = g
        opt.step()
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    new = torch.full((30, 40), 0.5, dtype=torch.bfloat16)
    if how == "no_grad-copy_":
        with torch.no_grad():
            params[0].copy_(new)
    elif how == "replaced-data":
        params[0].data = new.clone()
    else:
        torch.nn.init.constant_(params[0], 0.5)
    grads = seeded_grads(params, 2)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    # replay on float32 params: the edited one from its new value, the other from its master
    for i, start in enumerate([new.float(), before[1][MASTER_KEY]]):
        q = torch.nn.Parameter(start.clone())
        replay = af.AdamW([q], lr=1e-2, backend=backend)
        replay.state[q].update({k: v for k, v in before[i].items() if k != MASTER_KEY})
        q.grad = grads[i].float()
        replay.step()
        assert torch.equal(opt.state[params[i]][MASTER_KEY], q.detach()), f"param {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_through_p_data_in_place_is_not_seen(backend):
    """p.data.copy_(…) bypasses the param's version counter: the master is kept (the
    documented limit), and the step writes the param from it."""
    params = seeded_params([(30, 40)], torch.bfloat16)
    opt = af.AdamW(params, lr=1e-2, master_weights=True, backend=backend)
    params[0].grad = seeded_grads(params, 0)[0]
    opt.step()
    master = opt.state[params[0]][MASTER_KEY].clone()
    params[0].data.copy_(torch.full((30, 40), 0.5, dtype=torch.bfloat16))
    opt.param_groups[0]["lr"] = 0.0
    params[0].grad = torch.zeros_like(params[0])
    opt.step()
    assert torch.equal(opt.state[params[0]][MASTER_KEY], master)
    assert torch.equal(params[0].detach(), master.bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["no_grad-copy_", "replaced-data"])
def test_a_write_before_a_step_that_raises_is_seen_by_the_next_step(how, backend):
    """A step that raises changes nothing, the masters' marks included: the param
    written before it still restarts its master at the next step that runs."""
    a, b = seeded_params([(100,)], torch.bfloat16)[0], torch.nn.Parameter(torch.randn(7))
    opt = af.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-3, master_weights=True, backend=backend)
    a.grad, b.grad = seeded_grads([a], 0)[0], torch.randn(7)
    opt.step()
    new = torch.full((100,), 0.333, dtype=torch.bfloat16)
    if how == "no_grad-copy_":
        with torch.no_grad():
            a.copy_(new)
    else:
        a.data = new.clone()
    master = opt.state[a][MASTER_KEY].clone()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]: Invalid learning rate: -1.0"):
        opt.step()
    assert torch.equal(opt.state[a][MASTER_KEY], master) and torch.equal(a.detach(), new)
    opt.param_groups[1]["lr"], opt.param_groups[0]["lr"] = 1e-3, 0.0
    a.grad = torch.zeros_like(a)
    opt.step()
    assert torch.equal(opt.state[a][MASTER_KEY], new.float())


def test_deepcopy_and_pickle_keep_working():
    """An optimizer copied (copy.deepcopy, pickle) steps, with telemetry and masters."""
    import pickle
    p = torch.nn.Parameter(torch.randn(30, 40).bfloat16())
    opt = af.AdamW([p], lr=1e-2, master_weights=True, track_rms=True)
    p.grad = torch.randn(30, 40).bfloat16()
    opt.step()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = twin.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        twin.step()
        assert torch.equal(q.detach(), twin.state[q][MASTER_KEY].bfloat16())
        assert twin.rms()[q].weight > 0


FP8_CASES = {"AdamW8bit": Case(af.AdamW8bit, dict(lr=1e-2, weight_decay=0.1)),
             "RAdam8bit": Case(af.RAdam8bit, dict(lr=1e-2, weight_decay=0.1)),
             "Lion8bit": Case(af.Lion8bit, dict(lr=1e-2, weight_decay=0.1))}
FP8_SHAPES = [(64, 70), (5000,), (10,)]  # FP8 states, a partial last block; a small param (float32 states)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(FP8_CASES))
def test_8bit_master_steps_like_a_float32_param(name, dtype, backend, monkeypatch):
    """The 8-bit optimizers with master weights: masters, codes and absmax bitwise
    those of float32 params; on cpu the FP8 kernel writes the params in the same
    pass, bitwise what the copy after gives."""
    case = FP8_CASES[name]
    opt, params = _run(case, backend, dtype, steps=7, shapes=FP8_SHAPES)
    ref_opt, ref_params = _run_float32(case, backend, dtype, steps=7, shapes=FP8_SHAPES)
    monkeypatch.setattr(af.optimizer_base, "writes_low_params", lambda *args: False)
    copy_opt, copy_params = _run(case, backend, dtype, steps=7, shapes=FP8_SHAPES)
    for p, q, r in zip(params, ref_params, copy_params):
        assert torch.equal(_bits(opt.state[p][MASTER_KEY]), _bits(q)), f"{name}: master of {tuple(p.shape)}"
        assert torch.equal(_bits(p), _bits(q.detach().to(dtype))) and torch.equal(_bits(p), _bits(r))
        assert (opt.state[p]["exp_avg"].dtype == torch.uint8) == (p.numel() >= 4096)
        for key, value in ref_opt.state[q].items():
            assert torch.equal(_bits(opt.state[p][key]), _bits(value)), f"{name}: state {key!r}"
            assert torch.equal(_bits(copy_opt.state[r][key]), _bits(value)), f"{name}: state {key!r} (copy after)"


@pytest.mark.parametrize("name", ["adamw", "lion", "amos-eta-momentum", "lamb-plain"])
def test_non_finite_grads_agree_on_every_backend(name):
    """A NaN and an Inf grad element with master weights: the cpu kernels and the
    reference give the same masters and params (NaN and ±Inf where the other has
    them, close elsewhere; Lion's sign of a NaN momentum is 0 on both)."""
    runs = []
    for backend in BACKENDS:
        params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
        opt = CASES[name].make(params, backend, master_weights=True)
        for step in range(2):
            grads = seeded_grads(params, step)
            grads[0][3, 7], grads[1][100] = float("nan"), float("inf")
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for p, q in zip(pa, pb):
        for x, y in ((p.detach(), q.detach()), (oa.state[p][MASTER_KEY], ob.state[q][MASTER_KEY])):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_replaced_by_a_new_storage_at_the_same_address_remakes_its_master(backend):
    """``p.data = t`` whose new storage lies where the marked one did (an allocator
    reusing a freed block does so): the param is still seen as replaced, and the
    step starts from its new values, not from the master."""
    np = pytest.importorskip("numpy")
    values = np.ones(4096, dtype=np.float16)
    p = torch.nn.Parameter(torch.from_numpy(values))
    opt = af.AdamW([p], lr=0.1, weight_decay=0.0, master_weights=True, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    values[:] = 5.0
    p.data = torch.from_numpy(values)  # another storage, the same address
    assert p.data_ptr() == values.ctypes.data
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, 5.0))


def _strided_and_dense(view: str):
    """A bfloat16 param that is a non-dense view of a buffer (every other element,
    or every other column), and a dense copy of it."""
    values = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    if view == "columns":
        strided = torch.zeros(64, 256, dtype=torch.bfloat16)[:, ::2]
    else:
        values = values.reshape(-1)
        strided = torch.zeros(2 * values.numel(), dtype=torch.bfloat16)[::2]
    strided.copy_(values)
    assert not strided.is_contiguous() and strided.numel() >= 4096
    return torch.nn.Parameter(strided), torch.nn.Parameter(values.clone())


@pytest.mark.parametrize("name", sorted(FP8_CLASS_CASES))
@pytest.mark.parametrize("view", ["every_other", "columns"])
def test_toggling_master_weights_of_a_strided_param_relays_its_8bit_states(name, view):
    """The reference steps a non-dense param; its float32 master is dense.  Its FP8
    codes follow the tensor the step writes, so turning ``master_weights`` on or off
    between steps relays them (their blocks are the same: the same memory order):
    the run equals, bitwise, that of a dense copy of the param."""
    strided, dense = _strided_and_dense(view)
    case = FP8_CLASS_CASES[name]
    opts = [case.make([p], "reference") for p in (strided, dense)]
    for step, on in enumerate([False, True, True, False, False, True, False]):
        grad = torch.randn(dense.shape, generator=torch.Generator().manual_seed(step)).bfloat16()
        for opt, p in zip(opts, (strided, dense)):
            opt.param_groups[0]["master_weights"] = on
            p.grad = grad.clone()
            opt.step()
        assert torch.equal(_bits(strided.contiguous()), _bits(dense)), f"step {step}"
        mine, twin = opts[0].state[strided], opts[1].state[dense]
        assert sorted(mine) == sorted(twin) and (MASTER_KEY in mine) == on
        for key, value in twin.items():
            assert torch.equal(mine[key], value), f"step {step}: {key}"
            if value.dtype == torch.uint8:  # codes in the layout of the tensor the step writes
                assert mine[key].stride() == (mine[MASTER_KEY] if on else strided).stride(), f"step {step}: {key}"


def _checkpoint_of(cls, make_param):
    """A checkpoint of ``cls`` (two groups of one float32 param each) after one
    step, without the ``master_weights`` setting (as torch.optim's checkpoints)."""
    params = [make_param(torch.float32), _dense_param(torch.float32)]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2, backend="reference")
    for p in params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    for group in state_dict["param_groups"]:  # as torch.optim's: the loading group's setting holds
        del group["master_weights"]
    return state_dict


def _dense_param(dtype):
    return torch.nn.Parameter(torch.randn(64, 128, generator=torch.Generator().manual_seed(9)).to(dtype))


def _strided_param(dtype):
    base = torch.zeros(64, 256, dtype=dtype)
    view = base[:, ::2]
    view.copy_(torch.randn(64, 128, generator=torch.Generator().manual_seed(9)))
    return torch.nn.Parameter(view)


@pytest.mark.parametrize("cls,make_param,backend", [
    (cls, make_param, backend)
    for cls, make_param in [(af.AdamW, _dense_param), (af.Lion, _dense_param), (af.AdamW8bit, _dense_param),
                            (af.AdamW8bit, _strided_param), (af.Amos8bit, _strided_param)]
    for backend in BACKENDS if backend == "reference" or make_param is _dense_param])  # (cpu: dense params)
def test_masters_turned_off_before_the_first_step_after_a_load(cls, make_param, backend):
    """A checkpoint loaded into a master group keeps float32 states (and FP8 codes in
    the master's layout) for the master its next step makes.  Turned off before that
    step (or left waiting by a param without a grad), the states come to the param's
    dtype and layout then, as when a master is dropped: the run equals loading into a
    group without masters."""
    state_dict = _checkpoint_of(cls, make_param)
    runs = []
    for master_at_load in (True, False):
        params = [make_param(torch.bfloat16), _dense_param(torch.bfloat16)]
        opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2, backend=backend,
                  master_weights=master_at_load)
        opt.load_state_dict(state_dict)
        for step in range(3):
            opt.param_groups[0]["master_weights"] = False  # before any master was made
            opt.param_groups[1]["master_weights"] = master_at_load and step == 0
            params[0].grad = torch.randn(64, 128, generator=torch.Generator().manual_seed(10 + step)).bfloat16()
            params[1].grad = None if step == 0 else params[0].grad.clone()  # no master made at step 0
            opt.step()
        runs.append((params, opt))
    (with_master, opt_a), (without, opt_b) = runs
    for a, b in zip(with_master, without):
        assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))
        assert MASTER_KEY not in opt_a.state[a]
        for key, value in opt_b.state[b].items():
            assert opt_a.state[a][key].dtype == value.dtype and torch.equal(opt_a.state[a][key], value), key


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_param_swapped_for_another_view_of_its_storage_gets_its_master_remade(backend):
    """p.data = p.data.t() keeps the storage, address and version: the master is
    remade from the swapped param (as for any param replaced between steps) and the
    step runs as for a fresh optimizer's param of that layout, not refused."""
    p = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    opt = af.AdamW([p], lr=1e-2, master_weights=True, backend=backend)
    p.grad = torch.randn(8, 8).bfloat16()
    opt.step()
    p.data = p.data.t()
    p.grad = torch.randn(8, 8).bfloat16()
    opt.step()
    assert opt.state[p][MASTER_KEY].shape == p.shape and opt.state[p][MASTER_KEY].stride() == p.stride()
    assert torch.equal(opt.state[p][MASTER_KEY].bfloat16(), p.detach())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masters_resume_through_set_state_dict_which_loads_the_model_last(backend):
    """torch.distributed.checkpoint's set_state_dict loads the optimizer, then the
    model: the params are rewritten with the values their masters round to, which
    keeps the masters (a write of other values would remake them)."""
    import copy as copy_module
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 32).to(torch.bfloat16)
        return model, af.AdamW(model.parameters(), lr=1e-4, master_weights=True, backend=backend)

    def train(model, opt, first, last):
        for step in range(first, last):
            g = torch.Generator().manual_seed(step)
            opt.zero_grad()
            model(torch.randn(8, 64, generator=g).bfloat16()).float().square().mean().backward()
            opt.step()

    model, opt = make()
    train(model, opt, 0, 3)
    saved = copy_module.deepcopy(get_state_dict(model, opt))
    ref, ref_opt = make()
    train(ref, ref_opt, 0, 6)
    resumed, resumed_opt = make()
    set_state_dict(resumed, resumed_opt, model_state_dict=saved[0], optim_state_dict=saved[1])
    train(resumed, resumed_opt, 3, 6)
    for p, q in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(p, q) and torch.equal(resumed_opt.state[p][MASTER_KEY], ref_opt.state[q][MASTER_KEY])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masters_of_a_model_moved_to_channels_last_are_remade_in_its_layout(backend):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 8, 3).to(torch.bfloat16)
    opt = af.AdamW(model.parameters(), lr=1e-3, master_weights=True, backend=backend)
    model(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    model.to(memory_format=torch.channels_last)
    opt.step()
    master = opt.state[model.weight][MASTER_KEY]
    assert master.stride() == model.weight.stride() and torch.equal(master.bfloat16(), model.weight.detach())


def test_a_strided_params_master_is_kept_across_a_write_of_its_own_values():
    """The master of a non-dense param is dense (master_strides): a write that leaves
    the param what its master rounds to keeps the master's extra bits all the same."""
    base = torch.randn(4, 8, dtype=torch.bfloat16)
    p = torch.nn.Parameter(base[:, :4])
    opt = af.AdamW([p], lr=1e-3, master_weights=True, backend="reference")
    for seed in range(3):
        p.grad = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)).bfloat16()
        opt.step()
    before = opt.state[p][MASTER_KEY].clone()
    assert not torch.equal(before.bfloat16().float(), before)
    with torch.no_grad():
        p.copy_(p.detach().clone())
    p.grad = torch.zeros(4, 4, dtype=torch.bfloat16)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert torch.equal(opt.state[p][MASTER_KEY], before)


def _skipped_step(opt, params):
    """A step as GradScaler hands one whose grads held an inf: found_inf set."""
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


SKIP_EDITS = ["param-written", "first-step-then-written", "masters-turned-off", "masters-turned-on"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", SKIP_EDITS)
@pytest.mark.parametrize("cls", [af.AdamW, af.AdamW8bit, af.Lion], ids=lambda c: c.__name__)
def test_a_skipped_step_replaces_no_state_and_the_next_step_makes_the_changes(cls, edit, backend):
    """A step that GradScaler's found_inf skips leaves every state entry as it was
    (the same tensors: no master remade from a param written since the last step,
    no master dropped and states rounded when masters were turned off, no master
    made when they were turned on, beside FP8 codes too); the next
    step that runs makes those changes, so the run equals one without the skipped
    step.  A first step's fresh state is made, as torch.optim makes it."""
    runs = []
    for skip in (False, True):
        params = seeded_params([(30, 40), (5000,)], torch.bfloat16)
        opt = cls(params, lr=1e-2, master_weights=edit != "masters-turned-on", backend=backend)
        if edit == "first-step-then-written":
            if skip:
                _skipped_step(opt, params)
                assert all(MASTER_KEY in opt.state[p] and float(opt.state[p]["step"]) == 0 for p in params)
        else:
            for p, g in zip(params, seeded_grads(params, 0)):
                p.grad = g
            opt.step()
        if edit.startswith("masters-turned"):
            opt.param_groups[0]["master_weights"] = edit == "masters-turned-on"
        else:
            with torch.no_grad():
                params[0].mul_(0.5)
        if skip and edit != "first-step-then-written":
            held = {id(p): dict(opt.state[p]) for p in params}
            snap = _snapshot(opt, params)
            _skipped_step(opt, params)
            _assert_unchanged(opt, params, snap)
            assert all(set(opt.state[p]) == set(held[id(p)]) for p in params)
            assert all(opt.state[p][k] is v for p in params for k, v in held[id(p)].items())
        for p, g in zip(params, seeded_grads(params, 1)):
            p.grad = g
        opt.step()
        runs.append((params, opt))
    (params, opt), (skipped_params, skipped_opt) = runs
    for p, q in zip(params, skipped_params):
        assert torch.equal(_bits(p), _bits(q))
        assert set(opt.state[p]) == set(skipped_opt.state[q])
        for key, value in opt.state[p].items():
            assert torch.equal(skipped_opt.state[q][key], value), key


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_expanded_low_precision_param_is_refused_before_its_group_is_written(backend, dtype):
    """With master weights the step writes float32 masters, then copies them into the
    low-precision params: a param whose elements share memory (an expanded view) is
    refused by name before anything is written, as without masters, not by torch's
    copy after the other params, masters, moments and counters were written."""
    good = torch.randn(4, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(True)
    opt = af.AdamW([good], lr=0.1, master_weights=True, backend=backend)
    good.grad = torch.ones(4, dtype=dtype)
    opt.step()
    bad = torch.randn(1, 3, generator=torch.Generator().manual_seed(1)).to(dtype).expand(2, 3).requires_grad_(True)
    opt.param_groups[0]["params"].append(bad)
    good.grad, bad.grad = torch.ones(4, dtype=dtype), torch.ones(2, 3, dtype=dtype)
    before = (good.detach().clone(), {k: v.clone() for k, v in opt.state[good].items()})
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] .*(share memory|needs params)"):
        opt.step()
    assert torch.equal(good.detach(), before[0])
    assert all(torch.equal(v, opt.state[good][k]) for k, v in before[1].items())
    assert bad not in opt.state
