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
    # Adam with amsgrad and L2 weight decay, Half and float storage: ptxas gives these an
    # 8-byte stack frame with 8 bytes of spill stores and loads at 64 / 48 registers, so
    # not from register pressure.  The SASS (cuobjdump -sass of the float variant) shows
    # what it holds: one 64-bit value, the tensor's numel read from the table, kept
    # across the calls (CALL.REL.NOINC) to the IEEE division / square-root slow-path
    # subroutines, whose calling convention does not preserve it: one STL.64 when the
    # block starts and one LDL.64 before its tail, none in the element loop.
    # `false, false`: the variant without telemetry and without stochastic rounding
    # (the telemetry ones have no frame; rounding exists for bfloat16 only).
    ("elementwise_kernel<Half, 5, 29u, false, false, AdamCoef<float>, AdamElement<true, true> >",
     "adam amsgrad+L2: 8 B frame, numel kept across slow-path calls (1 store + 1 load per block)"),
    ("elementwise_kernel<float, 5, 29u, false, false, AdamCoef<float>, AdamElement<true, true> >",
     "adam amsgrad+L2: 8 B frame, numel kept across slow-path calls (1 store + 1 load per block)"),
    # LAMB's moments (bfloat16) and apply (float with telemetry; double) passes: an 8-byte
    # frame since the build passes --fmad=false (no a·b + c contracted: the CUDA kernels
    # round as the CPU ones); without that flag these have none.  The SASS is not yet
    # read: presumably a value kept across the IEEE division / square-root slow-path
    # calls, as for Adam above.
    ("norm_moments_kernel<BFloat16, true>", "lamb moments, bf16: 8 B frame under --fmad=false"),
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


def main(logs: list[str]) -> int:
    rows = [row for log in logs for row in parse(log)]
    for row, full in zip(rows, demangle([r["mangled"] for r in rows])):
        row["name"] = short_name(full) if row["entry"] else full
    if not rows:
        print("ptxas resources: no ptxas report found (was -Xptxas -v passed?)")
        return 1
    width = max(len(r["name"]) for r in rows)
    print(f"{'file':<16} {'kernel':<{width}} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}  verdict")
    failed = 0
    for r in rows:
        stack = max(r["stack"], r["cumulative"])
        bad = stack > 0 or r["spill_stores"] > 0 or r["spill_loads"] > 0
        reason = next((why for pattern, why in ALLOWED if fnmatch.fnmatchcase(r["name"], pattern)), None)
        verdict = "ok" if not bad else (f"allowed: {reason}" if reason else "FAIL")
        failed += verdict == "FAIL"
        regs = "-" if r["registers"] is None else str(r["registers"])
        print(f"{r['file']:<16} {r['name']:<{width}} {regs:>5} {stack:>6} {r['spill_stores']:>9} "
              f"{r['spill_loads']:>9}  {verdict}")
    print(f"ptxas resources: {len(rows)} function(s), "
          + ("passed" if not failed else f"{failed} with a stack frame or spills (FAILED)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
