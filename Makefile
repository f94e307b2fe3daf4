# Two commands on a fresh machine: `make demo` (tiny BASED pretraining) and `make test` (the test suite).
# Both build .venv with Python 3.12 and the pinned versions in pyproject.toml.
SHELL := /bin/bash
# The first interpreter that really runs as Python >= 3.12 (a pyenv shim may exist without a global 3.12).
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3; do \
  $$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv test test-gpu demo clean launch-deps wheels megatron-lm

# The launcher tests (tests/launch) run real mpirun and a real single-node slurm cluster: Debian packages, installed
# here when missing and apt-get is usable (root); without them those tests skip and say why.
LAUNCH_APT := openmpi-bin libopenmpi-dev slurm-wlm munge
launch-deps:
	@if command -v mpirun >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(LAUNCH_APT) >/dev/null; } || \
	  echo "note: installing $(LAUNCH_APT) failed: the mpirun/slurm launcher tests will skip"; \
	else echo "note: $(LAUNCH_APT) missing and apt-get unusable: the mpirun/slurm launcher tests will skip"; fi

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
	  echo "Python 3.12 not found. megatron-core >= 0.17 needs Python >= 3.12: install it (e.g. 'pyenv install 3.12'," \
	       "or 'apt-get install python3.12 python3.12-venv') or run 'make PYTHON=/path/to/python3.12 ...'."; exit 1; fi
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), sys.version' || \
	  { echo "$(PYTHON) is not Python >= 3.12; run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install (its engine here needs no C++ op; see docs/launching.md)
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install -q -e '.[test,mpi,deepspeed]'
	touch $(STAMP)

venv: $(STAMP)

# TEST_WORKERS: that many test files at a time (pytest-xdist; one file's tests run in one worker, so its module and
# session fixtures, e.g. the launcher tests' slurm cluster, are built once): on a 2-core machine 2/3 to 1x of the
# one-process time. 0: one process. It is one process anyway without pytest-xdist in .venv and where torch sees a GPU
# (the GPU tests and the end-to-end jobs the suite starts first, tests/conftest.py, are once per process).
TEST_WORKERS ?= 2
test: $(STAMP) launch-deps
	$(VENV)/bin/python -m pytest -q -ra $$([ "$(TEST_WORKERS)" != 0 ] && $(VENV)/bin/python -c 'import xdist, torch; \
	  assert not torch.cuda.is_available()' 2>/dev/null && echo "-n $(TEST_WORKERS) --dist loadfile") tests

# PYTEST_ARGS: extra pytest arguments (e.g. --durations=20)
# GPU_TESTS: the paths, in the order to run them (default: all of tests/)
GPU_TESTS ?= tests
test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra -m gpu $(GPU_TESTS) $(PYTEST_ARGS)

# The wheels for a GPU machine without network, into .whl/ (benchmarks/gpu_env.sh installs them there):
# megatron-core as pinned in pyproject.toml, and fla (the kernel benchmarks' peer) with its one dependency.
WHEELS := $(shell grep -o 'megatron-core==[0-9.]*' pyproject.toml) fla-core==0.6.0 einops==0.8.2
wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $(WHEELS)

# Megatron-LM's pretrain_gpt.py and the two files it imports beside it, at the tag paired with megatron-core 0.19,
# into .megatron-lm/ (benchmarks/run_megatron_lm_gpu.sh runs it; the megatron package is the installed wheel's)
MEGATRON_LM_TAG := core_v0.19.0
megatron-lm:
	rm -rf .megatron-lm.tmp && git clone -q --depth 1 --branch $(MEGATRON_LM_TAG) https://github.com/NVIDIA/Megatron-LM.git .megatron-lm.tmp
	mkdir -p .megatron-lm && cp .megatron-lm.tmp/pretrain_gpt.py .megatron-lm.tmp/gpt_builders.py .megatron-lm.tmp/model_provider.py .megatron-lm/
	rm -rf .megatron-lm.tmp

demo: $(STAMP)
	$(VENV)/bin/python -m megatron_based.tasks.demo

clean:
	rm -rf $(VENV) build *.egg-info
