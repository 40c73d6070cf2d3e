# fastgpt: `make test` and `make bench` set everything up from a fresh clone.
#   .venv  <- requirements-dev.txt (torch: CUDA build by default, CPU build works too)
#   fastgpt installed editable, fastgpt/_C compiled in place (incremental: build/temp)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h) $(CUDA_SOURCES)
EXT := fastgpt/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: all setup build test bench bench-results cmake-build wheel-check aarch64-check gpu-check gpu-carry gpu-resources clean
all: test

# Under a lock, and only if no concurrent make did it meanwhile: two makes started on a fresh
# clone would otherwise build the same venv at once.
$(VENV)/.deps: requirements-dev.txt
	mkdir -p build && flock build/.venv.lock sh -c 'test $@ -nt requirements-dev.txt || \
	  { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -r requirements-dev.txt && touch $@; }'

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	mkdir -p build && flock build/.venv.lock sh -c 'test $@ -nt setup.py -a $@ -nt pyproject.toml -a $@ -nt $(VENV)/.deps || \
	  { FASTGPT_NO_EXTENSION=1 $(PY) -m pip install --no-build-isolation --no-deps -e . && touch $@; }'

setup: $(VENV)/.installed

$(EXT): $(VENV)/.installed $(CSRC) setup.py
	mkdir -p build && flock build/.lock $(PY) setup.py build_ext --inplace
	touch $@

build: $(EXT)

# The whole suite, then the two other ways the extension is built: the wheel (installed into a
# fresh venv, smoke-tested outside the tree) and CMake (for C++ developers and IDEs).
test: build
	$(PY) -m pytest -q tests
	$(MAKE) wheel-check
	$(MAKE) cmake-build

# make bench writes into the git-ignored benchmarks/out/; make bench-results regenerates the
# committed benchmarks/results/ (every benchmark and attention scenario; their files record this command line).
bench: build
	$(PY) -m fastgpt bench attention

bench-results: build
	for b in attention "attention --scenario gqa" "attention --scenario window" "attention --scenario bf16" layernorm "layernorm --scenario fwdbwd" rmsnorm "model --arch gpt2" "model --arch llama3" "model --arch qwen3" "model --arch gemma3" decode context-parallel; do \
	  $(PY) -m fastgpt bench $$b --out-dir benchmarks/results || exit 1; done

# Reuses the objects `make build` compiled (setup.cfg: build_ext build_temp), so run it after build.
wheel-check: build
	PY=$(PY) tools/wheel_check.sh

# The CPU kernels compiled for aarch64 (objects only: no aarch64 torch to link against here); needs a
# cross compiler: apt install g++-aarch64-linux-gnu. Not part of `make test` (nothing installs it).
aarch64-check: $(VENV)/.installed
	PY=$(PY) tools/aarch64_check.sh

# One CPU level is enough to check the CMake build (`make build` compiles every level for the tests).
CMAKE_CPU_LEVELS ?= default
cmake-build: $(VENV)/.installed
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release -DFASTGPT_CPU_LEVELS=$(CMAKE_CPU_LEVELS) $(if $(filter 1,$(FASTGPT_CUDA)),-DFASTGPT_CUDA=ON)
	cmake --build build/cmake -j $(MAX_JOBS)
	$(PY) -c "import glob, torch; torch.ops.load_library(glob.glob('build/cmake/_C*.so')[0]); \
	  torch.ops.load_library(glob.glob('build/cmake/_cpu_default*.so')[0]); \
	  y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5); \
	  assert y.shape == (2, 8) and abs(y.mean().item()) < 1e-5; print('cmake-build: fastgpt ops load and run')"

# On a GPU machine (preinstalled torch, no venv, no network): build, tests, sanitizers,
# acceptance scripts, benchmarks; every log goes into DIR.  make gpu-check DIR=.gpu/run
# From a developer machine first: `make gpu-carry` copies ../shared/acceptance (which does not
# travel to the GPU machine) into the git-ignored .gpu/, to be carried along with the tree.
DIR ?= .gpu/run
gpu-check:
	tools/gpu_check.sh $(DIR)

gpu-carry:
	mkdir -p .gpu && cp -r ../shared/acceptance .gpu/

# No GPU needed: registers, spills, shared memory and occupancy of every CUDA kernel (sm_80, sm_90)
# and of every Triton configuration the launchers can pick (sm_90), into benchmarks/results/gpu_resources.{md,json}
# (tests/test_gpu_resources.py checks the .json). Compiles everything: minutes.
gpu-resources: $(VENV)/.installed
	$(PY) tools/gpu_resources.py

clean:
	rm -rf build dist *.egg-info fastgpt/_C*.so
