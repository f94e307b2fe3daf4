# Two commands on a fresh machine: `make demo` (tiny BASED pretraining) and `make test` (the test suite).
# Both build .venv with Python 3.12 and the pinned versions in pyproject.toml.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.12 2>/dev/null || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv test test-gpu demo clean

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
	  echo "Python 3.12 not found. megatron-core >= 0.17 needs Python >= 3.12: install it (e.g. 'pyenv install 3.12'," \
	       "or 'apt-get install python3.12 python3.12-venv') or run 'make PYTHON=/path/to/python3.12 ...'."; exit 1; fi
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), sys.version' || \
	  { echo "$(PYTHON) is not Python >= 3.12; run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra tests

test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra -m gpu tests

demo: $(STAMP)
	$(VENV)/bin/python -m megatron_based.demo

clean:
	rm -rf $(VENV) build *.egg-info
