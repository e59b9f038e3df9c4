"""Whether a compiled op that refuses its input raises a Python exception, probed one
call per child process so that a call which kills its process (a segfault while
the C++ exception is thrown or caught) does not hide the others.  Prints one line
per probe, ``ok``, ``wrong: ...`` or ``killed by signal N``, and the build's
toolchain facts; exits non-zero when any probe failed.

    python3 bench/raise_probe.py             every probe, each in a child process
    python3 bench/raise_probe.py --run NAME  one probe in this process (under a debugger)

Each probe is one line of Python run after ``import torch, amos_fused``; the
ones on CUDA tensors are left out when no GPU is visible."""
import os
import subprocess
import sys

PROBES = {
    # a C++ op on CPU tensors only: its own argument check (TORCH_CHECK_VALUE)
    "cpu op, own check": "torch.ops.amos_fused.first_written_overlap([torch.zeros(2)], 5)",
    # the CPU step op: a grad of another shape (csrc/checks.cpp check_bucket)
    "cpu step op, bad grad": (
        "torch.ops.amos_fused.step('lion', [torch.zeros(10)], [torch.zeros(11)], [torch.zeros(10)],"
        " [torch.zeros(())], [0.1, 0.9, 0.99, 0.0], [])"),
    # a C++ op on CUDA tensors that runs on the host (the Triton backend's prologue)
    "host op on cuda tensors, bad grad": (
        "d='cuda'; torch.ops.amos_fused.begin_step('lion', [torch.zeros(10, device=d)],"
        " [torch.zeros(11, device=d)], [torch.zeros(10, device=d)], [torch.zeros(())],"
        " [0.1, 0.9, 0.99, 0.0], [], None, None, None, None)"),
    # the CUDA step op: the same bad grad
    "cuda step op, bad grad": (
        "d='cuda'; torch.ops.amos_fused.step('lion', [torch.zeros(10, device=d)], [torch.zeros(11, device=d)],"
        " [torch.zeros(10, device=d)], [torch.zeros(())], [0.1, 0.9, 0.99, 0.0], [])"),
}
NEEDS_CUDA = {"host op on cuda tensors, bad grad", "cuda step op, bad grad"}


def probe(code: str) -> str:
    script = (f"import torch, amos_fused\ntry:\n    {code}\nexcept (ValueError, TypeError, RuntimeError) as e:\n"
              "    print('raised', type(e).__name__, str(e).splitlines()[0][:160])\nelse:\n    print('no error')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}"
    out = done.stdout.strip().splitlines()
    if done.returncode == 0 and out and out[-1].startswith("raised"):
        return "ok: " + out[-1]
    return f"wrong (exit {done.returncode}): " + " | ".join(out[-1:] + done.stderr.strip().splitlines()[-2:])


def toolchain() -> None:
    import torch
    import amos_fused._C as ext
    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI, "extension", ext.__file__)
    with open("/proc/self/maps") as maps:  # the C++ runtimes this process loaded, wherever from
        loaded = sorted({line.split()[-1] for line in maps if any(k in line for k in ("libstdc++", "libgcc_s",
                                                                                      "libgomp", "libiomp"))})
    print("loaded:", ", ".join(loaded))
    for command in (["ldd", ext.__file__], [os.environ.get("CXX", "c++"), "-v"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            lines = (done.stdout + done.stderr).splitlines()
            keep = [l for l in lines if any(k in l for k in ("libstdc++", "libgcc", "libgomp", "libc10", "not found",
                                                             "Configured with", "gcc version"))]
            print(f"$ {' '.join(command)}\n  " + "\n  ".join(keep or lines[-3:]))
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"$ {' '.join(command)}: {error}")


def main() -> int:
    import torch
    if sys.argv[1:2] == ["--run"]:
        import amos_fused  # noqa: F401
        exec(PROBES[sys.argv[2]])
        return 0
    toolchain()
    failed = 0
    for name, code in PROBES.items():
        if name in NEEDS_CUDA and not torch.cuda.is_available():
            print(f"{name}: left out (no GPU)")
            continue
        result = probe(code)
        failed += not result.startswith("ok")
        print(f"{name}: {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
