"""Construction-time checks of hyper-parameters, in the style of torch.optim:
a ValueError that names the parameter and the value."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch


class HyperParameterTypeError(TypeError, ValueError):
    """A hyper-parameter that is not a number ('1e-3', None, a list): a TypeError, as
    torch.optim's arithmetic on it raises, and a ValueError, as every other value
    refused here (as NumPy's AxisError is both an IndexError and a ValueError)."""


class TensorSizeError(HyperParameterTypeError, RuntimeError):
    """A tensor hyper-parameter of other than one element: also a RuntimeError, as
    torch.optim raises for one (the truth of a comparison with it is ambiguous)."""


class ShortBetasError(IndexError, ValueError):
    """betas with fewer values than the algorithm takes ((0.9,)): an IndexError, as
    torch.optim's constructor raises reading the missing one, and a ValueError."""


class StepRefusedTensorError(ValueError, RuntimeError):
    """A Tensor lr with ``foreach=True`` (and ``capturable=False``): a ValueError, as
    torch.optim's constructor raises, and a RuntimeError, as its step raises for a
    group added or edited later."""


class MissingGroupKey(KeyError, ValueError):
    """A param group without one of the optimizer's settings (deleted after the group
    was added): a KeyError, as torch.optim's step raises, and a ValueError."""

    def __str__(self) -> str:  # (KeyError's would show the message quoted)
        return str(self.args[0]) if self.args else ""


def renamed(error: Exception, message: str) -> ValueError:
    """The error to raise for ``error`` with ``message`` (the group named): of the
    kind above that ``error`` is (a TypeError or KeyError is made one), else a
    ValueError."""
    if isinstance(error, TensorSizeError):
        return TensorSizeError(message)
    if isinstance(error, TypeError):
        return HyperParameterTypeError(message)
    if isinstance(error, KeyError):
        return MissingGroupKey(message)
    if isinstance(error, (ShortBetasError, StepRefusedTensorError)):
        return type(error)(message)
    return ValueError(message)


def complex_valued(x) -> bool:
    """A complex number or tensor (NumPy's too), whose float() would drop its
    imaginary part (or raise) where torch.optim's arithmetic goes complex."""
    if isinstance(x, torch.Tensor):
        return x.is_complex()
    return isinstance(x, numbers.Complex) and not isinstance(x, numbers.Real)


def _value(name: str, x) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:  # torch.optim's own check of a tensor lr (its step's arithmetic raises a TypeError)
            raise TensorSizeError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        if x.is_meta:
            raise ValueError(f"Invalid {name}: a tensor on the meta device has no value")
        if x.is_complex():
            raise HyperParameterTypeError(f"Invalid {name}: {x!r} (must be a real number, not a complex tensor)")
        x = x.item()
    # (float() reads "1e-3", and a NumPy complex as its real part; torch.optim refuses both)
    if isinstance(x, (str, bytes, bytearray)) or complex_valued(x):
        raise HyperParameterTypeError(f"Invalid {name}: {x!r} (must be a real number, not a {type(x).__name__})")
    try:
        return float(x)
    except TypeError:
        raise HyperParameterTypeError(f"Invalid {name}: {x!r} (must be a real number)") from None
    except ValueError:
        raise ValueError(f"Invalid {name}: {x!r} (must be a real number)") from None
    except OverflowError:  # (an int past float64's range, e.g. 10**400)
        raise ValueError(f"Invalid {name}: {shown(x)} (beyond float64's range)") from None


def shown(x) -> str:
    """repr(x), cut short when long (an int of 400 digits)."""
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:12]}… ({len(text)} characters)"


def value_of(x) -> float:
    """The float a checked hyper-parameter holds (a number or a one-element tensor)."""
    return _value("value", x)


def nonnegative(name: str, value) -> None:
    v = _value(name, value)
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number >= 0)")


def positive(name: str, value) -> None:
    v = _value(name, value)
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number > 0)")


def finite_at_least(name: str, value, low: float) -> float:
    v = _value(name, value)
    if not (v >= low and math.isfinite(v)):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number >= {low})")
    return v


def in_unit_interval(name: str, value) -> None:
    """0 <= value < 1, like torch's betas."""
    v = _value(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def _length(value) -> Optional[int]:
    """len(value), or None where it has none (a 0-d tensor or array has __len__ but
    raises)."""
    try:
        return len(value)
    except TypeError:
        return None


def betas(value: Sequence[float], count: int = 2) -> None:
    """Any sequence of ``count`` numbers (a tuple, a list, a config library's list, a
    NumPy array, tensors), each in [0, 1)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__getitem__") or _length(value) is None:
        raise HyperParameterTypeError(f"Invalid betas: {value!r} (expected a pair of floats)")
    if _length(value) < count:  # (torch.optim reads the missing one: an IndexError)
        raise ShortBetasError(f"Invalid betas: {value!r} (expected a pair of floats)")
    if _length(value) != count:
        raise ValueError(f"Invalid betas: {value!r} (expected a pair of floats)")
    for index, beta in enumerate(value):
        in_unit_interval(f"beta parameter at index {index}", beta)


def _compares_with_a_float(value) -> bool:
    """Whether ``0.0 <= value`` is a comparison Python can make, as torch.optim's
    range check of a beta makes it before it asks for a pair of floats or Tensors
    (None, strings, complex numbers and tuples raise a TypeError there)."""
    if complex_valued(value):  # (NumPy's complex numbers compare with a float)
        return False
    try:
        0.0 <= value  # noqa: B015 (the comparison's TypeError is the answer)
    except TypeError:
        return False
    except Exception:  # (a tensor of several elements: compared, refused later by its size)
        return True
    return True


def betas_as_torch_constructs_them(value) -> None:
    """torch.optim.Adam and AdamW's constructors take betas that are both floats
    (Python's, NumPy's float64) or both Tensors, and refuse any other pair (ints such
    as ``(0, 0.999)``, NumPy's float32, one Tensor and one number); so do theirs
    here (a step takes such a pair written into a group later, as torch's step
    does)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__getitem__") or _length(value) != 2:
        return  # betas() names what is wrong with it
    pair = (value[0], value[1])
    if not all(_compares_with_a_float(b) for b in pair):
        return  # betas() names it: not a real number (None, '0.9', 0.9j: a TypeError, as torch.optim raises)
    if not (all(isinstance(b, float) for b in pair) or all(isinstance(b, torch.Tensor) for b in pair)):
        kinds = ", ".join(type(b).__name__ for b in pair)
        raise ValueError(f"Invalid betas: {value!r} ({kinds}: must be either both floats or both Tensors, "
                         "as torch.optim.Adam and AdamW take them)")


def _is_numpy_bool(value) -> bool:
    try:
        import numpy
    except ImportError:  # pragma: no cover (torch's optional dependency)
        return False
    return isinstance(value, numpy.bool_)


def flag(name: str, value) -> None:
    """A flag, read as torch.optim reads it, by its truth: True or False, None (False),
    NumPy's bools, and a real number (NumPy's too) or one-element real tensor that is
    0 or 1, as a config file or a tensor may give it; anything else (a string, 0.5,
    a list, an array or tensor of several elements, a tensor on the meta device) is
    refused here rather than at the step's first use of it."""
    if value is None or isinstance(value, bool) or _is_numpy_bool(value):
        return
    if isinstance(value, torch.Tensor) and value.numel() != 1:  # (torch.optim's truth test raises a RuntimeError)
        raise TensorSizeError(f"Invalid {name}: {value!r} of shape {tuple(value.shape)} (must be True or False)")
    if isinstance(value, numbers.Real) and value in (0, 1):
        return
    if (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta
            and not value.is_complex() and value.item() in (0, 1)):
        return
    raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def optional_positive(name: str, value: Optional[float]) -> None:
    if value is not None:
        positive(name, value)


def optional_in_unit_interval(name: str, value: Optional[float]) -> None:
    if value is not None:
        in_unit_interval(name, value)


def adam_group(group: dict) -> None:
    """lr, eps, betas and (when the group has one) weight_decay of an Adam-like group."""
    nonnegative("learning rate", group["lr"])
    nonnegative("epsilon value", group["eps"])
    betas(group["betas"])
    if "weight_decay" in group:
        nonnegative("weight_decay value", group["weight_decay"])
