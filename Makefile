# What a person runs. `make serve` and `make test` need nothing but Python 3.10+ and Java 17.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NAME ?= sdxl
VERSION ?= 1.0
MODEL_DIR ?=
# A value in single quotes for the shell, its own quotes escaped: MODEL_DIR="/data/Bob's
# models" was a shell syntax error ("unexpected EOF while looking for matching `''").
quote = '$(subst ','\'',$(1))'
MODEL_DIR_ARG := $(if $(MODEL_DIR),--model-dir $(call quote,$(MODEL_DIR)),)
PYTEST_ARGS ?=
# More options of serve.py / serve_jobs.py (make serve SERVE_ARGS=--rebuild).
SERVE_ARGS ?=
# Versions a rollout keeps registered, the default one included.
KEEP ?= 3

.PHONY: help venv model archive serve serve-jobs serve-triton rollout rollback test test-unit test-handler test-e2e test-k8s test-jobs fetch-sdxl docs clean lock \
	bench bench-check bench-baseline

help:
	@echo "make serve      build what is missing and serve the model (MODEL_DIR=... for real SDXL;"
	@echo "                SERVE_ARGS=--rebuild builds the archive again)"
	@echo "make serve-jobs the job API too: Redis, TorchServe, a dispatcher, the API (docs/jobs.md)"
	@echo "make serve-triton  the same model on Triton Inference Server (docs/triton.md)"
	@echo "make test       the whole suite: unit, handler in process, end to end, job API,"
	@echo "                Triton, the playground in a real browser, manifests"
	@echo "make archive    model_store/$(NAME)-$(VERSION).mar (VERSION=..., MODEL_DIR=...)"
	@echo "make fetch-sdxl download SDXL base 1.0 (needs the model hub)"
	@echo "make lock       requirements.lock: the image's pins with hashes (needs the package index)"
	@echo "make rollout VERSION=2.0  make model_store/$(NAME)-2.0.mar the serving version"
	@echo "make rollback  the kept version that served before the serving one serves again"
	@echo "make bench     CPU benchmark; last line is JSON (BENCH_ARGS=\"--threads 1\" ...)"
	@echo "make bench-check     the benchmark, failing if a p95 is >20 % over bench/baseline.json"
	@echo "make bench-baseline  the benchmark, stored as bench/baseline.json (quiet machine)"

# The venv is rebuilt when the pins change.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-triton.txt requirements-triton-stub.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-triton.txt
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/triton-stub-site -r requirements-triton-stub.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

model: venv
	$(PY) scripts/build_model.py

archive: venv
	$(PY) scripts/build_archive.py --name '$(NAME)' --version '$(VERSION)' $(MODEL_DIR_ARG)

serve: venv
	$(PY) scripts/serve.py --name '$(NAME)' --version '$(VERSION)' $(MODEL_DIR_ARG) $(SERVE_ARGS)

# Redis (ours unless SDXL_REDIS_URL, on SDXL_REDIS_PORT or a free port), TorchServe, a
# dispatcher and the job API on SDXL_JOBS_ADDRESS (default http://127.0.0.1:8090), in the
# foreground (docs/jobs.md).
serve-jobs: venv
	$(PY) scripts/serve_jobs.py --name '$(NAME)' --version '$(VERSION)' $(MODEL_DIR_ARG) $(SERVE_ARGS)

# Triton Inference Server with the `sdxl` model (triton-models/, docs/triton.md) in the foreground,
# on loopback: ports SDXL_TRITON_HTTP_PORT / _GRPC_PORT / _METRICS_PORT (8000, 8001, 8002).
serve-triton: venv
	$(PY) scripts/serve_triton.py $(MODEL_DIR_ARG)

# On the running server (make serve): register, check, switch, drain, prune (docs/rollouts.md).
rollout: venv
	@test "$(origin VERSION)" != file || { echo "usage: make rollout VERSION=2.0" >&2; exit 2; }
	$(PY) scripts/rollout.py --name '$(NAME)' --version '$(VERSION)' --keep $(KEEP) $(MODEL_DIR_ARG)

rollback: venv
	$(PY) scripts/rollout.py --name '$(NAME)' --rollback --keep $(KEEP)

# docs/api.md's field table and config/request.schema.json come from sdxl_serve.contract.
docs: venv
	$(PY) scripts/contract_docs.py

fetch-sdxl: venv
	$(PY) scripts/fetch_sdxl.py

# The image's pip install, every package pinned with its hashes (Dockerfile: --require-hashes),
# resolved for the image's Python 3.12 on x86_64 Linux (CUDA wheels), not for this machine.
# Run after changing requirements.txt; tests/unit/test_image_context.py checks they agree.
lock: venv
	$(VENV)/bin/uv pip compile --quiet --no-config --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes \
	  --custom-compile-command "make lock" --output-file requirements.lock requirements.txt

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-handler: venv
	$(PY) -m pytest -m handler $(PYTEST_ARGS)

test-e2e: venv
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

# The job API against real Redis (and TorchServe for its end-to-end tests).
test-jobs: venv
	$(PY) -m pytest -m jobs $(PYTEST_ARGS)

# Renders every overlay, validates it, runs promtool on the alert rules (k8s/README.md).
test-k8s: venv
	$(PY) -m pytest -m k8s $(PYTEST_ARGS)

# The benchmark (scripts/bench.py): 7 to 27 minutes on 2 CPU cores; report, plot and
# result.json in build/bench/. Measure on a quiet machine: numbers from a busy one are noise.
BENCH_ARGS ?=
BASELINE ?= bench/baseline.json

bench: venv
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Exit 1: a p95 regressed by more than 20 %; exit 2: too noisy or another machine to judge.
bench-check: venv
	$(PY) scripts/bench.py --check $(BASELINE) $(BENCH_ARGS)

bench-baseline: venv
	$(PY) scripts/bench.py --write-baseline $(BASELINE) $(BENCH_ARGS)

clean:
	rm -rf build model_store .pytest_cache
