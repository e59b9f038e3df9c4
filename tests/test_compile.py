"""torch.compile: the step ops have fake kernels (traceable, schema-checked by
torch.library.opcheck); a compiled ``opt.step`` with an lr scheduler never
recompiles (the step runs eagerly as one opaque call) and equals eager bitwise;
a compiled train step (forward, backward, step) equals eager."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import amos_fused as af


def _lists(n=2):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,)][:n]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    zeros = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    steps = [torch.tensor(0.0) for _ in shapes]
    return params, grads, zeros, steps


def _op_args(name):
    params, grads, zeros, steps = _lists()
    if name == "adam_step":
        return (params, grads, zeros(), zeros(), [], steps, 0.01, 0.9, 0.999, 1e-8, 0.01, True, False, True)
    if name == "radam_step":
        return (params, grads, zeros(), zeros(), steps, 0.01, 0.9, 0.999, 1e-8, 0.0, False, 5.0)
    if name == "lion_step":
        return (params, grads, zeros(), steps, 1e-4, 0.9, 0.99, 0.1)
    if name == "amos_step":
        slots = lambda: [torch.zeros(5, 1), torch.zeros(())]  # noqa: E731
        return (params, grads, slots(), slots(), [], steps, [0.5, 0.5], 0.01, 0.999, None, None,
                0.0, 0.25, 0.25, 2.0**-125)
    if name == "scaled_adam_step":
        return (params, grads, zeros(), zeros(), steps, [1.0, 1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1.0)
    if name == "lamb_step":
        return (params, grads, zeros(), zeros(), steps, 1e-3, 0.9, 0.999, 1e-6, 0.01, True)
    raise AssertionError(name)


@pytest.mark.parametrize("name", af.fake_kernels.STEP_OPS)
def test_step_ops_pass_opcheck(name):
    op = getattr(torch.ops.amos_fused, name).default
    torch.library.opcheck(op, _op_args(name), test_utils=("test_schema", "test_faketensor"))


def test_step_op_traced_in_a_full_graph():
    params, grads, zeros, steps = _lists()
    exp_avgs, exp_avg_sqs = zeros(), zeros()
    eager = [p.clone() for p in params]
    torch.ops.amos_fused.adam_step(eager, grads, zeros(), zeros(), [], [torch.tensor(0.0) for _ in steps],
                                   0.01, 0.9, 0.999, 1e-8, 0.01, True, False, True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def traced(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch.ops.amos_fused.adam_step(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                                       0.01, 0.9, 0.999, 1e-8, 0.01, True, False, True)

    traced(params, grads, exp_avgs, exp_avg_sqs, steps)
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
            assert counter.frame_count <= 2
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
