"""What one step costs in op calls: after the first step (which creates the
state), an fp32 AdamW step of the CPU benchmark workload is exactly one C++
check pass and one kernel call per bucket, and no other torch op."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amos_fused as af
import amos_fused.optimizer_base as optimizer_base
from amos_fused.bench_workloads import GPT2_CONFIGS, gpt2_shapes, model_with_grads


class CountOps(TorchDispatchMode):
    """Counts the torch ops that reach the dispatcher (torch.optim's own profiler
    markers aside)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not name.startswith("profiler."):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counter(monkeypatch):
    """Counts op calls, the check op included (it has no device kernel, so it is
    counted where the optimizer calls it)."""
    counter = CountOps()
    real = optimizer_base.check_step

    def counted(*args, **kwargs):
        counter.calls["amos_fused.check_step"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(optimizer_base, "check_step", counted)
    return counter


def test_one_check_and_one_kernel_call_per_bucket(counter):
    model = model_with_grads(gpt2_shapes(**GPT2_CONFIGS["gpt2-39m"]), "cpu", torch.float32)
    params = list(model.parameters())
    assert len(params) == 88
    opt = af.AdamW(params, lr=1e-3, backend="cpu")
    opt.step()  # creates the state
    counter.calls.clear()
    with counter:
        opt.step()
    assert dict(counter.calls) == {"amos_fused.check_step": 1, "amos_fused.step": 1}


def test_two_groups_and_two_dtypes_make_three_buckets(counter):
    params = [torch.randn(8, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True),
              torch.randn(5, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = af.Lion([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], backend="cpu")
    opt.step()
    counter.calls.clear()
    with counter:
        opt.step()
    assert dict(counter.calls) == {"amos_fused.check_step": 3, "amos_fused.step": 3}
