"""master_weights=True on the Triton backend (CUDA tensors when a GPU is visible,
otherwise CPU tensors through Triton's interpreter): the masters are stepped by the
float32 kernels with the grads upcast, then copied into the params, so every
optimizer's master is bitwise the float32 Triton step of a float32 param with the
same grads, and each param is its master rounded to nearest."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from amos_fused.master_weights import MASTER_KEY  # noqa: E402

from registry import CASES, CLASS_CASES, seeded_params  # noqa: E402
from test_master_weights import step_side_by_side  # noqa: E402
from test_triton import DEVICE, STEPS, _bits  # noqa: E402

SHAPES = [(), (37,), (5, 7), (2100,)]


@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_master_steps_like_a_float32_param(name):
    case = CASES[CLASS_CASES[name]]
    low = seeded_params(SHAPES, torch.bfloat16, DEVICE)
    full = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt = case.make(low, "triton", master_weights=True)
    ref = case.make(full, "triton")
    step_side_by_side(opt, ref, low, full, STEPS)
    for p, q in zip(low, full):
        master = opt.state[p][MASTER_KEY]
        assert master.dtype == torch.float32
        assert torch.equal(_bits(master), _bits(q)), f"{name}: master of {tuple(p.shape)}"
        assert torch.equal(_bits(p), _bits(master.to(torch.bfloat16)))
        for key, value in ref.state[q].items():
            assert torch.equal(_bits(opt.state[p][key]), _bits(value)), f"{name}: state {key!r}"
