"""torch.compile: the step op has a fake kernel (traceable, schema-checked by
torch.library.opcheck); a compiled ``opt.step`` with an lr scheduler never
recompiles (the step runs eagerly as one opaque call) and equals eager bitwise;
a compiled train step (forward, backward, step) equals eager."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import amos_fused as af
from amos_fused.contracts import step_arguments


def _lists(n=2):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,)][:n]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    zeros = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    steps = [torch.tensor(0.0) for _ in shapes]
    return params, grads, zeros, steps


ADAMW = dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
             amsgrad=False, bias_correction=True)

# algorithm → (state lists by key, hyper-parameters, per-tensor values) for two params
_OP_CASES = {
    "adam": (("exp_avg", "exp_avg_sq"), ADAMW, []),
    "radam": (("exp_avg", "exp_avg_sq"), dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                              decoupled=False, rectify_threshold=5.0), []),
    "lion": (("exp_avg",), dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1), []),
    "amos": (("v", "b"), dict(lr=0.01, beta=0.999, momentum=0.0, clip_value=0.0, extra_l2=0.0, d_coef=0.25,
                              c_coef=0.25, epsilon=2.0**-125, use_momentum=False, clip=False), [0.5, 0.5]),
    "scaled_adam": (("exp_avg", "exp_avg_sq"), dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, p=0.0,
                                                    inverse_time=False, q=1.0), [1.0, 1.0]),
    "lamb": (("exp_avg", "exp_avg_sq"), dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                                             bias_correction=True), []),
}


def _op_args(algorithm):
    params, grads, zeros, steps = _lists()
    keys, hyper, per_tensor = _OP_CASES[algorithm]
    if algorithm == "amos":
        state = {k: [torch.zeros(5, 1), torch.zeros(())] for k in keys}
    else:
        state = {k: zeros() for k in keys}
    states, values = step_arguments(algorithm, hyper, state)
    return (algorithm, params, grads, states, steps, values, per_tensor)


@pytest.mark.parametrize("algorithm", list(_OP_CASES))
def test_step_op_passes_opcheck(algorithm):
    torch.library.opcheck(torch.ops.amos_fused.step.default, _op_args(algorithm),
                          test_utils=("test_schema", "test_faketensor"))


def test_step_op_traced_in_a_full_graph():
    params, grads, zeros, steps = _lists()
    exp_avgs, exp_avg_sqs = zeros(), zeros()
    eager = [p.clone() for p in params]
    states, hyper = step_arguments("adam", ADAMW, {"exp_avg": zeros(), "exp_avg_sq": zeros()})
    torch.ops.amos_fused.step("adam", eager, grads, states, [torch.tensor(0.0) for _ in steps], hyper, [])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def traced(params, grads, states, steps):
        torch.ops.amos_fused.step("adam", params, grads, states, steps, hyper, [])

    traced(params, grads, exp_avgs + exp_avg_sqs, steps)
    for p, q in zip(params, eager):
        assert torch.equal(p, q)


OPTIMIZERS = {
    "AdamW": lambda ps: af.AdamW(ps, lr=0.01, weight_decay=0.1),
    "Lion": lambda ps: af.Lion(ps, lr=1e-3),
    "Amos": lambda ps: af.Amos(ps, lr=0.01, eta=0.5, reduce_axes="all"),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_with_scheduler_does_not_recompile(name):
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS[name](list(model.parameters()))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        counter = torch._dynamo.testing.CompileCounter()
        step = torch.compile(opt.step, backend=counter) if compiled else opt.step
        for i in range(20):
            x, y = _batch(i)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
            sched.step()
        if compiled:
            assert counter.frame_count == 0  # (the step runs eagerly: nothing to compile, so no recompile)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_train_step_matches_eager(name, backend):
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS[name](list(model.parameters()))

        def train_step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        run = torch.compile(train_step, backend=backend) if compiled else train_step
        for i in range(5):
            run(*_batch(i))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        if backend == "aot_eager":
            assert torch.equal(a, b)
        else:  # inductor may fuse the forward/backward differently
            torch.testing.assert_close(a, b)


def _step_graph_breaks(make_opt):
    """Graph breaks that Dynamo reports at the optimizer step of a compiled train step
    (backward's and zero_grad's own breaks, the same for every optimizer, left out)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    opt = make_opt(list(model.parameters()))

    def train_step(x, y):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    run = torch.compile(train_step, backend="aot_eager")
    for i in range(3):
        opt.zero_grad()
        run(*_batch(i))
    return sum(count for reason, count in counters["graph_break"].items()
               if "backward" not in reason and "zero_grad" not in reason)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_train_step_breaks_as_often_as_torch_optim(name):
    """torch.optim's own step breaks the graph around itself (torch/optim/optimizer.py:
    two ``torch._dynamo.graph_break()`` calls); ours is one opaque call, which breaks it
    in the same places and no more often."""
    torch_breaks = _step_graph_breaks(lambda params: torch.optim.AdamW(params, lr=0.01))
    ours = _step_graph_breaks(OPTIMIZERS[name])
    assert torch_breaks >= 1  # the comparison is against a real count
    assert ours == torch_breaks, (ours, torch_breaks)


def test_a_direct_call_of_the_step_op_with_found_inf_traces():
    from amos_fused.contracts import step_arguments
    hyper = dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 decoupled=True, amsgrad=False,
                 bias_correction=True)
    params = [torch.randn(5, 3), torch.randn(4)]
    grads = [torch.randn_like(p) for p in params]
    states, values = step_arguments("adam", hyper, {"exp_avg": [torch.zeros_like(p) for p in params],
                                                    "exp_avg_sq": [torch.zeros_like(p) for p in params]})
    steps = [torch.tensor(0.0) for _ in params]
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def traced(params, grads, states, steps, grad_scale, found_inf):
        torch.ops.amos_fused.step("adam", params, grads, states, steps, values, [], grad_scale, found_inf)

    before = [p.clone() for p in params]
    traced(params, grads, states, steps, torch.tensor(2.0), torch.tensor(0.0))
    assert all(not torch.equal(p, b) for p, b in zip(params, before)) and all(s == 1 for s in steps)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_compiled_train_step_writing_the_lr_into_param_groups_matches_eager(name):
    """A learning-rate warmup written into ``opt.param_groups`` inside the compiled
    function: Dynamo writes its traced copy of the groups back, with
    capturable=True in each, as for torch.optim's optimizers; the CPU params' step
    takes it as a host step and equals eager bitwise, and the optimizer loads a
    checkpoint (which keeps its flags) as torch.optim's does."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS[name](list(model.parameters()))

        def train_step(x, y, lr):
            for group in opt.param_groups:
                group["lr"] = lr
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        run = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for i in range(4):
            run(*_batch(i), 0.01 * (i + 1) / 4)
        opt.load_state_dict(opt.state_dict())  # (a resume or a rollback of such an optimizer loads)
        run(*_batch(4), 0.01)
        results.append([p.detach().clone() for p in model.parameters()]
                       + [v.clone() for st in opt.state.values() for v in st.values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
