"""Reads the `ptxas -v` reports of tools/check_cuda_compile.sh (nvcc ... -Xptxas -v)
and prints, per kernel, registers, stack frame and spill bytes; exits 1 when a kernel
uses a stack frame (local memory) or spills, unless it is in ALLOWED below.

    python tools/ptxas_resources.py LOG [LOG ...]

The report format is ptxas's own (see `ptxas --help`, option --verbose):
    ptxas info    : Compiling entry function '<mangled>' for 'sm_90'
    ptxas info    : Function properties for <mangled>
        <n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads
    ptxas info    : Used <n> registers, used <n> barriers[, <n> bytes cumulative stack size][, ...]
"Function properties" of a non-entry function (a real call) are reported too; its
frame shows up in the caller's cumulative stack size.

An allowed kernel must still keep local memory out of its loops: when the object
file LOG's name ends in .o beside it and cuobjdump is found (on PATH, in
$CUDA_HOME/bin, or the one Triton bundles), its SASS is read and the kernel FAILS
when a local load or store (LDL, STL) lies inside a loop (between a backward
branch and its target).  Without cuobjdump that check is reported as not run.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys

# Kernels allowed a stack frame or spills: (pattern over the short name printed in
# the table, fnmatch syntax, the reason).  Prefer fixing the kernel to listing it.
ALLOWED: list[tuple[str, str]] = [
    # Adam with amsgrad and L2 weight decay, float storage (nvcc 13.0; the Half variant
    # had one too with earlier code): ptxas gives it an 8-byte stack frame with 8 bytes
    # of spill stores and loads at 48 registers, so not from register pressure.  The
    # SASS shows what it holds: one 64-bit value, the tensor's numel read from the
    # table, kept across the calls (CALL.REL.NOINC) to the IEEE division / square-root
    # slow-path subroutines, whose calling convention does not preserve it: one STL.64
    # when the block starts and one LDL.64 before its tail, none in the element loop.
    # `false, false`: the variant without telemetry and without stochastic rounding
    # (the telemetry ones have no frame; rounding exists for bfloat16 only).
    ("elementwise_kernel<float, 5, 29u, false, false, AdamCoef<float>, AdamElement<true, true> >",
     "adam amsgrad+L2: 8 B frame, numel kept across slow-path calls (1 store + 1 load per block)"),
    # LAMB's apply pass (float with telemetry; double): an 8-byte frame since the build
    # passes --fmad=false (no a·b + c contracted: the CUDA kernels round as the CPU
    # ones); without that flag these have none.  In the SASS, as for Adam above, one
    # 64-bit value kept across the IEEE division / square-root slow-path calls: float,
    # one STL.64 before the element loops and one LDL.64 before each later loop;
    # double, one STL.64 and LDL.64 after the loops.  (LAMB's bfloat16 moments pass
    # kept one in its loop until it walked 2-byte params in 8-byte packs:
    # kLambMomentPack in csrc/cuda/norm_scaled.cu.)
    ("norm_apply_kernel<float, true, true, false>", "lamb apply, float + telemetry: 8 B frame under --fmad=false"),
    ("norm_apply_kernel<double, true, false, false>", "lamb apply, double: 8 B frame under --fmad=false"),
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")


def parse(path: str) -> list[dict]:
    """One row per function with properties in the log at `path`, in report order."""
    rows, by_name, entry, props = [], {}, None, None
    with open(path, errors="replace") as f:
        for line in f:
            if m := _ENTRY.search(line):
                entry = m.group(1)
            elif m := _PROPS.search(line):
                props = m.group(1)
            elif (m := _FRAME.search(line)) and props is not None:
                row = by_name.get(props)
                if row is None:
                    row = {"file": os.path.basename(path).removesuffix(".log"), "mangled": props,
                           "entry": props == entry, "registers": None, "cumulative": 0}
                    by_name[props] = row
                    rows.append(row)
                row["stack"], row["spill_stores"], row["spill_loads"] = map(int, m.groups())
                props = None
            elif (m := _USED.search(line)) and entry is not None:
                row = by_name.get(entry)
                if row is not None:
                    row["registers"] = int(m.group(1))
                    if c := _CUMULATIVE.search(line):
                        row["cumulative"] = int(c.group(1))
    return rows


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def short_name(full: str) -> str:
    """`void ns::(anonymous namespace)::k<float, true>(args)` -> `k<float, true>`."""
    depth, cut = 0, len(full)
    for i, ch in enumerate(full):  # drop the parameter list: the first top-level '('
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not full.startswith("(anonymous", i):
            cut = i
            break
    name = full[:cut]
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"(?:\(anonymous namespace\)|[A-Za-z_]\w*)::(?![^<]*>)", "", name)
    return name.replace("c10::", "").strip()


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, $CUDA_HOME/bin, or the copy Triton ships (no GPU needed)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton  # noqa: F401 (only its directory)
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else None


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s*(.*?);")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)\s*$")
_LOCAL = re.compile(r"\b(STL|LDL)\b")


def local_accesses_in_loops(sass: str) -> tuple[int, list[str]]:
    """(local loads and stores in `sass`, one function's listing; those inside a loop,
    as 'address instruction'): a loop is the range from a backward branch's target
    to the branch."""
    loops, local = [], []
    for line in sass.splitlines():
        if not (m := _SASS_LINE.search(line)):
            continue
        address, instruction = int(m.group(1), 16), m.group(2).strip()
        if (t := _BRANCH_TARGET.search(instruction)) and int(t.group(1), 16) <= address:
            loops.append((int(t.group(1), 16), address))
        if _LOCAL.search(instruction):
            local.append((address, instruction))
    inside = [f"{a:05x} {ins}" for a, ins in local if any(lo <= a <= hi for lo, hi in loops)]
    return len(local), inside


def check_sass(row: dict, log: str, cuobjdump: str | None) -> str:
    """The verdict on an allowed kernel's SASS: 'SASS: ..., none in a loop', 'FAIL: ...'
    when a local access lies inside a loop, or 'SASS not checked (...)' and why."""
    obj = log.removesuffix(".log") + ".o"
    if cuobjdump is None or not os.path.exists(obj):
        return "SASS not checked (" + ("no cuobjdump" if cuobjdump is None else "no object file") + ")"
    out = subprocess.run([cuobjdump, "-sass", "-fun", row["mangled"], obj], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0 or "Function :" not in out.stdout:
        return "SASS not checked (cuobjdump: " + (out.stderr.strip() or "no listing")[:80] + ")"
    count, inside = local_accesses_in_loops(out.stdout)
    if inside:
        return f"FAIL: local memory in a loop ({'; '.join(inside[:3])})"
    return f"SASS: {count} local access(es), none in a loop"


def main(logs: list[str]) -> int:
    rows = [dict(row, log=log) for log in logs for row in parse(log)]
    cuobjdump = find_cuobjdump()
    for row, full in zip(rows, demangle([r["mangled"] for r in rows])):
        row["name"] = short_name(full) if row["entry"] else full
    if not rows:
        print("ptxas resources: no ptxas report found (was -Xptxas -v passed?)")
        return 1
    width = max(len(r["name"]) for r in rows)
    print(f"{'file':<16} {'kernel':<{width}} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}  verdict")
    failed = 0
    matched, needed = set(), set()  # allowlist patterns that name a kernel; that name one with a frame
    for r in rows:
        stack = max(r["stack"], r["cumulative"])
        bad = stack > 0 or r["spill_stores"] > 0 or r["spill_loads"] > 0
        pattern, reason = next(((p, why) for p, why in ALLOWED if fnmatch.fnmatchcase(r["name"], p)), (None, None))
        verdict = "ok" if not bad else (f"allowed: {reason}" if reason else "FAIL")
        if pattern is not None:
            matched.add(pattern)
        if bad and reason:
            needed.add(pattern)
            sass = check_sass(r, r["log"], cuobjdump)
            verdict = sass if sass.startswith("FAIL") else f"{verdict}; {sass}"
        failed += verdict.startswith("FAIL")
        regs = "-" if r["registers"] is None else str(r["registers"])
        print(f"{r['file']:<16} {r['name']:<{width}} {regs:>5} {stack:>6} {r['spill_stores']:>9} "
              f"{r['spill_loads']:>9}  {verdict}")
    for pattern in sorted(matched - needed):
        print(f"note: allowed kernel {pattern} has no stack frame or spills now: its entry can go")
    print(f"ptxas resources: {len(rows)} function(s), "
          + ("passed" if not failed else f"{failed} with a stack frame or spills (FAILED)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
