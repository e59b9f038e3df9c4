"""The compiled extension runs on any x86-64 CPU: the SIMD kernel builds
(AVX2, AVX-512, AVX512_BF16) are compiled with their own instruction sets and
called only where the CPU has them, but they also emit out-of-line copies of
inline functions they share with the baseline code (c10's message builders,
std containers).  The linker keeps one copy of each, the first it meets; if
that is a SIMD build's, the baseline code (argument checks, error messages)
calls AVX instructions and dies with SIGILL on an older CPU.  Read from the
built library: every global function that uses VEX/EVEX instructions (a
``v`` mnemonic, a ymm/zmm register) must belong to a SIMD build's own code."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from amos_fused import _C

TOOLS = ("objdump", "nm", "c++filt")
pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not all(shutil.which(t) for t in TOOLS),
    reason="reads x86-64 machine code with binutils (objdump, nm, c++filt)")

# The SIMD builds' own code: at::vec and our kernels in the CPU_CAPABILITY
# namespace of each build, and each build's kernel table (csrc/cpu/kernel_api.h).
SIMD_OWN = re.compile(r"::(AVX2|AVX512|AVX512_BF16)::|^amos_fused::cpu::kernels_avx(2|512|512_bf16)\(\)$")
VECTOR_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\s|%[yz]mm\d")


def _global_functions() -> set:
    listing = subprocess.run(["nm", "--defined-only", _C.__file__], capture_output=True, text=True, check=True)
    return {fields[2] for fields in (line.split() for line in listing.stdout.splitlines())
            if len(fields) == 3 and fields[1] in ("T", "W")}


def _functions_with_vector_instructions() -> set:
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-j", ".text", _C.__file__],
                             capture_output=True, text=True, check=True)
    found, current = set(), None
    for line in listing.stdout.splitlines():
        label = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if label:
            current = label.group(1)
        elif current is not None and current not in found and VECTOR_INSTRUCTION.match(line):
            found.add(current)
    return found


def _demangled(names) -> dict:
    names = sorted(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def test_baseline_code_never_calls_a_simd_build_copy():
    vector = _functions_with_vector_instructions() & _global_functions()
    names = _demangled(vector)
    assert any(SIMD_OWN.search(d) for d in names.values()), "no SIMD kernel found: is this the x86-64 build?"
    shared = sorted(d for d in names.values() if not SIMD_OWN.search(d))
    assert not shared, (
        f"{len(shared)} shared function(s) kept from a SIMD build (setup.py must link the SIMD "
        f"sources last): {shared[:5]}")
