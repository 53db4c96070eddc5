# `make run` and `make test` set up .venv themselves (torch's CPU wheel first, then the project).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cdsl demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

# The standard benchmark on CommonGen dev (refreshes the README table).
BENCH_DATA ?= ../shared/data/commongen/dev.jsonl
BENCH_LIMIT ?= 100
bench: $(STAMP)
	$(VENV)/bin/cdsl bench --dataset $(BENCH_DATA) --limit $(BENCH_LIMIT) --out runs/bench --readme README.md
