"""Benchmark workloads: GPT-2-shaped lists of parameters with gradients.

`WORKLOADS` maps a name to a function `(device, dtype) -> list[Parameter]`; every
parameter is `randn * 0.02` and carries a `randn` gradient, drawn from a fixed seed,
so each call returns the same values (per device).
"""
import functools
from typing import Callable, Dict, List, Tuple

import torch

SEED = 0

Shape = Tuple[int, ...]


def gpt2_shapes(d_model: int, layers: int, vocab: int, context: int) -> List[Tuple[str, Shape]]:
    """Names and shapes of a GPT-2 model's parameters (HF layout: Conv1D stored (out, in))."""
    shapes = [("wte.weight", (vocab, d_model)), ("wpe.weight", (context, d_model))]
    for i in range(layers):
        block = [
            ("ln_1.weight", (d_model,)),
            ("ln_1.bias", (d_model,)),
            ("attn.c_attn.weight", (3 * d_model, d_model)),
            ("attn.c_attn.bias", (3 * d_model,)),
            ("attn.c_proj.weight", (d_model, d_model)),
            ("attn.c_proj.bias", (d_model,)),
            ("ln_2.weight", (d_model,)),
            ("ln_2.bias", (d_model,)),
            ("mlp.c_fc.weight", (4 * d_model, d_model)),
            ("mlp.c_fc.bias", (4 * d_model,)),
            ("mlp.c_proj.weight", (d_model, 4 * d_model)),
            ("mlp.c_proj.bias", (d_model,)),
        ]
        shapes += [(f"h.{i}.{name}", shape) for name, shape in block]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    return shapes


def params_with_grads(shapes: List[Tuple[str, Shape]], device, dtype) -> List[torch.nn.Parameter]:
    """Seeded parameters (randn * 0.02) whose .grad is set (randn)."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    params = []
    for _, shape in shapes:
        value = torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
        param = torch.nn.Parameter(value)
        param.grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        params.append(param)
    return params


def gpt2(device, dtype, **config) -> List[torch.nn.Parameter]:
    return params_with_grads(gpt2_shapes(**config), device, dtype)


GPT2_CONFIGS = {
    # ~39M params, 88 tensors: sized for a small CPU machine.
    "gpt2-39m": dict(d_model=512, layers=7, vocab=32000, context=1024),
    # The real GPT-2 small: 124M params, 148 tensors.
    "gpt2-small": dict(d_model=768, layers=12, vocab=50257, context=1024),
    # GPT-2 medium: 355M params, 292 tensors.
    "gpt2-medium": dict(d_model=1024, layers=24, vocab=50257, context=1024),
}

WORKLOADS: Dict[str, Callable[..., List[torch.nn.Parameter]]] = {
    name: functools.partial(gpt2, **config) for name, config in GPT2_CONFIGS.items()
}

DEFAULT_WORKLOAD = {"cpu": "gpt2-39m", "cuda": "gpt2-medium"}
