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

import amos_fused.bench as bench
from amos_fused.bench_workloads import WORKLOADS
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

STATE_STREAMS = {"exp_avg": "m", "exp_avg_sq": "v", "mu": "mu"}


def _tiny_model():
    return WORKLOADS["gpt2-tiny"](torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("algorithm", sorted(bench.OUR_ALGORITHMS))
def test_bytes_per_param_are_the_bytes_of_the_passes(algorithm):
    passes = bench.PASSES[algorithm]
    assert bench.bytes_per_param(passes, bench.element_size(algorithm)) == bench.OUR_ALGORITHMS[algorithm]
    streams = {name for written, read in passes for name in written + read}
    assert {"p", "g"} <= streams
    assert "g" not in {name for written, _ in passes for name in written}  # grads are only read
    assert "p" in passes[-1][0]  # the last pass writes the params


@pytest.mark.parametrize("algorithm", sorted(bench.OUR_ALGORITHMS))
def test_passes_stream_the_optimizer_state_of_the_matrices(algorithm):
    """Every param-sized state tensor of a matrix is a stream of the algorithm's passes
    (Amos's factored slots are not param-sized and are left out)."""
    model = _tiny_model()
    optimizer = bench.make_ours(model, backend="cpu", algorithm=algorithm)
    optimizer.step()
    streams = {name for written, read in bench.PASSES[algorithm] for name in written + read} - {"p", "g"}
    for param in model.parameters():
        if param.dim() != 2:
            continue
        full = {key for key, value in optimizer.state[param].items()
                if isinstance(value, torch.Tensor) and value.shape == param.shape}
        assert {STATE_STREAMS[key] for key in full} == streams, (algorithm, sorted(full))


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
    assert bench.COPY not in by_name
    # Without the op (and on GPU) the copy is every row's floor.
    assert {i.floor for i in bench.all_impls("cpu", stream_floors=False)} == {bench.COPY}
    assert {i.floor for i in bench.all_impls("cuda")} == {bench.COPY}


@pytest.mark.parametrize("floor", [i.name for i in bench.stream_floor_impls()])
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
