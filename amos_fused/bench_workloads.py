"""Benchmark workloads: GPT-2-shaped lists of parameters with gradients.

`WORKLOADS` maps a name to a function `(device, dtype) -> nn.Module` whose
parameters are `randn * 0.02` and carry a `randn` gradient, drawn from a fixed
seed, so each call returns the same values (per device).
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


class ParamsModel(torch.nn.Module):
    """A model holding named parameters, each owned by a module of the kind the
    name implies (Embedding, LayerNorm, Linear), so ``amos_param_groups`` can infer
    Amos's η and reduce_axes from it.  No forward: only the step is benchmarked."""

    def __init__(self, shapes: List[Tuple[str, Shape]], device, dtype):
        super().__init__()
        for name, shape in shapes:
            owner, attr = self._owner(name, shape)
            setattr(owner, attr, torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    def _owner(self, name: str, shape: Shape):
        *path, attr = name.split(".")
        module = self
        for i, part in enumerate(path):
            if not hasattr(module, part):
                last = i == len(path) - 1
                setattr(module, part, self._leaf(part, shape) if last else torch.nn.Module())
            module = getattr(module, part)
        return module, attr

    @staticmethod
    def _leaf(part: str, shape: Shape) -> torch.nn.Module:
        """An empty module of the right kind (its parameters are set by the caller)."""
        if part in ("wte", "wpe"):
            kind = torch.nn.Embedding(1, 1)
        elif part.startswith("ln"):
            kind = torch.nn.LayerNorm(1)
        else:
            kind = torch.nn.Linear(1, 1)
        for attr in list(kind._parameters):
            del kind._parameters[attr]
        return kind


def model_with_grads(shapes: List[Tuple[str, Shape]], device, dtype) -> ParamsModel:
    """Seeded parameters (randn * 0.02) whose .grad is set (randn)."""
    model = ParamsModel(shapes, device, dtype)
    generator = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, device=device, dtype=dtype).mul_(0.02))
            param.grad = torch.randn(param.shape, generator=generator, device=device, dtype=dtype)
    return model


def gpt2(device, dtype, **config) -> ParamsModel:
    return model_with_grads(gpt2_shapes(**config), device, dtype)


GPT2_CONFIGS = {
    # ~0.17M params, 28 tensors: for tests and smoke runs of the benchmark itself.
    "gpt2-tiny": dict(d_model=64, layers=2, vocab=1024, context=128),
    # ~39M params, 88 tensors: sized for a small CPU machine.
    "gpt2-39m": dict(d_model=512, layers=7, vocab=32000, context=1024),
    # The real GPT-2 small: 124M params, 148 tensors.
    "gpt2-small": dict(d_model=768, layers=12, vocab=50257, context=1024),
    # GPT-2 medium: 355M params, 292 tensors.
    "gpt2-medium": dict(d_model=1024, layers=24, vocab=50257, context=1024),
}

def many_small(device, dtype, count: int = 20_000, numel: int = 4096) -> ParamsModel:
    """`count` tensors of `numel` elements: a test of per-tensor launch overhead."""
    return model_with_grads([(f"t{i}.weight", (numel,)) for i in range(count)], device, dtype)


def one_matrix(device, dtype, rows: int = 38_000, cols: int = 1024) -> ParamsModel:
    """One (rows, cols) weight (38.9M params): per-element costs without per-tensor ones."""
    return model_with_grads([("matrix.weight", (rows, cols))], device, dtype)


WORKLOADS: Dict[str, Callable[..., torch.nn.Module]] = {
    **{name: functools.partial(gpt2, **config) for name, config in GPT2_CONFIGS.items()},
    # 20,000 tensors of 4,096 elements (82M params).
    "many-small": many_small,
    # One 38,000 x 1,024 matrix (38.9M params, Amos rows of 1,024).
    "one-matrix": one_matrix,
}

DEFAULT_WORKLOAD = {"cpu": "gpt2-39m", "cuda": "gpt2-medium"}
