#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu to an object file with nvcc (no GPU needed,
# nothing is linked), with the flags torch's BuildExtension passes for a
# TORCH_CUDA_ARCH_LIST=9.0 build, against the installed torch's headers.
# Prints one line per file, then ptxas's resource use per kernel (registers, stack
# frame, spills: tools/ptxas_resources.py); exits non-zero when any file fails to
# compile or any kernel uses a stack frame (local memory) or spills, unless that
# kernel is in the allowlist of tools/ptxas_resources.py.
# Skips (exit 0) only when nvcc is absent.
#   PYTHON=...  the python whose torch to compile against (default: .venv/bin/python,
#               else python3)
#   JOBS=N      parallel compiles (default 2)
#   WERROR=1    treat warnings as errors
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then nvcc_bin="$candidate"; break; fi
  done
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "SKIPPED: nvcc not found"
  exit 0
fi

python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  if [[ -x .venv/bin/python ]]; then python_bin=.venv/bin/python; else python_bin=python3; fi
fi
mapfile -t torch_includes < <("$python_bin" -c \
  "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no csrc/cuda/*.cu files to check"
  exit 0
fi

flags=(
  -c -std=c++20 -O3 --fmad=false -arch=sm_90 --compiler-options -fPIC  # setup.py's nvcc flags
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE  # the CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -I csrc
  -Xptxas -v  # per-kernel registers, stack frame and spills, read by tools/ptxas_resources.py
)
for dir in "${torch_includes[@]}"; do flags+=(-isystem "$dir"); done
if [[ "${WERROR:-0}" == "1" ]]; then flags+=(--Werror all-warnings); fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '%s\n' "${flags[@]}" > "$work/flags"

compile_one() {  # $1: source; writes $work/<name>.log and .status
  local src="$1" name start status
  name="$(basename "$src" .cu)"
  start=$SECONDS
  mapfile -t flags < "$work/flags"
  if "$nvcc_bin" "${flags[@]}" "$src" -o "$work/$name.o" > "$work/$name.log" 2>&1; then
    status=ok
  else
    status=FAILED
  fi
  local warnings
  warnings=$(grep -ci "warning" "$work/$name.log" || true)
  printf '%-7s %-40s %4ss  %s warning line(s)\n' "$status" "$src" "$((SECONDS - start))" "$warnings"
  echo "$status" > "$work/$name.status"
}
export -f compile_one
export nvcc_bin work

start=$SECONDS
echo "nvcc: $("$nvcc_bin" --version | tail -1); torch headers: ${torch_includes[0]}"
printf '%s\n' "${sources[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'compile_one "$1"' _ {}

failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  if [[ "$(cat "$work/$name.status" 2>/dev/null)" != "ok" ]] || grep -qi "warning" "$work/$name.log"; then
    echo "---- $src"
    grep -v -e '^ptxas info' -e 'bytes stack frame, .* bytes spill' "$work/$name.log" || true
  fi
  [[ "$(cat "$work/$name.status" 2>/dev/null)" == "ok" ]] || failed=1
done
echo "compile check: ${#sources[@]} file(s) in $((SECONDS - start))s, $([[ $failed == 0 ]] && echo passed || echo FAILED)"

logs=()
for src in "${sources[@]}"; do logs+=("$work/$(basename "$src" .cu).log"); done
"$python_bin" tools/ptxas_resources.py "${logs[@]}" || failed=1  # (reads the .o beside each log too)
exit "$failed"
