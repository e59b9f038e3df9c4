"""The optimizers' per-step host checks and the Triton backend's prologue as plain
functions of ``amos_fused._C`` (csrc/host_checks_python.cpp: the lists unpacked
straight from Python) give what their ``torch.ops.amos_fused`` ops give (the swap
check's ``layout_signature`` has no op: tests/test_bookkeeping_ops.py), results
and errors alike, on lists drawn to hit every outcome: good buckets, bad grads and
states, shared memory, bad counters, skipped steps, non-tensors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amos_fused import _C
from amos_fused.contracts import contract, hyper_values

OPS = torch.ops.amos_fused


def _outcome(call):
    """What a call gives: ("ok", result) or (exception type, message)."""
    try:
        return "ok", call()
    except Exception as error:  # noqa: BLE001 (the type is compared)
        return type(error), str(error)


def _same(fast, op):
    got, want = _outcome(fast), _outcome(op)
    assert got[0] is want[0] or got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert tuple(got[1]) == tuple(want[1]), (got, want)
    return got


@st.composite
def buckets(draw):
    """(params, grads, states, slots, steps, walk), each corruption optional."""
    n = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    shapes = [draw(st.sampled_from([(3,), (2, 3), (4, 1), (0,)])) for _ in range(n)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    states = [torch.zeros(s, dtype=dtype) for s in shapes] + [torch.zeros(s, dtype=dtype) for s in shapes]
    slots = [torch.zeros((1,) * len(s), dtype=dtype) for s in shapes] if draw(st.booleans()) else []
    steps = [torch.tensor(float(draw(st.integers(0, 3)))) for _ in range(n)]
    i = draw(st.integers(0, n - 1))
    corruption = draw(st.sampled_from(["none", "grad dtype", "grad shape", "state shared", "state dtype",
                                       "step negative", "step shared", "step int", "param strided",
                                       "grad strided", "params overlap"]))
    if corruption == "grad dtype":
        grads[i] = grads[i].double() if dtype != torch.float64 else grads[i].float()
    elif corruption == "grad shape":
        grads[i] = torch.randn(7, dtype=dtype)
    elif corruption == "state shared":
        states[n + i] = states[i]
    elif corruption == "state dtype":
        states[i] = states[i].to(torch.float16)
    elif corruption == "step negative":
        steps[i] = torch.tensor(-1.0)
    elif corruption == "step shared" and n > 1:
        steps[(i + 1) % n] = steps[i]
    elif corruption == "step int":
        steps[i] = torch.tensor(1)
    elif corruption == "param strided":
        params[i] = torch.randn(6, dtype=dtype)[::2]
        grads[i] = torch.randn(3, dtype=dtype)
        states[i], states[n + i] = torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    elif corruption == "grad strided":
        grads[i] = torch.randn(shapes[i][::-1], dtype=dtype).transpose(0, -1) if len(shapes[i]) == 2 \
            else grads[i]
    elif corruption == "params overlap" and n > 1:
        params[(i + 1) % n] = params[i]
    walk = draw(st.integers(0, 2))
    return params, grads, states, slots, steps, walk


@settings(max_examples=300, deadline=None)
@given(buckets())
def test_check_step_gives_what_the_op_gives(bucket):
    params, grads, states, slots, steps, walk = bucket
    _same(lambda: _C.check_step(params, grads, states, slots, steps, walk),
          lambda: OPS.check_step(params, grads, states, slots, steps, walk))
    _same(lambda: _C.check_step(tuple(params), tuple(grads), states, slots, steps, walk),
          lambda: OPS.check_step(params, grads, states, slots, steps, walk))


@settings(max_examples=300, deadline=None)
@given(buckets(), st.integers(-1, 12))
def test_first_written_overlap_gives_what_the_op_gives(bucket, written):
    params, grads, states, _, steps, _ = bucket
    tensors = params + states + steps + grads
    written = min(written, len(tensors) + 1)
    _same(lambda: _C.first_written_overlap(tensors, written), lambda: OPS.first_written_overlap(tensors, written))


def test_the_outcomes_above_are_all_reached():
    """The strategy reaches a good bucket, a refused one and an overlap (so the
    comparisons above compare more than one outcome)."""
    p, q = torch.randn(3), torch.randn(3)
    assert _C.check_step([p, q], [torch.randn(3)] * 2, [], [], [], 1) == (-1, 0, 0)
    assert _C.check_step([p, p], [torch.randn(3)] * 2, [], [], [], 1)[0] >= 0
    assert _C.first_written_overlap([p, q, p[1:]], 2) == (0, 2)
    assert _C.layout_signature([p]) == [p.data_ptr(), 3, 1, 1]  # (address, numel, ndim, strides)


_HYPER = {
    "adam": dict(lr=0.01, beta1=0.9, beta1_weight=1 - 0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True,
                 amsgrad=False,
                 bias_correction=True),
    "lion": dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1),
}


@settings(max_examples=150, deadline=None)
@given(buckets(), st.sampled_from(sorted(_HYPER)), st.sampled_from([None, 0.0, 1.0]),
       st.sampled_from([None, 0.5]), st.booleans(), st.booleans())
def test_begin_step_gives_what_the_op_gives(bucket, algorithm, found_inf, grad_scale, telemetry, keys):
    params, grads, states, _, steps, _ = bucket
    n = len(params)
    states = states[:n * len(contract(algorithm).states)]
    values = hyper_values(algorithm, _HYPER[algorithm])
    scaler = [None if x is None else torch.tensor(x) for x in (grad_scale, found_inf)]
    tables = [torch.full((n, 2), 7.0, dtype=torch.float64) if telemetry else None for _ in range(2)]
    round_keys = list(range(n)) if keys else None
    got = _outcome(lambda: _C.begin_step(algorithm, params, grads, states, steps, values, [], *scaler, tables[0],
                                         round_keys))
    want = _outcome(lambda: OPS.begin_step(algorithm, params, grads, states, steps, values, [], *scaler, tables[1],
                                           round_keys))
    assert got[0] is want[0] or got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert got[1][0] == want[1][0] and torch.equal(got[1][1], want[1][1])
    else:
        assert got[1] == want[1]
    if telemetry:  # (zeroed column 1 on a skipped step, else untouched: alike)
        assert torch.equal(tables[0], tables[1])


@pytest.mark.parametrize("case", ["ok", "skipped", "short absmax", "codes dtype", "telemetry", "bad key"])
@pytest.mark.parametrize("algorithm", ["adam", "lion"])
def test_begin_step_fp8_gives_what_the_op_gives(algorithm, case):
    n, numel = 2, 300
    params = [torch.randn(numel) for _ in range(n)]
    grads = [torch.randn(numel) for _ in range(n)]
    coded = 1 if algorithm == "lion" else 2  # (exp_avg; adam also exp_avg_sq, kept as its root)
    codes = [torch.zeros(numel, dtype=torch.uint8) for _ in range(coded * n)]
    absmax = [torch.ones(2) for _ in range(coded * n)]
    steps = [torch.tensor(3.0) for _ in range(n)]
    values = hyper_values(algorithm, _HYPER[algorithm])
    found_inf = torch.tensor(1.0) if case == "skipped" else None
    if case == "short absmax":
        absmax[1] = torch.ones(1)
    if case == "codes dtype":
        codes[0] = torch.zeros(numel, dtype=torch.int8)
    keys = [1, 2.5] if case == "bad key" else None
    tables = [torch.full((n, 2), 7.0, dtype=torch.float64) if case in ("telemetry", "skipped") else None
              for _ in range(2)]
    got = _outcome(lambda: _C.begin_step_fp8(algorithm, params, grads, codes, absmax, steps, values, None,
                                             found_inf, tables[0], keys, None, None))
    want = _outcome(lambda: OPS.begin_step_fp8(algorithm, params, grads, codes, absmax, steps, values, None,
                                               found_inf, tables[1], keys, None, None))
    if case == "bad key":  # (the op's own argument parsing words it otherwise)
        assert got[0] is TypeError and "round_keys must be an int, got float" in got[1] and want[0] != "ok"
        return
    assert got[0] is want[0] or got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert got[1][0] == want[1][0] == (case != "skipped") and torch.equal(got[1][1], want[1][1])
    else:
        assert case in ("short absmax", "codes dtype") and got[1] == want[1]
    if tables[0] is not None:
        assert torch.equal(tables[0], tables[1])


@pytest.mark.parametrize("call, message", [
    (lambda t: _C.check_step(t, t, [], [], [], 1.0), "walk must be an int"),
    (lambda t: _C.check_step(t, t, [], [], [], 5), "walk must be 0, 1 or 2"),
    (lambda t: _C.check_step(t, [1.0], [], [], [], 1), r"grads\[0\] must be a tensor, got float"),
    (lambda t: _C.check_step(t + t, t + t, t + t + t, [], [], 1), "not a whole number of lists"),
    (lambda t: _C.first_written_overlap(t, 5), r"written must be in \[0, 1\]"),
    (lambda t: _C.first_written_overlap(iter(t), 0), "tensors must be a list of tensors, got"),
    (lambda t: _C.layout_signature(None), "tensors must be a list of tensors, got NoneType"),
    (lambda t: _C.begin_step(3, t, t, [], t, [], [], None, None, None, None), "algorithm must be a str"),
    (lambda t: _C.begin_step("lion", t, t, [], t, ["x"], [], None, None, None, None),
     r"hyper\[0\] must be a float, got str"),
    (lambda t: _C.begin_step("lion", t, t, [], t, [], [], 1.0, None, None, None),
     "grad_scale must be a tensor or None, got float"),
    (lambda t: _C.begin_step("lion", t, t, [], t, [], [], None, None, None, [0.5]),
     "round_keys must be an int, got float"),
    (lambda t: _C.begin_step("lion", t, t, [], t, [1.0], []), "11 arguments"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call([torch.randn(2)])
