"""The CPU kernels divide sqrt(v) by sqrt(1 − β2^t) without a divide instruction on
AVX2 and AVX-512 (csrc/cpu/root_division.h: a reciprocal and two FMAs, Markstein's
theorem).  tests/root_division_check.cpp compares it with the divide instruction,
bit for bit, for every float32 square root but 0 (every float in [2^-75, 2^64)),
±0, +Inf and NaN, and 19 divisors: the range's ends, all-ones significands and
bias corrections as the optimizers take them.  Built here with the C++ compiler
that builds the extension."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "root_division_check.cpp")
# capability -> (compiler flags, the /proc/cpuinfo flags it needs)
CAPABILITIES = {
    "avx512": (["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-DCPU_CAPABILITY_AVX512"], {"avx512f", "avx512dq", "fma"}),
    "avx2": (["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"], {"avx2", "fma"}),
}
DIVISORS = 19
SQUARE_ROOTS = ((127 + 64) - (127 - 75)) << 23  # the floats in [2^-75, 2^64)
SPECIALS = 8


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_every_float32_square_root_is_in_the_checked_range():
    """The smallest positive float32, 2^-149, has the square root 2^-74.5: every
    nonzero root is at least 2^-75; the largest finite float's is below 2^64."""
    tiny = torch.tensor(2.0 ** -149, dtype=torch.float32)
    assert tiny > 0 and torch.sqrt(tiny) >= 2.0 ** -75
    assert torch.sqrt(torch.tensor(torch.finfo(torch.float32).max)) < 2.0 ** 64


@pytest.mark.parametrize("capability", list(CAPABILITIES))
def test_root_division_is_the_divide_instruction_for_every_square_root(capability, tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    flags, needs = CAPABILITIES[capability]
    missing = needs - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    binary = str(tmp_path / "root_division_check")
    subprocess.run([compiler, "-O2", "-std=c++17", *flags, "-I", CSRC, CHECK, "-o", binary],
                   check=True, capture_output=True, timeout=300)
    run = subprocess.run([binary], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.search(r"checked (\d+) mismatches (\d+)", run.stdout)
    assert found, run.stdout
    assert int(found.group(2)) == 0, run.stdout
    assert int(found.group(1)) == DIVISORS * (SQUARE_ROOTS + SPECIALS)
