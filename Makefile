# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv and run the embedded-default pipeline
#   make test   set up .venv and run the test suite
# Both reuse the environment on later runs. `make browser` (Debian/Ubuntu, as root) installs the system Chromium
# that the browser tests drive; without it they are skipped.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install. The default is a pair that imports together on a CPU-only machine.
# On a GPU box, put your CUDA pair here, or install it into the venv first: an installed torch is kept.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= playground/data/shapes
RUNS ?= runs/shapes
SEED ?= 0
# extra llava-uta-quickstart flags, e.g. ARGS=--compare, ARGS=--serve, ARGS="--student-steps 600"
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.llava-uta-installed

.PHONY: setup demo test browser lint clean-data clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/python -c "import torch, torchvision; \
		print('torch==' + torch.__version__.split('+')[0]); \
		print('torchvision==' + torchvision.__version__.split('+')[0])" > $(VENV)/torch-constraints.txt
	$(BIN)/pip install -c $(VENV)/torch-constraints.txt -e ".[dev]"
	touch $@

# The embedded-default pipeline (llava-uta-quickstart): every stage whose output exists is skipped, so an
# interrupted `make demo` resumes where it stopped.
demo: $(STAMP)
	$(BIN)/llava-uta-quickstart --data $(DATA) --runs $(RUNS) --seed $(SEED) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Chromium for the browser tests in tests/test_web.py (apt, as root; a no-op when /usr/bin/chromium exists).
browser:
	sh tests/install_chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean-data:
	rm -rf $(DATA)

clean-runs:
	rm -rf $(RUNS)
