"""The compiled extension runs on any x86-64 CPU that runs torch.

The SIMD kernel builds (AVX2, AVX-512, AVX512_BF16) are compiled with their own
instruction sets and called only where the CPU has them, but they also emit
out-of-line copies of inline functions they share with the baseline code (c10's
message builders, std containers).  The linker keeps one copy of each, the
first it meets; were it a SIMD build's, the baseline code (argument checks,
error messages) would run its instructions, and die with SIGILL on a CPU
without them.  Checked in the built library's machine code (every global
function with VEX/EVEX instructions belongs to a SIMD build's own code), and by
running every optimizer class on emulated older CPUs (qemu's user mode), bitwise
against the same build run natively."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from amos_fused import _C

TOOLS = ("objdump", "nm", "c++filt")
pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")

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


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason="reads machine code with objdump, nm, c++filt")
def test_baseline_code_never_calls_a_simd_build_copy():
    vector = _functions_with_vector_instructions() & _global_functions()
    names = _demangled(vector)
    if not any(SIMD_OWN.search(d) for d in names.values()):
        comment = subprocess.run(["objdump", "-s", "-j", ".comment", _C.__file__], capture_output=True, text=True)
        if "clang" in comment.stdout.lower():
            pytest.skip("built by clang: the SIMD builds need GCC's target pragmas and are absent")
        pytest.fail("no SIMD kernel found in a GCC build of the library")
    shared = sorted(d for d in names.values() if not SIMD_OWN.search(d))
    assert not shared, (
        f"{len(shared)} shared function(s) kept from a SIMD build (setup.py must link the SIMD "
        f"sources last): {shared[:5]}")


# ---------------------------------------------------------------------------
# On an emulated CPU without the later instruction sets (qemu's user mode)
# ---------------------------------------------------------------------------

QEMU = shutil.which("qemu-x86_64")
HERE = os.path.dirname(os.path.abspath(__file__))
# qemu CPU model -> the build chosen there: SandyBridge has AVX but not AVX2 (torch
# itself needs AVX); Haswell has AVX2 and FMA but not AVX-512.
EMULATED = {"SandyBridge": "default", "Haswell-noTSX": "avx2"}


def _inputs(path):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 130), (5000,), (7,), (3, 4, 5, 6)]
    torch.save({"params": [torch.randn(s, generator=g) for s in shapes],
                "grads": [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]}, path)


def _steps(inputs, out, capability=None, cpu_model=None):
    env = {k: v for k, v in os.environ.items() if k != "AMOS_FUSED_CPU_CAPABILITY"}
    if capability is not None:
        env["AMOS_FUSED_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in (env.get("PYTHONPATH"),) if p])
    command = [sys.executable, os.path.join(HERE, "isa_steps.py"), str(inputs), str(out)]
    if cpu_model is not None:
        command = [QEMU, "-cpu", cpu_model] + command
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(command[:3])}: exit {run.returncode}\n{run.stderr[-3000:]}"
    return torch.load(out)


def _qemu_models() -> str:
    if QEMU is None:
        return ""
    return subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout


@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian: apt-get install qemu-user)")
@pytest.mark.parametrize("cpu_model", sorted(EMULATED))
def test_each_build_runs_alone_on_a_cpu_without_the_later_sets(cpu_model, tmp_path):
    """On an emulated CPU that lacks the later instruction sets, the build chosen at
    load runs every optimizer class, and the refusals, without an illegal
    instruction, and gives the bits it gives natively."""
    if not re.search(rf"\b{re.escape(cpu_model)}\b", _qemu_models()):
        pytest.skip(f"this qemu-x86_64 has no CPU model {cpu_model!r}")
    _inputs(tmp_path / "inputs.pt")
    emulated = _steps(tmp_path / "inputs.pt", tmp_path / "emulated.pt", cpu_model=cpu_model)
    native = _steps(tmp_path / "inputs.pt", tmp_path / "native.pt", capability=EMULATED[cpu_model])
    assert emulated["capability"] == native["capability"] == EMULATED[cpu_model]
    assert emulated["refusals"] == native["refusals"] and "no error" not in native["refusals"]
    assert emulated.keys() == native.keys()
    for key in native:
        if key in ("capability", "refusals"):
            continue
        for i, (a, b) in enumerate(zip(native[key], emulated[key], strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{key} [{i}]"
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{key} [{i}]"
