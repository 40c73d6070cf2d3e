# fastgpt: `make test` and `make bench` set everything up from a fresh clone.
#   .venv  <- requirements-dev.txt (torch: CUDA build by default, CPU build works too)
#   fastgpt installed editable, fastgpt/_C compiled in place (incremental: build/temp)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu csrc/cuda/*.cuh)
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h) $(CUDA_SOURCES)
EXT := fastgpt/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: all setup build test test-fast bench cmake-build wheel-check clean
all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	FASTGPT_NO_EXTENSION=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

$(EXT): $(VENV)/.installed $(CSRC) setup.py
	mkdir -p build && flock build/.lock $(PY) setup.py build_ext --inplace
	touch $@

build: $(EXT)

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m fastgpt.cli bench context

clean:
	rm -rf build dist *.egg-info fastgpt/_C*.so
