#!/usr/bin/env bash
# The GPU run, in two calls of the GPU machine (each well under its 600 s limit; the
# second while the machine is still warm keeps the first's build).  Each phase runs
# under its own `timeout` and writes its log to $OUT before the next starts, so a
# phase that fails or hangs loses nothing of the others.  A failed smoke phase does
# not stop the run: the benchmark then times Triton's rows and torch's only (a CUDA
# kernel that faults would end the benchmark's process).
#
#   BUDGET=390 bash bench/gpu_run.sh first    build, smoke, bench                ~6 min
#   BUDGET=300 bash bench/gpu_run.sh second   (build if missing), tests, sanitize  the budget
#   BUDGET=500 bash bench/gpu_run.sh all      build, smoke, bench, then tests in what is left
#
# Seen on the H200 machine (2026-12-04, bench/results/gpu-run-nvidia-h200-2026-12-04/): a
# fresh machine in ~30 s, build 138 s, gpt2-medium bench 30 s (Triton's and torch's rows),
# many-small ~10 s per row, the tests 157 s.
#
# or one phase at a time:
#   bash bench/gpu_run.sh build     ~2-3 min  the extension with CUDA kernels (sm_90), in place; import check
#   bash bench/gpu_run.sh probe     ~20 s     bench/raise_probe.py: do the ops' refusals raise (CPU op,
#                                             host op on CUDA tensors, CUDA op), the toolchain's facts
#   bash bench/gpu_run.sh smoke     ~1 min    fail-fast (-x, CUDA_LAUNCH_BLOCKING=1): the ops dispatch,
#                                             found_inf, misaligned views, another stream, bad input,
#                                             fp32 AdamW and Amos against the reference
#   bash bench/gpu_run.sh bench     ~3 min    python3 -m amos_fused.bench: (a) gpt2-medium (355M fp32
#                                             params, every row), (b) many-small (20,000 tensors of
#                                             4,096 elements: AdamW, Amos and torch's rows, and the
#                                             CUDA-graph rows of AdamW); one JSON each; the Amos rows
#                                             of (a) are workload (c)
#   bash bench/gpu_run.sh tests     ~5 min    every CUDA and Triton test file (GPU_TESTS) over 8 worker
#                                             processes (pytest-xdist), 90 s per test, stopped with
#                                             SIGINT at its time limit so pytest still prints its
#                                             summary of failures
#   bash bench/gpu_run.sh sanitize  ~2 min    compute-sanitizer memcheck on a small CUDA subset
#
# The GPU machine: python3 with torch 2.11.0+cu130 and triton 3.6.0 preinstalled, nvcc 13.0,
# ninja, pytest-xdist, pytest-timeout, no internet.  Files in $OUT (default
# bench/results/gpu-run), at most 8 per call: summary.txt, build.log (build-no-cuda.log), smoke.log, bench.log,
# bench-gpt2-medium.json, bench-many-small.json; tests.log, sanitizer.log.
# Exit status: non-zero when a phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PHASE="${1:-}"
OUT="${OUT:-bench/results/gpu-run}"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-470}"
mkdir -p "$OUT"
note() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

# Every test file whose cases step CUDA tensors on a GPU.
GPU_TESTS=(tests/test_cuda_capturable.py tests/test_triton_capturable.py tests/test_cuda.py
           tests/test_triton.py tests/test_triton_fp8.py tests/test_triton_amos8bit.py
           tests/test_triton_stochastic_round.py tests/test_triton_master_weights.py
           tests/test_triton_telemetry.py)
# Triton's rows of the benchmark and torch's (what the benchmark times when the CUDA
# kernels failed the smoke phase).
TRITON_ROWS="torch-forloop-adamw,torch-foreach-adamw,torch-fused-adamw"
TRITON_ROWS="$TRITON_ROWS,triton-adamw,triton-radam,triton-lion,triton-amos,triton-amos-momentum"
TRITON_ROWS="$TRITON_ROWS,triton-scaled-adamw,triton-lamb,triton-adamw-bf16-sr"
# (and the CUDA-graph rows: capturable steps replayed, the kernels' time without the host's)
TRITON_ROWS="$TRITON_ROWS,torch-fused-adamw-graph,triton-adamw-graph,triton-amos-graph"

build() {  # $1: seconds; $2: "no-cuda" for the CPU kernels only (AMOS_FUSED_NO_CUDA=1)
  local start=$SECONDS status log="$OUT/build.log" want_cuda=1
  if [[ "${2:-}" == no-cuda ]]; then log="$OUT/build-no-cuda.log"; want_cuda=0; export AMOS_FUSED_NO_CUDA=1; fi
  # torch looks for the toolkit beside the nvcc on PATH; the toolkit's own folder first.
  if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
  note "build (TORCH_CUDA_ARCH_LIST=9.0, in place${2:+, $2}, CUDA_HOME=${CUDA_HOME:-unset})"
  { "${CXX:-c++}" --version | head -1; command -v "${CXX:-c++}"; } 2>&1 | tee -a "$OUT/summary.txt"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout "${1:-300}" "$PYTHON" setup.py build_ext --inplace \
    > "$log" 2>&1
  status=$?
  note "build exit status $status in $((SECONDS - start))s"
  [[ $status -eq 0 ]] || { tail -40 "$log"; return 1; }
  # Fails (status 3) when the build left the CUDA kernels out (no CUDA toolkit found).
  timeout 60 "$PYTHON" -c "import sys, torch, triton, amos_fused; \
print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__); \
print('built_with_cuda', torch.ops.amos_fused.built_with_cuda(), \
'available_backends', amos_fused.available_backends()); \
sys.exit(0 if torch.ops.amos_fused.built_with_cuda() or not $want_cuda else 3)" 2>&1 | tee -a "$OUT/summary.txt"
  return "${PIPESTATUS[0]}"
}

# Whether the compiled ops' refusals reach Python as exceptions (bench/raise_probe.py:
# one child process per probe, so a segfault names its case), with the toolchain's
# facts; a probe killed by a signal runs again under cuda-gdb for the C++ backtrace.
probe() {
  note "raise probe"
  local report status killed
  report="$(timeout "${1:-120}" "$PYTHON" bench/raise_probe.py 2>&1)"
  status=$?
  echo "$report" | tee -a "$OUT/summary.txt"
  killed="$(echo "$report" | grep -m1 'killed by signal' | sed 's/: killed by signal.*//')"
  if [[ -n "$killed" ]] && command -v cuda-gdb > /dev/null; then
    note "probe '$killed' again under cuda-gdb"
    timeout 60 cuda-gdb -q -batch -ex run -ex bt --args "$PYTHON" bench/raise_probe.py --run "$killed" 2>&1 \
      | grep -v -E '^\[(New|Thread|Detaching)' | tail -40 >> "$OUT/summary.txt"
  fi
  note "raise probe exit status $status"
  return "$status"
}

smoke() {
  note "smoke (fail-fast)"
  local subset="ops_dispatch or found_inf or misaligned or another_stream or bad_input"
  subset="$subset or (cuda_matches_reference and adamw and f32) or (amos_matches_reference and f32)"
  CUDA_LAUNCH_BLOCKING=1 timeout "${1:-180}" "$PYTHON" -m pytest -x -q -p no:cacheprovider \
    tests/test_cuda.py -k "$subset" > "$OUT/smoke.log" 2>&1
  local status=$?
  note "smoke exit status $status: $(tail -1 "$OUT/smoke.log")"
  if [[ $status -ge 128 && $status -ne 137 ]] && command -v cuda-gdb > /dev/null; then
    # killed by a signal (a segfault): the same run under cuda-gdb, for the C++ backtrace
    note "smoke again under cuda-gdb (backtrace at the end of smoke.log)"
    timeout 90 cuda-gdb -q -batch -ex run -ex bt --args "$PYTHON" -m pytest -x -q -p no:cacheprovider \
      tests/test_cuda.py -k "$subset" >> "$OUT/smoke.log" 2>&1
  fi
  return "$status"
}

bench_one() {  # $1: workload, $2: seconds, then extra options
  local workload="$1" seconds="$2" status
  shift 2
  note "bench $workload $*"
  echo "== bench $workload $*" >> "$OUT/bench.log"
  timeout "$seconds" "$PYTHON" -m amos_fused.bench --device cuda --workload "$workload" \
    --json "$OUT/bench-$workload.json" "$@" >> "$OUT/bench.log" 2>&1
  status=$?
  note "bench $workload exit status $status"
  return "$status"
}

bench() {  # $1: "triton" to time Triton's and torch's rows only
  local status=0 rows=()
  local small="torch-foreach-adamw,torch-fused-adamw,triton-adamw,triton-amos,torch-fused-adamw-graph,triton-adamw-graph"
  if [[ "${1:-}" == triton ]]; then rows=(--impls "$TRITON_ROWS"); else small="$small,cuda-adamw,cuda-amos,cuda-adamw-graph"; fi
  bench_one gpt2-medium "${2:-240}" --rounds 2 --pairs 10 --speedup-pairs 20 "${rows[@]}" || status=1
  # (many-small: ~10 s per row on the H200 machine, host-bound: one round, few steps)
  bench_one many-small "${3:-150}" --rounds 1 --steps 3 --warmup 1 --pairs 0 --speedup-pairs 4 \
    --impls "$small" || status=1
  return "$status"
}

tests() {
  local seconds="${1:-540}"
  note "tests (8 workers, 90 s per test, $seconds s in all)"
  timeout -s INT -k 20 "$seconds" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider -n 8 --timeout 90 \
    "${GPU_TESTS[@]}" > "$OUT/tests.log" 2>&1
  local status=$?
  note "tests exit status $status: $(tail -1 "$OUT/tests.log")"
  return "$status"
}

sanitize() {
  local sanitizer status
  sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  local subset="three_hundred or misaligned or (amos_matches_reference and f32) or (cuda_matches_reference and f32)"
  note "compute-sanitizer memcheck"
  timeout "${1:-540}" "$sanitizer" --tool memcheck --error-exitcode 99 "$PYTHON" -m pytest -q -x \
    -p no:cacheprovider tests/test_cuda.py -k "$subset" > "$OUT/sanitizer.log" 2>&1
  status=$?
  note "memcheck exit status $status"
  return "$status"
}

left() { echo $((BUDGET - SECONDS)); }
at_least() { echo $(( $2 > $1 ? $2 : $1 )); }

# build, smoke, bench (the `first` call and the start of `all`); returns non-zero when
# any failed.  A failed CUDA build falls back to a CPU-only one for Triton's rows.
build_smoke_bench() {  # $1: seconds for the build, $2: for the smoke run
  if ! build "$1"; then
    build 200 no-cuda || return 2
    bench triton 170 110
    return 1
  fi
  probe 90
  if smoke "$2"; then bench "" 170 110; else bench triton 170 110; return 1; fi
}

case "$PHASE" in
  first)
    SECONDS=0
    build_smoke_bench 240 90
    status=$?
    note "first: exit status $status after ${SECONDS}s"
    exit "$status"
    ;;
  all)  # first, then the tests in what is left of the budget (one call, when only one is left)
    SECONDS=0
    build_smoke_bench 200 60
    status=$?
    [[ $status -eq 2 ]] && exit 1  # nothing built
    tests "$(at_least 30 $(( $(left) - 15 )))" || status=1
    note "all: exit status $status after ${SECONDS}s"
    exit "$status"
    ;;
  second)
    SECONDS=0
    status=0
    if ! "$PYTHON" -c "import torch, amos_fused, sys; sys.exit(0 if torch.ops.amos_fused.built_with_cuda() else 1)" \
        2>/dev/null; then
      build 240 || exit 1
    fi
    tests "$(at_least 60 $(( $(left) - 100 )))" || status=1
    sanitize "$(at_least 30 $(( $(left) - 10 )))" || status=1
    note "second: exit status $status after ${SECONDS}s"
    exit "$status"
    ;;
  build) build ;;
  probe) probe ;;
  smoke) smoke ;;
  bench) bench ;;
  tests) tests ;;
  sanitize) sanitize ;;
  *)
    echo "usage: bash bench/gpu_run.sh first|second|all|build|probe|smoke|bench|tests|sanitize  (see the top of this file)" >&2
    exit 2
    ;;
esac
