# Fresh machine: `make demo` (playground) or `make test` (the whole suite, what CI runs).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
APT_PACKAGES = espeak-ng sox mosquitto chromium chromium-driver ffmpeg docker-compose

.PHONY: setup system-packages demo test test-fast bench

system-packages:
	@if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
setup: system-packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: setup
	voice-agent serve --model auto --host 127.0.0.1 --port 8080

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	voice-agent bench vad
	voice-agent bench inference
