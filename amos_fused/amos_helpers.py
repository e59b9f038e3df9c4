"""Amos param groups from a model: η (the expected scale of a tensor's entries)
and ``reduce_axes`` (which axes its second moment averages over) inferred from
each parameter's module, by this table:

==============================  ==============================  =======================
tensor                          η                               reduce_axes (slot)
==============================  ==============================  =======================
``nn.Linear.weight`` (out, in)  sqrt(1/in)                      (1,)  → (out, 1)
``nn.Conv*d.weight`` (out, …)   sqrt(1/(in/groups · prod(k)))   all but 0 → (out, 1, …)
``nn.ConvTranspose*d.weight``   sqrt(1/(out/groups · prod(k)))  all but 0 → (in, 1, …)
``nn.Embedding.weight``         sqrt(1/dim)                     (1,)  → (vocab, 1)
biases, norm shifts †           0.5                             'all' → scalar
norm scales                     1.0                             'all' → scalar
anything else, rank ≥ 2         sqrt(1/prod(shape[1:]))         all but 0
anything else, rank ≤ 1         its RMS (0.5 if all zero)       'all'
==============================  ==============================  =======================

† A bias is a param named ``bias``, ``bias_*`` or ``*_bias`` (``nn.LSTM``'s
``bias_ih_l0``, ``nn.MultiheadAttention``'s ``in_proj_bias`` and ``bias_k``).

What the table cannot know (a gain before a ReLU-like, a custom init) is set by
``overrides``: glob patterns over parameter names, mapped to ``eta`` and/or
``reduce_axes``.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from .amos_slots import normalize_reduce_axes
from .optim import initial_rms_eta

_NORMS = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONVS = (nn.modules.conv._ConvNd,)


def _is_bias(attr: str) -> bool:
    return attr == "bias" or attr.startswith("bias_") or attr.endswith("_bias")


def infer_eta_and_axes(module: nn.Module, attr: str, param, axes_only: bool = False) -> Tuple[Any, Any]:
    """η and reduce_axes of ``module.<attr>`` by the table above (``axes_only``: η
    is None where it would be read from the param's values)."""
    shape = tuple(param.shape)
    if param.numel() == 0:  # nothing to scale (its fan-in may be 0): stepped as one empty slot
        return 0.5, "all"
    if isinstance(module, _NORMS):
        return (1.0 if attr == "weight" else 0.5), "all"
    if _is_bias(attr):
        return 0.5, "all"
    if param.dim() <= 1:
        return (None if axes_only else initial_rms_eta(param)), "all"
    if isinstance(module, nn.Linear) and attr == "weight":
        return math.sqrt(1.0 / shape[1]), (1,)
    if isinstance(module, nn.Embedding) and attr == "weight":
        return math.sqrt(1.0 / shape[1]), (1,)
    if isinstance(module, _CONVS) and attr == "weight":
        # in/groups · prod(kernel); a transposed conv's weight is (in, out/groups, k…):
        # out/groups · prod(kernel), the fan-in torch's init gives that weight
        fan_in = math.prod(shape[1:])
        return math.sqrt(1.0 / fan_in), tuple(range(1, param.dim()))
    return math.sqrt(1.0 / math.prod(shape[1:])), tuple(range(1, param.dim()))


def _axes_key(axes) -> Any:
    return axes if axes in (None, "all") else tuple(axes)


def amos_param_groups(
    model: nn.Module,
    lr: float,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    **group_options: Any,
) -> List[Dict[str, Any]]:
    """Param groups for ``amos_fused.Amos``, one per distinct ``reduce_axes``, each
    with a tuple ``eta`` (one value per param) and the params' names in
    ``param_names`` (torch.optim's key for named params, kept in state dicts: as
    torch.optim requires, a group added later then needs its ``param_names`` too,
    e.g. ``amos_param_groups(new_head, lr)``).

    ``overrides`` maps glob patterns over parameter names (``fnmatch``, e.g.
    ``"*.mlp.c_fc.weight"``) to ``{"eta": float, "reduce_axes": ...}``; every
    matching pattern applies, later ones last.  ``group_options`` (momentum,
    clip_value, …) are copied into every group.

    Example::

        groups = amos_param_groups(model, lr=0.01, overrides={"*.fc1.weight": {"eta": math.sqrt(2 / 768)}})
        optimizer = amos_fused.Amos(groups, lr=0.01)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"amos_param_groups: model must be an nn.Module (its module types choose eta and "
                        f"reduce_axes), got {type(model).__name__}")
    clash = sorted(set(group_options) & {"params", "param_names", "eta", "reduce_axes"})
    if clash:
        raise ValueError(f"amos_param_groups: {', '.join(clash)} cannot be group options: they are set per "
                         "param (give eta and reduce_axes through overrides)")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"amos_param_groups: overrides must be a mapping of name patterns to "
                        f"{{'eta': ..., 'reduce_axes': ...}}, got {type(overrides).__name__}")
    overrides = dict(overrides or {})
    for pattern, override in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"amos_param_groups: overrides' keys are patterns over param names (str), got "
                            f"{type(pattern).__name__} {pattern!r}")
        if not isinstance(override, Mapping):
            raise TypeError(f"amos_param_groups: overrides[{pattern!r}] must be a mapping such as "
                            f"{{'eta': 0.5}}, got {type(override).__name__} {override!r}")
        unknown = set(override) - {"eta", "reduce_axes"}
        if unknown:
            raise ValueError(f"overrides[{pattern!r}]: unknown keys {sorted(unknown)} (eta, reduce_axes)")
    owner = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in owner:
                full = f"{module_name}.{attr}" if module_name else attr
                owner[id(param)] = (full, module, attr, param)
    groups: Dict[Any, Dict[str, Any]] = {}
    for full, module, attr, param in owner.values():
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(f"amos_param_groups: {full} is a lazy module's uninitialized param: run a forward "
                             "pass first, so that it has a shape")
        chosen = [(pattern, override) for pattern, override in overrides.items() if fnmatch.fnmatchcase(full, pattern)]
        if any("eta" in override for _, override in chosen):  # (its eta is not read from its values)
            eta, axes = infer_eta_and_axes(module, attr, param, axes_only=True)
        else:
            try:
                eta, axes = infer_eta_and_axes(module, attr, param)
            except ValueError as error:
                raise ValueError(f"amos_param_groups: {full} (shape {tuple(param.shape)}): {error} (or give its "
                                 "eta in overrides)") from None
        for _, override in chosen:
            eta = override.get("eta", eta)
            axes = override.get("reduce_axes", axes)
        try:
            axes = normalize_reduce_axes(axes, param.dim())
        except ValueError as error:
            raise ValueError(f"amos_param_groups: {full} (shape {tuple(param.shape)}): {error}") from None
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"Invalid eta for {full}: {eta!r} (must be a finite number > 0)")
        group = groups.setdefault(
            _axes_key(axes),
            {"params": [], "param_names": [], "eta": [], "reduce_axes": axes, "lr": lr, **group_options},
        )
        group["params"].append(param)
        group["param_names"].append(full)
        group["eta"].append(float(eta))
    for group in groups.values():
        group["eta"] = tuple(group["eta"])
    names = [name for name, _ in model.named_parameters()]  # (frozen params too: a pattern may name one)
    unmatched = [pattern for pattern in overrides if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
    if unmatched:
        warnings.warn(f"amos_param_groups: overrides {unmatched} match no param name of the model (its names: "
                      f"{names[:3]}{', …' if len(names) > 3 else ''})", stacklevel=2)
    return list(groups.values())
