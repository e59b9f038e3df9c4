"""The benchmark (python -m amos_fused.bench): the bandwidth-floor op
torch.ops.amos_fused.stream_floor does the memory traffic it claims, every row is
read against a floor of its own algorithm's bytes, the JSON / table / plot
bookkeeping, and the optional extras (matplotlib, tqdm).  Fast, CPU only, and no
assertion on any measured time."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

import amos_fused as af
import amos_fused.bench as bench
from amos_fused.bench_workloads import WORKLOADS
from amos_fused.master_weights import MASTER_KEY
from conftest import KERNEL_THREADS

ROOT = pathlib.Path(__file__).resolve().parents[1]
stream_floor = torch.ops.amos_fused.stream_floor

# 0-element tensors first, in the middle and last; odd sizes; a bucket larger than
# the grain size, so two threads split it (across a tensor boundary).
SIZES = [0, 1, 7, 33, 4099, 0, 70001, 0]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _opmath(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _streams(count, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=generator).to(dtype) for n in SIZES] for _ in range(count)]


def _flat(streams):
    return [t for stream in streams for t in stream]


def _reference(written, read):
    """w + (r_0 + r_1 + ...), in the opmath type, rounded once to the storage dtype."""
    out = []
    for w_stream in written:
        per_tensor = []
        for t, w in enumerate(w_stream):
            op = _opmath(w.dtype)
            total = read[0][t].to(op)
            for r_stream in read[1:]:
                total = total + r_stream[t].to(op)
            per_tensor.append((w.to(op) + total).to(w.dtype))
        out.append(per_tensor)
    return out


def _with_threads(fn, threads=KERNEL_THREADS):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_written,num_read", [(3, 1), (2, 1), (1, 1), (2, 2), (1, 2), (4, 3)])
def test_stream_floor_writes_the_sum_of_the_read_streams(capabilities, dtype, num_written, num_read):
    written, read = _streams(num_written, dtype, seed=1), _streams(num_read, dtype, seed=2)
    expected = _reference(written, read)
    read_before = [[t.clone() for t in stream] for stream in read]
    _with_threads(lambda: stream_floor(_flat(written), _flat(read), len(SIZES)))
    for got_stream, want_stream in zip(written, expected):
        for got, want in zip(got_stream, want_stream):
            assert torch.equal(got, want)
    for got_stream, want_stream in zip(read, read_before):
        for got, want in zip(got_stream, want_stream):
            assert torch.equal(got, want)  # read-only streams are not written


def test_stream_floor_read_streams_may_alias_each_other():
    (p,), (g,) = _streams(1, torch.float32, 3), _streams(1, torch.float32, 4)
    expected = [w + (r + r) for w, r in zip(p, g)]
    stream_floor(p, g + g, len(SIZES))
    assert all(torch.equal(a, b) for a, b in zip(p, expected))


def test_stream_floor_schema_and_fake_kernel():
    written, read = _streams(2, torch.float32, 5), _streams(1, torch.float32, 6)
    torch.library.opcheck(stream_floor.default, (_flat(written), _flat(read), len(SIZES)),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_calls():
    def f(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    buffer = torch.zeros(10)
    return {
        "no tensors": (lambda: stream_floor([f(3)], [f(3)], 0), "num_tensors"),
        "not whole streams": (lambda: stream_floor([f(3), f(3), f(3)], [f(3), f(3)], 2), "whole streams"),
        "no read stream": (lambda: stream_floor([f(3)], [], 1), "read streams"),
        "five written streams": (lambda: stream_floor([f(3) for _ in range(5)], [f(3)], 1), "written streams"),
        "four read streams": (lambda: stream_floor([f(3)], [f(3) for _ in range(4)], 1), "read streams"),
        "numel": (lambda: stream_floor([f(3), f(4)], [f(3), f(5)], 2), "elements"),
        "dtype": (lambda: stream_floor([f(3)], [f(3, dtype=torch.float64)], 1), "Double"),
        "integer": (lambda: stream_floor([f(3, dtype=torch.int32)], [f(3, dtype=torch.int32)], 1), "dtype"),
        "strided": (lambda: stream_floor([f(4, 4).t()], [f(4, 4)], 1), "contiguous"),
        "written is read": (lambda: stream_floor([buffer], [buffer], 1), "shares memory"),
        "written overlap": (lambda: stream_floor([buffer[:6], buffer[4:]], [f(6), f(6)], 1), "shares memory"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_stream_floor_rejects_bad_buckets(case):
    call, fragment = _bad_calls()[case]
    with pytest.raises(ValueError, match=fragment):
        call()


# ---------------------------------------------------------------- bookkeeping

STATE_STREAMS = {"exp_avg": "m", "exp_avg_sq": "v", "mu": "mu",
                 "exp_avg_absmax": "m_absmax", "exp_avg_sq_absmax": "v_absmax", "mu_absmax": "mu_absmax"}
# (Amos8bit moves Lion8bit's bytes: one floor for both)
FP8_FLOORS = sorted({bench.floor_name(a) for a in bench.FP8_ALGORITHMS})


def _tiny_model():
    return WORKLOADS["gpt2-tiny"](torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("algorithm", sorted(bench.OUR_ALGORITHMS))
def test_bytes_per_param_are_the_bytes_of_the_passes(algorithm):
    passes = bench.PASSES[algorithm]
    assert bench.algorithm_bytes(algorithm) == bench.OUR_ALGORITHMS[algorithm]
    if algorithm not in bench.FP8_ALGORITHMS:
        assert bench.bytes_per_param(passes, bench.element_size(algorithm)) == bench.OUR_ALGORITHMS[algorithm]
    streams = {name for written, read in passes for name in written + read}
    assert {"p", "g"} <= streams
    assert "g" not in {name for written, _ in passes for name in written}  # grads are only read
    assert "p" in passes[-1][0]  # the last pass writes the params


@pytest.mark.parametrize("algorithm", sorted(bench.OUR_ALGORITHMS))
def test_passes_stream_the_optimizer_state_of_the_matrices(algorithm):
    """Every param-sized state tensor of a matrix, and every FP8 state's absmax, is a
    stream of the algorithm's passes (Amos's factored slots are not param-sized and are
    left out), of the bytes `stream_bytes` says; a float32 master weight is the `p`
    stream (the bfloat16 param it writes is counted in the bytes, not as a stream)."""
    model = _tiny_model()
    optimizer = bench.make_ours(model, backend="cpu", algorithm=algorithm)
    optimizer.step()
    streams = {name for written, read in bench.PASSES[algorithm] for name in written + read} - {"p", "g"}
    for param in model.parameters():
        if param.dim() != 2:
            continue
        state = optimizer.state[param]
        master = state.get(MASTER_KEY)
        assert (master is not None) == (algorithm == "adamw-master")
        if master is not None:
            assert master.numel() * master.element_size() == bench.stream_bytes(algorithm, "p", param.numel())
        kept = {key for key, value in state.items() if isinstance(value, torch.Tensor) and key != MASTER_KEY and
                (value.shape == param.shape or key.endswith(bench.ABSMAX_SUFFIX))}
        assert {STATE_STREAMS[key] for key in kept} == streams, (algorithm, sorted(kept))
        for key in kept:
            value = state[key]
            assert value.numel() * value.element_size() == bench.stream_bytes(
                algorithm, STATE_STREAMS[key], param.numel()), (algorithm, key)


def test_every_row_reads_against_a_floor_of_its_own_bytes():
    impls = bench.all_impls("cpu", stream_floors=True)
    by_name = {i.name: i for i in impls}
    for impl in impls:
        floor = by_name[impl.floor]
        assert bench.is_floor(floor.name)
        assert floor.bytes_per_param == impl.bytes_per_param, impl.name
        if bench.is_floor(impl.name):
            assert impl.floor == impl.name
    assert {by_name[n].floor for n in ("torch-forloop-adamw", bench.TORCH_FUSED, "cpu-adamw", "cpu-radam")} == {
        "floor-adamw"}
    assert by_name["cpu-amos-momentum"].floor == "floor-lion"  # the same traffic as Lion
    assert by_name["cpu-lamb"].floor == "floor-lamb"
    # Lion8bit writes three streams as AdamW does, but not of AdamW's sizes.
    assert by_name["cpu-adamw8bit"].floor == "floor-adamw8bit"
    assert by_name["cpu-lion8bit"].floor == by_name["cpu-amos8bit"].floor == "floor-lion8bit"
    assert by_name["cpu-adamw8bit"].bytes_per_param == 16.0625
    assert by_name["cpu-lion8bit"].bytes_per_param == 14.03125
    for name, (_, _, algorithm) in bench.PEERS.items():
        if name in by_name:  # (its package is installed)
            assert by_name[name].floor == bench.floor_name(algorithm) and by_name[name].slow
    assert bench.COPY not in by_name
    # Without the op (and on GPU) the copy is every row's floor.
    assert {i.floor for i in bench.all_impls("cpu", stream_floors=False)} == {bench.COPY}
    assert {i.floor for i in bench.all_impls("cuda")} == {bench.COPY}


@pytest.mark.parametrize("floor", [i.name for i in bench.stream_floor_impls() if i.name not in FP8_FLOORS])
def test_stream_floor_rows_move_their_streams(floor):
    """One step of a floor row does its passes over the model's own params and grads:
    the written streams get the sum of the read ones, the grads stay as they were."""
    model = _tiny_model()
    algorithm = floor[len(bench.FLOOR_PREFIX):]
    passes = bench.PASSES[algorithm]
    impl = next(i for i in bench.stream_floor_impls() if i.name == floor)
    runner = impl.build(model)
    params = list(model.parameters())  # (a bfloat16 floor converts the model first)
    assert all(p.element_size() == bench.element_size(algorithm) for p in params)
    assert [t.data_ptr() for t in runner.streams["p"]] == [p.data_ptr() for p in params]
    assert [t.data_ptr() for t in runner.streams["g"]] == [p.grad.data_ptr() for p in params]
    expected = {name: [t.clone() for t in tensors] for name, tensors in runner.streams.items()}
    for written, read in passes:
        for t in range(len(params)):
            total = sum((expected[name][t] for name in read[1:]), expected[read[0]][t])
            for name in written:
                expected[name][t] = expected[name][t] + total
    runner.step()
    for name, tensors in runner.streams.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, expected[name])), name
    assert bench.bytes_per_param(passes, bench.element_size(algorithm)) == impl.bytes_per_param


def test_word_floor_calls_take_every_word_once():
    for read in range(1, 40):
        for written in range(read, 4 * read + 1):
            calls = bench.word_floor_calls(written, read)
            assert sum(w * size for w, _, size in calls) == written
            assert sum(r * size for _, r, size in calls) == read
            # shapes stream_floor takes (1 to 4 written, 1 to 3 read streams)
            assert all(size > 0 and 1 <= w <= 4 and 1 <= r <= 3 for w, r, size in calls)
    for written, read in ((41, 10), (9, 10)):
        with pytest.raises(ValueError, match="ratio"):
            bench.word_floor_calls(written, read)


def test_word_floor_of_params_that_all_keep_float32_states():
    """Params under 4096 elements only: AdamW8bit's floor is AdamW's traffic (3 written
    words per read one)."""
    model = WORKLOADS["many-small"](torch.device("cpu"), torch.float32, count=3, numel=100)
    runner = bench.WordFloor(model, "adamw8bit")
    assert runner.bytes_moved == bench.step_bytes("adamw8bit", model) == 28 * 300
    runner.step()


def test_step_bytes_of_fp8_algorithms_count_each_param():
    """Params of at least 4096 elements move codes and absmax; smaller ones keep the
    full-precision algorithm's float32 states."""
    from amos_fused import fp8_states

    model = _tiny_model()
    params = list(model.parameters())
    assert any(p.numel() < fp8_states.MIN_NUMEL for p in params) and any(
        p.numel() >= fp8_states.MIN_NUMEL for p in params)
    for algorithm, states in (("adamw8bit", 2), ("lion8bit", 1)):
        full = bench.FP8_ALGORITHMS[algorithm]
        expected = sum(
            12 * p.numel() + states * (2 * p.numel() + 8 * fp8_states.num_blocks(p.numel()))
            if p.numel() >= fp8_states.MIN_NUMEL else bench.OUR_ALGORITHMS[full] * p.numel()
            for p in params)
        assert bench.step_bytes(algorithm, model) == expected


@pytest.mark.parametrize("floor", FP8_FLOORS)
def test_word_floor_moves_the_bytes_of_the_step(floor):
    """The floor of an 8-bit algorithm: float32 words of the params, the grads and state
    buffers of the step's sizes, each word in exactly one stream of one call (written
    ones in a written stream), and a step is what stream_floor does on those calls."""
    model = _tiny_model()
    algorithm = floor[len(bench.FLOOR_PREFIX):]
    impl = next(i for i in bench.stream_floor_impls() if i.name == floor)
    runner = impl.build(model)
    assert isinstance(runner, bench.WordFloor)
    assert runner.bytes_moved == bench.step_bytes(algorithm, model) == impl.model_bytes(model)
    params = list(model.parameters())
    written_ptrs = {t.data_ptr() for t in runner.written.buffers}
    assert {p.data_ptr() for p in params} <= written_ptrs
    assert {p.grad.data_ptr() for p in params} == {t.data_ptr() for t in runner.read.buffers}

    # The pieces are views of the tape's buffers: disjoint and as many words as the tape,
    # they cover every word exactly once.
    for tape, side in ((runner.written, 0), (runner.read, 1)):
        pieces = sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel()) for call in runner.calls for t in call[side])
        assert all(end <= begin for (_, end), (begin, _) in zip(pieces, pieces[1:]))
        assert sum(end - begin for begin, end in pieces) == 4 * len(tape)
        buffers = [(t.data_ptr(), t.data_ptr() + 4 * t.numel()) for t in tape.buffers]
        assert all(any(b <= begin and end <= e for b, e in buffers) for begin, end in pieces)
    expected = []
    for written, read, n in runner.calls:
        sums = [sum(read[k * n + t] for k in range(1, len(read) // n)) + read[t] for t in range(n)]
        expected.append([w + sums[i % n] for i, w in enumerate(written)])
    runner.step()
    for (written, _, _), want in zip(runner.calls, expected):
        assert all(torch.equal(a, b) for a, b in zip(written, want))


def test_state_bytes_count_codes_absmax_and_shared_tensors_once():
    from amos_fused import fp8_states

    model = _tiny_model()
    optimizer = bench.make_ours(model, backend="cpu", algorithm="adamw8bit")
    optimizer.step()
    expected = sum(2 * (p.numel() + 4 * fp8_states.num_blocks(p.numel())) if fp8_states.keeps_fp8(p)
                   else 8 * p.numel() for p in model.parameters())
    assert bench.state_bytes(optimizer) == expected

    class Shared:  # a lookup table shared by two params' states counts once
        table = torch.zeros(256)
        state = {0: {"step": torch.zeros(()), "codes": torch.zeros(10, dtype=torch.uint8), "qmap": table},
                 1: {"codes": torch.zeros(20, dtype=torch.uint8), "qmap": table}}

    assert bench.state_bytes(Shared()) == 30 + 4 * 256


def test_state_bytes_of_a_tensor_subclass_count_its_inner_tensors():
    """torchao keeps an 8-bit state as a tensor subclass: codes, one scale per block and
    its lookup table count, not the float32 values it stands for."""
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    class One:
        state = {0: {"exp_avg": OptimState8bit.zeros((64, 64), True, 256, "cpu")}}

    assert bench.state_bytes(One()) == 4096 + 4 * 16 + 4 * 256


def test_adamw8bit_state_is_at_most_27_percent_of_adamw_on_the_default_workload():
    model = WORKLOADS[bench.DEFAULT_WORKLOAD["cpu"]](torch.device("cpu"), torch.float32)
    params = sum(p.numel() for p in model.parameters())
    optimizer = bench.make_ours(model, backend="cpu", algorithm="adamw8bit")
    optimizer.step()
    fraction = bench.state_bytes(optimizer) / (8 * params)  # AdamW: m and v in float32
    assert 0.25 < fraction <= 0.27


def test_peer_rows_are_skipped_with_a_line_when_their_package_is_missing(monkeypatch, capsys):
    for module in ("bitsandbytes", "torchao", "torchao.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    assert bench.peer_impls(stream_floors=True) == []
    err = capsys.readouterr().err
    for name in bench.PEERS:
        assert f"skipping {name}:" in err
    assert "pip install bitsandbytes==" in err and "pip install torchao==" in err
    names = [i.name for i in bench.all_impls("cpu", stream_floors=True)]
    assert "cpu-adamw8bit" in names and not set(bench.PEERS) & set(names)


def test_peer_rows_when_installed():
    impls = {i.name: i for i in bench.all_impls("cpu", stream_floors=True)}
    assert not set(bench.PEERS) & {i.name for i in bench.all_impls("cpu", stream_floors=True, peers=False)}
    for name, (package, _, algorithm) in bench.PEERS.items():
        if bench.peer_missing(name) is None:
            impl = impls[name]
            assert impl.floor == bench.floor_name(algorithm)
            assert impl.bytes_per_param == impls[impl.floor].bytes_per_param
            assert impl.slow and impl.model_bytes is not None


def test_bnb_adamw8bit_row_keeps_the_bytes_of_adamw8bit():
    """bitsandbytes' 8-bit states: uint8 codes and one float32 absmax per 256 elements
    (float32 states under 4096 elements), as ours, plus its two shared 256-entry maps."""
    pytest.importorskip("bitsandbytes")
    if bench.peer_missing("bnb-adamw8bit"):
        pytest.skip(bench.peer_missing("bnb-adamw8bit"))
    model = _tiny_model()
    ours = bench.make_ours(_tiny_model(), backend="cpu", algorithm="adamw8bit")
    ours.step()
    optimizer = bench.make_bnb_adamw8bit(model)
    optimizer.step()
    assert bench.state_bytes(optimizer) == bench.state_bytes(ours) + 2 * 256 * 4


def test_slow_rows_take_fewer_steps():
    calls = []

    class Step:
        def step(self):
            calls.append(1)

    impl = bench.Impl("slow", 4, lambda model: Step(), slow=True)
    m = bench.measure(impl, WORKLOADS["gpt2-tiny"], torch.device("cpu"), warmup=3, steps=10)
    assert len(m["times"]) == bench.SLOW_STEPS and len(calls) == bench.SLOW_WARMUP + bench.SLOW_STEPS
    # ... and in the first SLOW_ROUNDS rounds only; pooled with the rows of every round
    fast = bench.Impl("fast", 4, lambda model: Step())
    args = bench.parse_args(["--rounds", "3", "--steps", "5", "--warmup", "0"])
    rounds = bench.run_rounds([fast, impl], WORKLOADS["gpt2-tiny"], torch.device("cpu"), args)
    assert [len(r) for r in rounds] == [2] * bench.SLOW_ROUNDS + [1] * (3 - bench.SLOW_ROUNDS)
    pooled = {m["impl"].name: m for m in bench.pool_rounds(rounds)}
    assert list(pooled) == ["fast", "slow"]
    assert len(pooled["fast"]["times"]) == 15 and len(pooled["slow"]["times"]) == bench.SLOW_ROUNDS * bench.SLOW_STEPS


def _measurement(impl, ms, params=1000, tensors=3, state=None):
    return dict(impl=impl, times=[ms], ms=ms, params=params, tensors=tensors, state_bytes=state)


def test_result_rows_read_each_row_against_its_floor():
    impls = {i.name: i for i in bench.all_impls("cpu", stream_floors=True)}
    ms = {bench.TORCH_FUSED: 4.0, "cpu-amos": 2.0, "cpu-lamb": 12.0,
          "floor-adamw": 3.0, "floor-amos": 1.5, "floor-lamb": 10.0}
    rows = {r["impl"]: r for r in bench.result_rows(
        [_measurement(impls[name], value) for name, value in ms.items()], "w")}
    assert rows["cpu-amos"]["floor"] == "floor-amos"
    assert rows["cpu-amos"]["fraction_of_floor"] == pytest.approx(1.5 / 2.0, abs=1e-4)
    assert rows["cpu-lamb"]["fraction_of_floor"] == pytest.approx(10.0 / 12.0, abs=1e-4)
    assert rows[bench.TORCH_FUSED]["fraction_of_floor"] == pytest.approx(3.0 / 4.0, abs=1e-4)
    assert rows["cpu-amos"]["gbps"] == pytest.approx(12 * 1000 / 2e-3 / 1e9, rel=1e-3)
    assert rows["cpu-amos"]["floor_gbps"] == pytest.approx(12 * 1000 / 1.5e-3 / 1e9, rel=1e-3)
    assert rows["floor-lamb"]["fraction_of_floor"] == 1.0
    assert rows["cpu-lamb"]["bytes_per_param"] == 40
    assert all(r["copy_gbps"] is None and r["fraction_of_copy_bandwidth"] is None for r in rows.values())

    # With the copy as floor (GPU), the copy keys are filled and equal the floor keys.
    impls = {i.name: i for i in bench.torch_impls() + [bench.copy_impl()]}
    rows = bench.result_rows([_measurement(impls[bench.TORCH_FUSED], 4.0), _measurement(impls[bench.COPY], 2.0)],
                             "w")
    assert rows[0]["floor"] == bench.COPY
    assert rows[0]["fraction_of_copy_bandwidth"] == rows[0]["fraction_of_floor"] == pytest.approx(0.5)
    assert rows[0]["copy_gbps"] == rows[0]["floor_gbps"]


def test_select_impls_keeps_the_floors_of_the_chosen_rows():
    impls = bench.all_impls("cpu", stream_floors=True)
    chosen = [i.name for i in bench.select_impls(impls, "cpu-lamb, cpu-amos-momentum")]
    assert chosen == [bench.TORCH_FUSED, "cpu-amos-momentum", "cpu-lamb", "floor-adamw", "floor-lion", "floor-lamb"]
    with pytest.raises(SystemExit, match="unknown"):
        bench.select_impls(impls, "cpu-sgd")
    for nothing in (" , ", ""):
        with pytest.raises(SystemExit, match="name at least one"):
            bench.select_impls(impls, nothing)
    assert bench.select_impls(impls, None) == impls  # (no --impls: every row)


def test_table_names_each_floor_and_its_rows():
    impls = {i.name: i for i in bench.all_impls("cpu", stream_floors=True)}
    rows = bench.result_rows([_measurement(impls[bench.TORCH_FUSED], 4.0, state=100),
                              _measurement(impls["cpu-amos-momentum"], 3.0, state=50),
                              _measurement(impls["floor-adamw"], 3.0), _measurement(impls["floor-lion"], 2.0)], "w")
    memory = bench.memory_rows([_measurement(impls[bench.TORCH_FUSED], 4.0, state=100)])
    table = bench.format_table(rows, memory, ["header"], None)
    assert "% of floor" in table
    assert "floor-lion: p, m += g in float32, 20 B/param; floor of cpu-amos-momentum" in table
    assert "floor-adamw: p, m, v += g in float32, 28 B/param; floor of torch-fused-adamw" in table


# ---------------------------------------------------------------- the command


def _tiny_args(*extra):
    return ["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
            "--impls", "cpu-adamw,cpu-amos", *extra]


def test_bench_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "result.json"
    bench.main(_tiny_args("--json", str(path), "--plot"))
    document = json.loads(path.read_text())
    rows = {r["impl"]: r for r in document["results"]}
    assert set(rows) == {bench.TORCH_FUSED, "cpu-adamw", "cpu-amos", "floor-adamw", "floor-amos"}
    for row in rows.values():
        assert rows[row["floor"]]["bytes_per_param"] == row["bytes_per_param"]
        # (stored rounded to 4 decimals)
        assert row["fraction_of_floor"] == pytest.approx(rows[row["floor"]]["ms"] / row["ms"], rel=1e-2, abs=1e-4)
    png = tmp_path / "result.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_8bit_rows(tmp_path):
    """The 8-bit rows and their floors: bytes counted param by param on the workload,
    the same for a row and its floor; state bytes per param in the memory table."""
    path = tmp_path / "result.json"
    bench.main(["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--impls", "cpu-adamw8bit,cpu-lion8bit", "--json", str(path)])
    document = json.loads(path.read_text())
    rows = {r["impl"]: r for r in document["results"]}
    assert set(rows) == {bench.TORCH_FUSED, "cpu-adamw8bit", "cpu-lion8bit",
                         "floor-adamw", "floor-adamw8bit", "floor-lion8bit"}
    model = _tiny_model()
    params = sum(p.numel() for p in model.parameters())
    for name, algorithm in (("cpu-adamw8bit", "adamw8bit"), ("cpu-lion8bit", "lion8bit")):
        row = rows[name]
        assert row["floor"] == "floor-" + algorithm
        assert row["bytes_per_param"] == round(bench.step_bytes(algorithm, model) / params, 4)
        assert row["bytes_per_param"] == rows[row["floor"]]["bytes_per_param"]
        assert bench.OUR_ALGORITHMS[algorithm] < row["bytes_per_param"] < bench.OUR_ALGORITHMS[algorithm] + 0.2
        assert row["ratio_vs_torch_fused"] > 0 and row["samples"] == 1
    memory = {m["impl"]: m for m in document["memory"]}
    assert memory[bench.TORCH_FUSED]["state_bytes_per_param"] == 8
    assert 2 < memory["cpu-adamw8bit"]["state_bytes_per_param"] < 2.2  # codes + absmax (+ small params)
    assert memory["cpu-adamw8bit"]["fraction_of_adamw"] < 0.28


def test_plot_path_without_json(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "bench.png"
    bench.main(_tiny_args("--no-json", "--plot", str(path)))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("**/*.json"))


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError

    def must_not_run(*args, **kwargs):
        raise AssertionError("timed before checking for matplotlib")

    monkeypatch.setattr(bench, "run_rounds", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        bench.main(_tiny_args("--no-json", "--plot"))
    message = str(exit_.value.code)
    assert "matplotlib" in message and "pip install" in message and ".[plot]" in message


def test_progress_falls_back_to_text_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)

    class Step:
        def step(self):
            pass

    impl = bench.Impl("dummy", 4, lambda model: Step())
    args = bench.parse_args(["--rounds", "2", "--steps", "1", "--warmup", "0"])
    rounds = bench.run_rounds([impl], WORKLOADS["gpt2-tiny"], torch.device("cpu"), args)
    assert len(rounds) == 2 and all(len(r) == 1 for r in rounds)
    err = capsys.readouterr().err
    assert "0/2 round 1/2: dummy" in err and "1/2 round 2/2: dummy" in err and "2/2 done" in err
    assert bench._progress is None  # log() prints plainly again afterwards


def test_a_peer_that_raises_is_dropped(capsys):
    class Step:
        def step(self):
            pass

    def broken(model):
        raise RuntimeError("no compiler")

    impls = [bench.Impl("fine", 4, lambda model: Step()), bench.Impl("peer", 4, broken, slow=True)]
    args = bench.parse_args(["--rounds", "2", "--steps", "1", "--warmup", "0"])
    rounds = bench.run_rounds(impls, WORKLOADS["gpt2-tiny"], torch.device("cpu"), args)
    assert [[m["impl"].name for m in r] for r in rounds] == [["fine"], ["fine"]]
    assert "dropping peer: it raised RuntimeError: no compiler" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # not a peer: the run stops
        bench.run_rounds([bench.Impl("ours", 4, broken)], WORKLOADS["gpt2-tiny"], torch.device("cpu"), args)


def test_a_cuda_graph_row_that_raises_is_dropped_and_every_round_keeps_the_others(capsys):
    class Step:
        def step(self):
            pass

    def capture_fails(model):
        raise RuntimeError("operation not permitted when stream is capturing")

    impls = [bench.Impl("fine", 4, lambda model: Step()),
             bench.Impl("triton-adamw-graph", 28, capture_fails, optional=True)]
    args = bench.parse_args(["--rounds", "2", "--steps", "1", "--warmup", "0"])
    rounds = bench.run_rounds(impls, WORKLOADS["gpt2-tiny"], torch.device("cpu"), args)
    assert [[m["impl"].name for m in r] for r in rounds] == [["fine"], ["fine"]]
    assert "dropping triton-adamw-graph: it raised RuntimeError" in capsys.readouterr().err


def test_cuda_graph_rows_are_offered_on_gpus_only_and_are_optional():
    """On a GPU each fused backend gets CUDA-graph rows of AdamW and Amos (capturable
    steps replayed: the kernels' time without the host's), beside torch's fused AdamW
    captured the same way; on CPU there are none."""
    backends = [b for b in bench.OUR_BACKENDS["cuda"] if b in af.available_backends()]
    cuda = {i.name: i for i in bench.all_impls("cuda", peers=False)}
    graph = {name: impl for name, impl in cuda.items() if name.endswith(bench.GRAPH_SUFFIX)}
    expected = {bench.TORCH_FUSED + bench.GRAPH_SUFFIX} | {
        f"{b}-{a}{bench.GRAPH_SUFFIX}" for b in backends for a in bench.GRAPH_ALGORITHMS}
    assert set(graph) == (expected if backends else set())
    assert all(impl.optional and not impl.slow for impl in graph.values())
    assert all(graph[f"{b}-amos-graph"].bytes_per_param == bench.OUR_ALGORITHMS["amos"] for b in backends)
    assert not any(i.name.endswith(bench.GRAPH_SUFFIX) for i in bench.all_impls("cpu", stream_floors=False))


def test_progress_uses_tqdm_when_installed():
    pytest.importorskip("tqdm")
    bar = bench.progress_bar(1)
    try:
        assert isinstance(bar, bench._TqdmBar)
    finally:
        bar.close()


def test_plot_extra_is_declared():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert set(extras["plot"]) == {"matplotlib", "tqdm"}
    assert ".[plot]" in bench.PLOT_EXTRA_HINT


def test_telemetry_pairs_are_the_chosen_rows_with_their_plain_row():
    impls = bench.select_impls(bench.all_impls("cpu", peers=False), "cpu-amos,cpu-amos+rms,cpu-adamw+rms")
    pairs = [(plain.name, tracked.name) for plain, tracked in bench.telemetry_pairs(impls)]
    assert pairs == [("cpu-amos", "cpu-amos+rms")]  # cpu-adamw was not chosen


def test_paired_cost_swaps_which_optimizer_tracks(monkeypatch):
    """Two optimizers of the plain row step in alternation (order swapped every pair),
    the first tracking for half the pairs and the second for the rest (warm-up steps
    after each switch); the ratio is the geometric mean of the halves' medians of
    tracked ms / plain ms, which cancels a difference between the two optimizers."""
    from amos_fused import bench_paired

    calls, now = [], [0.0]

    class Recorded:  # optimizer 1 takes twice as long as optimizer 0; tracking adds 10%
        def __init__(self, index):
            self.index, self.param_groups = index, [{"track_rms": False}]

        def step(self):
            tracking = self.param_groups[0]["track_rms"]
            calls.append((self.index, tracking))
            now[0] += (2.0 if self.index else 1.0) * (1.1 if tracking else 1.0)

    built = iter(range(2))
    plain = bench.Impl("a", 12, lambda model: Recorded(next(built)))
    monkeypatch.setattr(bench_paired.time, "perf_counter", lambda: now[0] * 1e-3)
    cost = bench_paired.paired_cost(plain, bench.Impl("a+rms", 12, plain.build), WORKLOADS["gpt2-tiny"],
                                    torch.device("cpu"), torch.float32, warmup=1, pairs=4)
    assert calls == ([(0, True), (1, False)] + [(0, True), (1, False), (1, False), (0, True)]
                     + [(0, False), (1, True)] + [(0, False), (1, True), (1, True), (0, False)])
    assert cost["ratio_halves"] == pytest.approx([1.1 / 2, 2.2])
    assert cost["ratio"] == pytest.approx(1.1) and cost["pairs"] == 4
    assert (cost["impl"], cost["baseline"]) == ("a+rms", "a")
    with pytest.raises(ValueError, match="not 'a' with telemetry"):
        bench_paired.paired_cost(plain, bench.Impl("b+rms", 12, plain.build), WORKLOADS["gpt2-tiny"],
                                 torch.device("cpu"), torch.float32, warmup=0, pairs=2)


def test_bench_reports_the_telemetry_cost(tmp_path, capsys):
    path = tmp_path / "result.json"
    bench.main(["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--impls", "cpu-amos,cpu-amos+rms", "--pairs", "3", "--json", str(path)])
    (cost,) = json.loads(path.read_text())["telemetry_cost"]
    assert (cost["impl"], cost["baseline"], cost["pairs"]) == ("cpu-amos+rms", "cpu-amos", 3)
    assert cost["ratio"] > 0 and len(cost["ratio_halves"]) == 2
    assert "telemetry cost (track_rms)" in capsys.readouterr().out
    bench.main(["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--impls", "cpu-amos,cpu-amos+rms", "--pairs", "0", "--json", str(path)])
    assert json.loads(path.read_text())["telemetry_cost"] == []
    for bad in ("-1", "1"):  # (one pair has no second half to cancel the order's bias)
        with pytest.raises(SystemExit):
            bench.parse_args(["--pairs", bad])


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be in [1, 4096]"),
    (["--threads", "-2"], "--threads must be in [1, 4096]"),
    (["--threads", "100000"], "--threads must be in [1, 4096]"),
    (["--json", "/proc/no-such-folder/result.json"], "cannot write there"),
    (["--plot", "/proc/no-such-folder/chart.png"], "--plot /proc/no-such-folder/chart.png: cannot write there"),
    (["--plot", "/tmp"], "--plot /tmp: a folder, not a file"),
    (["--plot", "/tmp/no-such-folder-yet/"], "--plot /tmp/no-such-folder-yet/: a folder, not a file"),
    (["--plot", "/tmp/chart.txt"], "--plot /tmp/chart.txt: matplotlib writes none of that kind"),
    (["--plot", "/tmp/chart.pgf"], "--plot /tmp/chart.pgf: matplotlib writes none of that kind"),
    (["--json", "/tmp/no-such-folder-yet/"], "--json '/tmp/no-such-folder-yet/': cannot write there"),
    (["--json", ""], "--json '': cannot write there"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]))
def test_bad_command_lines_are_refused_before_the_benchmark_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_plot_path_without_a_suffix_is_the_png_written(tmp_path):
    assert bench.parse_args(["--plot", str(tmp_path / "chart")]).plot == str(tmp_path / "chart.png")


def test_a_json_path_in_a_new_folder_is_accepted(tmp_path):
    assert bench.parse_args(["--json", str(tmp_path / "new" / "result.json")]).json.endswith("result.json")


def test_paired_speedup_alternates_the_row_and_torch_fused(monkeypatch):
    """The row and torch's fused AdamW step in alternation, the order swapped every
    pair; the speed-up is the median of torch ms / row ms."""
    from amos_fused import bench_paired

    calls, now = [], [0.0]

    class Recorded:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def step(self):
            calls.append(self.name)
            now[0] += self.ms.pop(0) if isinstance(self.ms, list) else self.ms

    row = bench.Impl("row", 16, lambda model: Recorded("row", [9.0, 1.0, 1.0, 1.0, 2.0]))
    torch_fused = bench.Impl(bench.TORCH_FUSED, 28, lambda model: Recorded("torch", 3.0))
    monkeypatch.setattr(bench_paired.time, "perf_counter", lambda: now[0] * 1e-3)
    result = bench_paired.paired_speedup(row, torch_fused, WORKLOADS["gpt2-tiny"], torch.device("cpu"),
                                         torch.float32, warmup=1, pairs=4)
    assert calls == ["row", "torch"] + ["row", "torch", "torch", "row", "row", "torch", "torch", "row"]
    assert result["speedup"] == pytest.approx(3.0)  # ratios 3, 3, 3, 1.5 (the warm-up's 9 ms not timed)
    assert result["ms"] == pytest.approx(1.0) and result["baseline_ms"] == pytest.approx(3.0)
    assert (result["impl"], result["baseline"], result["pairs"]) == ("row", bench.TORCH_FUSED, 4)
    assert result["quartiles"][0] <= result["speedup"] <= result["quartiles"][1]


def test_bench_reports_paired_speedups_of_our_rows_only(tmp_path, capsys):
    path = tmp_path / "result.json"
    bench.main(["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--impls", "cpu-lion8bit,cpu-amos,cpu-amos+rms", "--pairs", "0", "--speedup-pairs", "3",
                "--json", str(path)])
    speedups = json.loads(path.read_text())["paired_speedup"]
    assert sorted(s["impl"] for s in speedups) == ["cpu-amos", "cpu-lion8bit"]  # not the +rms row, nor torch's
    assert all(s["baseline"] == bench.TORCH_FUSED and s["pairs"] == 3 and s["speedup"] > 0 for s in speedups)
    assert "speed-up over torch's fused AdamW, in pairs" in capsys.readouterr().out
    bench.main(["--workload", "gpt2-tiny", "--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--impls", "cpu-lion8bit", "--pairs", "0", "--speedup-pairs", "0", "--json", str(path)])
    assert json.loads(path.read_text())["paired_speedup"] == []
    for bad in ("-1", "1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--speedup-pairs", bad])
