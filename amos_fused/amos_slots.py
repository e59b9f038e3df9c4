"""Amos slot shapes: which axes of a tensor its second-moment
slots ``v`` and ``b`` average over, and the resulting slot shape."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

ReduceAxes = Union[None, str, Sequence[int]]


def normalize_reduce_axes(reduce_axes: ReduceAxes, ndim: int) -> Union[None, str, Tuple[int, ...]]:
    """Validates ``reduce_axes`` for a tensor of ``ndim`` dims: None (elementwise slots),
    'all' (one 0-dim slot) or a sequence of distinct dims in [-ndim, ndim), returned
    sorted and non-negative.  Raises ValueError naming the bad value."""
    if reduce_axes is None or (isinstance(reduce_axes, str) and reduce_axes == "all"):
        return reduce_axes
    if isinstance(reduce_axes, str):
        raise ValueError(f"reduce_axes must be None, 'all' or a tuple of dims, got {reduce_axes!r}")
    if isinstance(reduce_axes, int) and not isinstance(reduce_axes, bool):
        reduce_axes = (reduce_axes,)
    # (a tuple, list or set: what a checkpoint loads with torch.load(weights_only=True))
    if not isinstance(reduce_axes, (tuple, list, set)):
        raise ValueError(f"reduce_axes must be None, 'all', a dim or a tuple of dims, got {reduce_axes!r}")
    dims = []
    for axis in sorted(reduce_axes) if isinstance(reduce_axes, set) else reduce_axes:
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(f"reduce_axes must hold ints, got {reduce_axes!r}")
        if not -ndim <= axis < max(ndim, 1) or ndim == 0:
            raise ValueError(
                f"reduce_axes {tuple(reduce_axes)!r}: dim {axis} is out of range for a tensor of {ndim} dims"
            )
        dims.append(axis % ndim)
    if len(set(dims)) != len(dims):
        raise ValueError(f"reduce_axes {tuple(reduce_axes)!r} names a dim twice")
    return tuple(sorted(dims))


def reduced_dims(reduce_axes: ReduceAxes, ndim: int) -> Tuple[int, ...]:
    """The dims averaged over (empty for elementwise slots)."""
    axes = normalize_reduce_axes(reduce_axes, ndim)
    if axes is None:
        return ()
    if axes == "all":
        return tuple(range(ndim))
    return axes


def slot_shape(shape: Sequence[int], reduce_axes: ReduceAxes) -> Tuple[int, ...]:
    """Shape of the ``v`` / ``b`` slots: the reduced dims kept with size 1, or ()
    when reducing over all axes."""
    axes = normalize_reduce_axes(reduce_axes, len(shape))
    if axes == "all":
        return ()
    dims = set(axes or ())
    return tuple(1 if i in dims else n for i, n in enumerate(shape))


def loaded_slot_dims(shape: Sequence[int], slot: Sequence[int], reduce_axes: ReduceAxes) -> Tuple[int, ...]:
    """The dims a loaded slot of shape ``slot`` averages over, for a tensor of
    ``shape``: those of ``reduce_axes`` when it gives that slot shape, else read off
    the shapes (a size-1 slot dim where the tensor's is not; a slot of another
    shape is named by the step's checks)."""
    try:
        if tuple(slot) == slot_shape(shape, reduce_axes):
            return reduced_dims(reduce_axes, len(shape))
    except ValueError:
        pass
    if len(slot) != len(shape):
        return tuple(range(len(shape)))
    return tuple(d for d, (n, m) in enumerate(zip(shape, slot)) if m == 1 and n != 1)
