"""Builds the CUDA ops of csrc/cuda as host code, for checking their logic on a
machine without a GPU (compare_with_cpu.py runs them).

The sources are copied to a build directory and compiled by the host compiler with
include/emu_cuda.h forced in front (threads, barriers and shuffles emulated) and
include/c10/cuda/* standing in for the c10 CUDA headers.  The copy is changed in
the few places that cannot compile or run as host code:
  kernel<<<grid, block, smem, stream>>>(args)  ->  emu::launch(grid, block, [&] { kernel(args); });
  TORCH_LIBRARY_IMPL(amos_fused, CUDA, m) / m.impl  ->  TORCH_LIBRARY_FRAGMENT(amos_fused_emu, m) / m.def
  at::kCUDA, pinned memory, params[0].is_cuda()  ->  CPU memory, pageable, true
Everything else (tables, cache, kernels, the step_math.h calls) is the real code.
The ops appear as torch.ops.amos_fused_emu.<op> (positional arguments only), plus
emu_skip_kernels(bool), emu_set_stream(int) and emu_set_capturing(bool) (the
capture status the ops see).

    python tools/cuda_emulation/build_emulated_ops.py      # builds, prints the library path
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("AMOS_EMU_BUILD", os.path.join(ROOT, "build", "cuda_emulation"))

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)

_CONTROL = """\
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
void emu_skip_kernels(bool on) { emu::skip_kernels = on; }
void emu_set_stream(int64_t id) { c10::cuda::emulated_stream_id = id; }
void emu_set_capturing(bool on) { c10::cuda::emulated_capturing = on; }
TORCH_LIBRARY_FRAGMENT(amos_fused_emu, m) {
  m.def("emu_skip_kernels", &emu_skip_kernels);
  m.def("emu_set_stream", &emu_set_stream);
  m.def("emu_set_capturing", &emu_set_capturing);
}
"""


def _split_top_level(text: str):
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "(<["
        depth -= ch in ")>]"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def _host_launch(match):
    config = _split_top_level(match.group(2))
    unused = "".join(f" (void)({c});" for c in config[2:])  # shared memory, stream
    return f"emu::launch({config[0]}, {config[1]}, [&] {{ {match.group(1)}({match.group(3)}); }});{unused}"


def prepare(src_root: str) -> list:
    """Copies csrc/ to src_root with the CUDA sources made host-compilable; returns the sources."""
    if os.path.exists(src_root):
        shutil.rmtree(src_root)
    shutil.copytree(os.path.join(ROOT, "csrc"), src_root)
    cuda_dir = os.path.join(src_root, "cuda")
    for path in glob.glob(os.path.join(cuda_dir, "*")):
        with open(path) as f:
            text = f.read()
        text = _LAUNCH.sub(_host_launch, text)
        if "<<<" in text:
            raise SystemExit(f"{path}: a kernel launch this script cannot rewrite")
        text = (text.replace("TORCH_LIBRARY_IMPL(amos_fused, CUDA, m)", "TORCH_LIBRARY_FRAGMENT(amos_fused_emu, m)")
                .replace("m.impl(", "m.def(")
                .replace("at::kCUDA", "at::kCPU")
                .replace(".pinned_memory(true)", ".pinned_memory(false)")
                .replace("params[0].is_cuda()", "true"))
        if path.endswith(".cu"):
            os.remove(path)
            path = path[:-3] + ".cpp"
        with open(path, "w") as f:
            f.write(text)
    with open(os.path.join(cuda_dir, "emulation_control.cpp"), "w") as f:
        f.write(_CONTROL)
    return sorted(glob.glob(os.path.join(cuda_dir, "*.cpp"))) + [os.path.join(src_root, "checks.cpp")]


def build(verbose: bool = False) -> str:
    """Builds (or rebuilds) the emulated ops; returns the path of the shared library."""
    from torch.utils.cpp_extension import load

    sources = prepare(os.path.join(BUILD, "src"))
    os.makedirs(os.path.join(BUILD, "obj"), exist_ok=True)
    load(
        name="amos_fused_cuda_emulation",
        sources=sources,
        extra_include_paths=[os.path.join(HERE, "include"), os.path.join(BUILD, "src")],
        extra_cflags=["-O1", "-include", os.path.join(HERE, "include", "emu_cuda.h"),
                      "-Wall", "-Wno-unknown-pragmas"],
        build_directory=os.path.join(BUILD, "obj"),
        verbose=verbose,
        is_python_module=False,
    )
    return os.path.join(BUILD, "obj", "amos_fused_cuda_emulation.so")


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
