# lipapers: `make repro` and `make test` do all set-up on a fresh machine (Python 3.11, pip, apt).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lipapers-installed
APT_PKGS := chromium dataset-fashion-mnist ferret-datasets
NPM_ASSETS := @jupyter-widgets/html-manager@1.0.15:html-manager mathjax@3.2.2:mathjax
export TRITON_INTERPRET ?= 1
# plotly figures are stored as their JSON mimetype only (no 3 MB of plotly.js per notebook); the docs draw them
export PLOTLY_RENDERER ?= plotly_mimetype

.PHONY: setup repro test test-all lab docs export clean-nbs

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py settings.ini
	@echo "setup [1/5] virtual environment $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup [2/5] Python packages from requirements.txt (about 4 minutes on a fresh machine)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -r requirements.txt  # one line per package: progress, not silence
	@echo "setup [3/5] pinned packages without dependencies, and lipapers itself"
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip uninstall -q -y rfc3987-syntax  # optional dep of jupyter-events; costs ~2 s on every nbformat import
	@echo "setup [4/5] apt packages ($(APT_PKGS)) and [5/5] offline web assets (MathJax, widget renderer)"
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing apt packages: $$missing (run: sudo apt-get install -y $$missing)"; exit 1; fi; fi
	@for a in $(NPM_ASSETS); do pkg=$${a%:*}; dir=$(VENV)/share/lipapers/$${a#*:}; \
	  if [ ! -d $$dir/package ]; then mkdir -p $$dir && (cd $$dir && npm pack -q $$pkg >/dev/null && tar xzf *.tgz && rm -f *.tgz); fi; done
	@touch $(STAMP)
	@echo "setup done: $(VENV) ready; next: make repro (every chapter, then the docs in _docs/) or make test"

repro: setup
	$(BIN)/lipapers repro

test: setup  # the suite within its budget (README, "Test budget"): checks marked slow are left out
	$(BIN)/python -m pytest -n 2 -m "not slow" tests

test-all: setup  # everything, the slow checks too
	$(BIN)/python -m pytest -n 2 tests

lab: setup
	$(BIN)/lipapers lab

docs: setup
	$(BIN)/python -c "from lipapers.docs import build; build(quiet=False)"

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
