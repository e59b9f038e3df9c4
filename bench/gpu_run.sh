#!/usr/bin/env bash
# NOT RUN YET — written on a machine without a GPU; its first real run is pending.
#
# The one script for the GPU machine (torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0,
# ninja, no internet, 16 cores).  From the repository root:
#   1. builds the extension with its CUDA kernels (sm_90),
#   2. runs the GPU tests (tests/test_cuda.py, and tests/test_triton.py if present),
#   3. benchmarks the gpt2-medium and many-small workloads,
# and writes every log and result file under $OUT (default bench/results/gpu-run-<date>).
#   SANITIZE=1  also runs a small subset of the CUDA tests under compute-sanitizer
#               (memcheck, racecheck; slow).
# Exit status: non-zero when the build or any test failed (the benchmark still runs
# after failed tests, so its numbers are not lost).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-run-$(date +%F)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
status=0

note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

note "environment"
{
  nvidia-smi || true
  nvcc --version || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" || true
} > "$OUT/environment.txt" 2>&1

note "build (TORCH_CUDA_ARCH_LIST=9.0)"
start=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
  > "$OUT/build.log" 2>&1
build_status=$?
note "build exit status $build_status in $((SECONDS - start))s (log: build.log)"
if [[ $build_status -ne 0 ]]; then
  tail -50 "$OUT/build.log"
  exit 1
fi
"$PYTHON" -c "import torch, amos_fused; \
print('built_with_cuda', torch.ops.amos_fused.built_with_cuda()); \
print('available_backends', amos_fused.available_backends())" 2>&1 | tee -a "$OUT/summary.txt"

note "tests"
tests=(tests/test_cuda.py)
[[ -f tests/test_triton.py ]] && tests+=(tests/test_triton.py)
start=$SECONDS
"$PYTHON" -m pytest -q -rs "${tests[@]}" 2>&1 | tee "$OUT/tests.log"
test_status=${PIPESTATUS[0]}
note "pytest ${tests[*]}: exit status $test_status in $((SECONDS - start))s: $(tail -1 "$OUT/tests.log")"
[[ $test_status -eq 0 ]] || status=1

if [[ "${SANITIZE:-0}" == "1" ]]; then
  sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  subset="three_hundred or misaligned or (amos_matches_reference and f32 and plain) or (cuda_matches_reference and f32)"
  for tool in memcheck racecheck; do
    "$sanitizer" --tool "$tool" --error-exitcode 99 "$PYTHON" -m pytest -q -x tests/test_cuda.py -k "$subset" \
      > "$OUT/sanitizer-$tool.log" 2>&1
    s=$?
    note "compute-sanitizer --tool $tool: exit status $s (log: sanitizer-$tool.log)"
    [[ $s -eq 0 ]] || status=1
  done
fi

note "benchmarks"
for workload in gpt2-medium many-small; do
  "$PYTHON" -m amos_fused.bench --device cuda --workload "$workload" --json "$OUT/bench-$workload.json" \
    2>&1 | tee "$OUT/bench-$workload.log"
  note "bench $workload: exit status ${PIPESTATUS[0]}"
done

note "done: exit status $status; files in $OUT"
exit "$status"
