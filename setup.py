"""Builds amos_fused._C from csrc/: CPU kernels always, CUDA kernels when the
installed torch has CUDA (torch.version.cuda and a CUDA toolkit), whether or not
a GPU is visible.  Install with `pip install --no-build-isolation -e .`."""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - explained to the user
    raise SystemExit(
        "amos_fused compiles against the torch of the environment it is installed into, and "
        "this build cannot import torch. If torch IS installed, pip's build isolation hid it "
        "(it builds in a fresh environment): install with "
        "`pip install --no-build-isolation -e .` instead. Otherwise install torch first "
        "(`pip install torch`), then run that command."
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


# The SIMD builds of the CPU kernels (csrc/simd/: each file compiled for its own
# instruction set) are linked last.  They emit copies of inline functions they
# share with the baseline code (c10's message builders, std containers), and the
# linker keeps the first copy it meets: the baseline's must come first, or code
# that runs on any CPU would call AVX instructions (tests/test_isa_isolation.py).
# setuptools links in the sorted order of the sources' paths, where "csrc/simd/"
# comes after every other source; the list below puts them last as well.
cpu_sources = ["csrc/ops.cpp", "csrc/checks.cpp", "csrc/contracts.cpp", "csrc/host_checks_python.cpp"] + sources("csrc/cpu/*.cpp")
simd_sources = sources("csrc/simd/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu")
with_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and bool(cuda_sources)
    and os.environ.get("AMOS_FUSED_NO_CUDA", "0") != "1"
)

# -ffp-contract=off: no implicit a·b + c → FMA, which GCC would do differently in
# the SIMD body and the scalar tail of the AVX2 kernels; the math asks for FMA
# explicitly where torch rounds once (af_fma in csrc/step_math.h).
# _GLIBCXX_USE_CXX11_ABI as torch was built: torch's cpp_extension no longer passes it,
# and a compiler configured with the other default would give std::string and the
# c10::Error thrown by every failed check another layout than torch's.
abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-psabi"] + abi
extension_kwargs = dict(
    name="amos_fused._C",
    sources=cpu_sources + (cuda_sources if with_cuda else []) + simd_sources,
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args={"cxx": cxx_flags + (["-DAMOS_FUSED_WITH_CUDA"] if with_cuda else [])},
    extra_link_args=["-fopenmp"],
)
# --fmad=false: nvcc's -ffp-contract=off (its default contracts a·b + c into one FMA,
# so a CUDA step would round differently from the CPU kernels').  Explicit fmaf
# (af_fma) still compiles to FFMA, and division and sqrt stay IEEE-rounded
# (-prec-div / -prec-sqrt default to true without --use_fast_math).
if with_cuda:
    extension_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--fmad=false"] + abi
    extension = CUDAExtension(**extension_kwargs)
else:
    extension = CppExtension(**extension_kwargs)

setup(
    packages=find_packages(include=["amos_fused", "amos_fused.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
