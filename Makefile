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

# open3d needs the system library libusb-1.0-0.
system-deps:
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

# At this stage the demo generates the default synthetic world and prints who sees what.
demo: $(STAMP) system-deps
	$(BIN)/cpstream world generate --out $(DEMO_DIR) --seed 0 --frames 100
	$(BIN)/cpstream world stats $(DEMO_DIR)/synthetic_seed0 --json $(DEMO_DIR)/stats.json

bench-world: $(STAMP) system-deps
	$(BIN)/cpstream bench world --frames 30 --json out/bench-world.json

clean:
	rm -rf $(VENV) out *.egg-info
