#!/usr/bin/env bash
# The GPU run, in phases: one call per phase, each well under the 600 s a command
# may take on the GPU machine (every step inside has its own `timeout`), each
# writing its log to $OUT before the next starts, so no phase can lose another's
# results.  Written on a machine without a GPU: not run on one yet.
#
#   bash bench/gpu_run.sh build     ~3-5 min  build the extension with CUDA kernels (sm_90); import check
#   bash bench/gpu_run.sh smoke     ~1 min    fail-fast (-x, CUDA_LAUNCH_BLOCKING=1): the ops dispatch,
#                                             found_inf, misaligned views, another stream, bad input,
#                                             fp32 AdamW and Amos against the reference
#   bash bench/gpu_run.sh tests     ~5 min    tests/test_cuda.py, tests/test_triton.py,
#                                             tests/test_triton_capturable.py and tests/test_cuda_capturable.py
#                                             (CUDA-graph capture and replay, no host sync under
#                                             GradScaler) over 8 worker
#                                             processes (pytest-xdist), 120 s per test
#   bash bench/gpu_run.sh bench     ~5 min    python -m amos_fused.bench on gpt2-medium and many-small
#                                             (JSON per workload, written as soon as each finishes)
#   bash bench/gpu_run.sh sanitize  ~5 min    compute-sanitizer memcheck on a small CUDA subset
#
# The GPU machine: python3, torch 2.11.0+cu130 and triton 3.6.0 preinstalled, nvcc 13.0,
# ninja, pytest-xdist, pytest-timeout, no internet.  Files in $OUT (default
# bench/results/gpu-run): summary.txt plus at most one log or JSON per phase step
# (build.log, smoke.log, tests.log, bench-gpt2-medium.json/.log, bench-many-small.json,
# sanitizer.log) -- at most 8.  Exit status: non-zero when the phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PHASE="${1:-}"
OUT="${OUT:-bench/results/gpu-run}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
note() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

case "$PHASE" in
  build)
    note "build (TORCH_CUDA_ARCH_LIST=9.0)"
    start=$SECONDS
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 540 "$PYTHON" -m pip install --no-build-isolation \
      --no-deps -v -e . > "$OUT/build.log" 2>&1
    status=$?
    note "build exit status $status in $((SECONDS - start))s"
    [[ $status -eq 0 ]] || { tail -40 "$OUT/build.log"; exit 1; }
    timeout 60 "$PYTHON" -c "import torch, triton, amos_fused; \
print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__); \
print('built_with_cuda', torch.ops.amos_fused.built_with_cuda(), \
'available_backends', amos_fused.available_backends())" 2>&1 | tee -a "$OUT/summary.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  smoke)
    note "smoke (fail-fast)"
    subset="ops_dispatch or found_inf or misaligned or another_stream or bad_input"
    subset="$subset or (cuda_matches_reference and adamw and f32) or (amos_matches_reference and f32)"
    CUDA_LAUNCH_BLOCKING=1 timeout 300 "$PYTHON" -m pytest -x -q -p no:cacheprovider \
      tests/test_cuda.py -k "$subset" > "$OUT/smoke.log" 2>&1
    status=$?
    note "smoke exit status $status: $(tail -1 "$OUT/smoke.log")"
    exit "$status"
    ;;
  tests)
    note "tests (8 workers, 120 s per test)"
    timeout 540 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -n 8 --timeout 120 \
      tests/test_cuda.py tests/test_triton.py tests/test_triton_capturable.py tests/test_cuda_capturable.py \
      > "$OUT/tests.log" 2>&1
    status=$?
    note "tests exit status $status: $(tail -1 "$OUT/tests.log")"
    exit "$status"
    ;;
  bench)
    status=0
    for workload in gpt2-medium many-small; do
      note "bench $workload"
      timeout 270 "$PYTHON" -m amos_fused.bench --device cuda --workload "$workload" --rounds 3 \
        --json "$OUT/bench-$workload.json" > "$OUT/bench-$workload.log" 2>&1
      s=$?
      note "bench $workload exit status $s"
      [[ $s -eq 0 ]] || status=1
    done
    rm -f "$OUT/bench-many-small.log"  # its table is in the JSON; keeps $OUT at 8 files
    exit "$status"
    ;;
  sanitize)
    sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
    subset="three_hundred or misaligned or (amos_matches_reference and f32) or (cuda_matches_reference and f32)"
    note "compute-sanitizer memcheck"
    timeout 540 "$sanitizer" --tool memcheck --error-exitcode 99 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda.py -k "$subset" > "$OUT/sanitizer.log" 2>&1
    status=$?
    note "memcheck exit status $status"
    exit "$status"
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh build|smoke|tests|bench|sanitize  (see the top of this file)" >&2
    exit 2
    ;;
esac
