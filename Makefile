# Guild — the two commands a newcomer runs: `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export GUILD_HOME ?= $(CURDIR)/var
GPU ?= 0
# GPUS=0,1,2,3: one worker owning those GPUs (named gpu0-3@host); GPU=N, one GPU, still works.
GPUS ?=
WORKER_GPUS = $(if $(GPUS),$(GPUS),$(GPU))
STAMP := .venv/.installed

.PHONY: venv up down demo worker flower test test-fast lint bench doctor clean chromium

# ---- install: CPU torch where there is no NVIDIA GPU, the normal (CUDA) build where there is -------------
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch"; $(PY) -m pip install -q torch; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# ---- services -----------------------------------------------------------------------------------------
up: $(STAMP)
	@scripts/embedded_redis.sh up
	@scripts/services.sh worker $(WORKER_GPUS)
	@scripts/services.sh flower

down:
	@scripts/services.sh down
	@scripts/embedded_redis.sh down

worker: $(STAMP)
	@scripts/embedded_redis.sh up
	@scripts/services.sh worker $(WORKER_GPUS)

flower: $(STAMP)
	@scripts/embedded_redis.sh up
	@scripts/services.sh flower

# ---- the main job: enqueue the shipped examples for the tiny hero and follow it to the end -------------
demo: up
	@$(PY) -m enqueue examples/chat_small.jsonl --priority high --force --wait

doctor: $(STAMP)
	@$(PY) -m doctor

# ---- checks ---------------------------------------------------------------------------------------------
# ---- headless Chromium for tests/test_flower.py's browser check (skipped, not failed, without it) ---------
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the Flower browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no chromium (install: apt-get install -y chromium): the Flower browser test will be skipped"; fi; }

test: $(STAMP) chromium
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/enqueue_latency.py
	$(PY) bench/engine_vs_hf.py

clean: down
	rm -rf var test-artifacts
