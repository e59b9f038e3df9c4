# The two entry points of README.md:  `make bench`  and  `make test`.
# Both create .venv (if missing), make sure torch is in it BEFORE building the
# extension (the build uses --no-build-isolation and compiles against that torch),
# then install amos_fused in editable mode.
PYTHON ?= python3
VENV ?= .venv
# On this project's CPU machines `pip install torch==2.13.0` takes a local CPU
# wheel; elsewhere set TORCH_SPEC (the requirement) and TORCH_PIP_ARGS (pip's
# options for it, e.g. the index URL of CPU wheels), or pre-install torch into $(VENV).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.amos_fused-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/simd/*.h csrc/simd/*.cpp csrc/cuda/*)

.PHONY: install bench test lint test-triton-3.6 check-triton-compile clean

install: $(STAMP)

# A machine whose python already has a CUDA torch (and its matching triton) keeps
# them: the venv then sees the system site packages and nothing replaces them.
VENV_FLAGS := $(shell $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" \
                2>/dev/null && echo --system-site-packages)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	# matplotlib and tqdm (the plot and demo extras): the tests of --plot and of the demo run too.
	$(PY) -m pip install ninja numpy "pytest>=8" "hypothesis>=6" "ruff>=0.5" matplotlib tqdm
	$(PY) -m pip install --no-deps pytorch-optimizer==4.1.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install --no-deps triton==3.9.0
	# Real clients for the integration tests (tests/test_clients.py skips without them).
	$(PY) -m pip install "transformers==5.24.0" "accelerate==1.15.0" \
	  || echo "transformers/accelerate not installed: tests/test_clients.py will be skipped"
	# The benchmark's peers of the 8-bit rows (bnb-adamw8bit; torchao-adamw8bit and
	# torchao-adamw-bf16-sr) and the demo's bnb-adamw8bit run; each is skipped without its package.
	$(PY) -m pip install "bitsandbytes==0.50.2" \
	  || echo "bitsandbytes not installed: the benchmark and the tests skip bnb-adamw8bit"
	$(PY) -m pip install "torchao==0.18.0" \
	  || echo "torchao not installed: the benchmark and the tests skip the torchao rows"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

bench: install
	$(PY) -m amos_fused.bench

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check amos_fused tests tools

# The Triton interpreter tests under triton 3.6.0 (the GPU machine's version), with the
# extension built by `install` (same torch): a second venv, .venv-triton36.
T36 := .venv-triton36/bin/python
test-triton-3.6: install
	test -x $(T36) || $(PYTHON) -m venv .venv-triton36
	$(T36) -c "import torch" 2>/dev/null || $(T36) -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(T36) -m pip install numpy "pytest>=8" "hypothesis>=6"
	$(T36) -m pip install --no-deps triton==3.6.0 pytorch-optimizer==4.1.0
	$(T36) -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_telemetry.py \
	  tests/test_triton_stochastic_round.py tests/test_triton_fp8.py tests/test_triton_master_weights.py \
	  tests/test_triton_capturable.py tests/test_triton_amos8bit.py

# Every Triton kernel variant the launches produce, compiled ahead of time for sm_90
# (Triton's compiler and ptxas, no GPU needed): fails on a compile error or a register
# spill.  JOBS=N parallel compiles (default 2).
check-triton-compile: install
	$(PY) tools/check_triton_compile.py

clean:
	rm -rf build amos_fused/_C*.so $(VENV) .venv-triton36
