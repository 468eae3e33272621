# Fresh machine: `make demo` (playground) or `make test` (the whole suite, what CI runs).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
APT_PACKAGES = espeak-ng sox mosquitto chromium chromium-driver ffmpeg

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

# The browser playground (`voice-agent serve`) is not in yet: the demo speaks a sentence
# with espeak-ng and runs the live pipeline over it.
demo: setup
	espeak-ng -v en-us -s 150 -w demo.wav "Hello agent. Please turn on the kitchen light."
	voice-agent run --model auto demo.wav

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	voice-agent bench vad
	voice-agent bench inference
