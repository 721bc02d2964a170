# Two commands set everything up and run: `make demo` and `make test`.
# The first use creates .venv and installs the project; later uses reuse it
# (the stamp is renewed whenever pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: demo test test-all bench-world setup system-deps clean

setup: $(STAMP)

# open3d needs the system library libusb-1.0-0. The real packet-loss tests and `cpstream bench loss`
# need nftables (`nft`); without it (or without root) they are skipped with the reason. The video chat
# test drives Debian's Chromium (skipped, with the reason, without it).
system-deps:
	@if ! command -v nft >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing nftables (real packet loss for the loss tests and bench)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null 2>&1)) || \
	  echo "warning: could not install nftables; the real packet-loss tests will be skipped"; \
	fi
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (the video chat test drives the real page in headless Chromium)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	  echo "warning: could not install chromium; the browser chat test will be skipped"; \
	fi
	@if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else \
	    echo "error: open3d needs the system library libusb-1.0-0; install it (e.g. 'sudo apt-get install libusb-1.0-0') and rerun"; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

test-all: $(STAMP) system-deps
	$(BIN)/python -m pytest -m ''

# The demo: a fusion node and three agent processes on 127.0.0.1 streaming the embedded
# synthetic world (rendered once into out/launch-worlds/) at 10 Hz for 300 frames; a live
# table while it runs, then the JSON report (latency, bytes per frame, AP, counters).
demo: $(STAMP) system-deps
	$(BIN)/cpstream launch launch/demo.yaml --report $(DEMO_DIR)/report.json

bench-world: $(STAMP) system-deps
	$(BIN)/cpstream bench world --frames 30 --json out/bench-world.json

clean:
	rm -rf $(VENV) out *.egg-info
