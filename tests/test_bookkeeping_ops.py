"""The host-side bookkeeping around a step: the ``advance_steps`` op (the step
counters after a Triton launch) and ``_C.layout_signature`` (the trace by which
the optimizers notice a param swapped between steps)."""
import pytest
import torch

from amos_fused import _C  # (also registers torch.ops.amos_fused)

ops = torch.ops.amos_fused


def test_advance_steps_adds_one_in_float32_and_bumps_the_versions():
    steps = [torch.tensor(0.0), torch.tensor(2.0 ** 24)]  # (2^24 + 1 rounds back to 2^24 in float32)
    versions = [t._version for t in steps]
    ops.advance_steps(steps)
    assert [float(s) for s in steps] == [1.0, 2.0 ** 24]
    assert [t._version for t in steps] == [v + 1 for v in versions]


@pytest.mark.parametrize("bad", [torch.tensor(0.0, dtype=torch.float64), torch.zeros(2), torch.tensor(float("nan")),
                                 torch.tensor(float("inf")), torch.tensor(-1.0)],
                         ids=["float64", "two-elements", "nan", "inf", "negative"])
def test_advance_steps_refuses_a_bad_counter_before_writing_any(bad):
    good = torch.tensor(3.0)
    versions = [good._version, bad._version]
    with pytest.raises(ValueError, match=r"advance_steps: steps\[1\] must be a finite float32 CPU scalar >= 0"):
        ops.advance_steps([good, bad])
    assert float(good) == 3.0
    assert [good._version, bad._version] == versions


def test_advance_steps_counts_inference_counters_inside_inference_mode():
    with torch.inference_mode():
        steps = [torch.tensor(1.0)]
        ops.advance_steps(steps)
    assert float(steps[0]) == 2.0


def test_layout_signature_changes_with_address_size_or_strides_only():
    a = torch.zeros(4, 6)
    b = torch.zeros(4, 6)
    base = _C.layout_signature([a, b])
    assert base == [a.data_ptr(), 24, 2, 6, 1, b.data_ptr(), 24, 2, 6, 1]
    a.add_(1)  # (values are not part of it)
    assert _C.layout_signature([a, b]) == base
    for swapped in ([a, torch.zeros(4, 6)], [a.t(), b], [a.view(24), b], [a[:2], b], [b, a]):
        assert _C.layout_signature(swapped) != base
    assert _C.layout_signature([]) == []
    empty, scalar = torch.zeros(0), torch.tensor(1.0)
    signature = _C.layout_signature([empty, scalar])
    assert signature[1:4] == [0, 1, 1] and signature[4:] == [scalar.data_ptr(), 1, 0]
