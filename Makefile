# Guild — the two commands a newcomer runs: `make demo` and `make test`.
# `make worker GPU=N` pins a worker to GPU N (named gpuN@host); GPU=cpu starts a CPU worker (cpu0@host);
# the default, GPU=auto, is GPU 0 where nvidia-smi lists one and a CPU worker elsewhere.
SHELL := /bin/bash
PY := .venv/bin/python
export GUILD_HOME ?= $(CURDIR)/var
GPU ?= auto
# GPUS=0,1,2,3: one worker owning those GPUs (named gpu0-3@host); GPU=N (one GPU), GPU=cpu, GPU=auto still work.
GPUS ?=
WORKER_GPUS = $(if $(GPUS),$(GPUS),$(GPU))
STAMP := .venv/.installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv up down demo worker flower test test-fast lint bench doctor clean chromium

# ---- install ---------------------------------------------------------------------------------------------
# Where `nvidia-smi -L` lists a GPU: the CUDA build of torch from the default index, and the `gpu` extra when
# pyproject.toml defines one. Elsewhere: the CPU build from PyTorch's CPU wheel index (no multi-GB CUDA
# libraries); if that index does not answer within seconds (no retries), torch from the default index instead.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@extras=dev; \
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch $(TORCH_VERSION)"; \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)" || exit 1; \
	  if grep -Eq '^[[:space:]]*gpu[[:space:]]*=' pyproject.toml; then extras=dev,gpu; fi; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q --timeout 10 --retries 0 --index-url "$(TORCH_CPU_INDEX)" "torch==$(TORCH_VERSION)" \
	    2>/dev/null || { \
	    echo "  that index did not answer (or lacks torch $(TORCH_VERSION)): installing torch from the default index"; \
	    $(PY) -m pip install -q "torch==$(TORCH_VERSION)" || exit 1; }; \
	fi; \
	$(PY) -m pip install -q -e ".[$$extras]"
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
# max_length 1024 (the tiny hero's context; its default 256 cuts 51 of the 240 examples, 23% of the tokens) cuts
# 2 examples, 58 of 40,653 tokens; batch_size 2 keeps ~19 steps, as long as the default run takes.
DEMO_SETS := --set max_length=1024 --set batch_size=2
demo: up
	@$(PY) -m enqueue examples/chat_small.jsonl --priority high --force --wait $(DEMO_SETS)

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
