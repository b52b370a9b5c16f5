# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs:
# a virtual environment with pinned dependencies, and mosquitto (apt-get) when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help deps mosquitto mbpoll interop test test-all explore demo bench faults lint clean

help:
	@echo "make demo   run the simulated packing line, broker, WMS/ERP stand-ins and the agent"
	@echo "make test   run the test suite (unit, integration, end to end)"
	@echo "make bench  run the benchmarks and write bench/results.md"
	@echo "make faults run the fault-injection suite and write bench/faults.md"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "edge-agent needs Python 3.11 or newer"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

deps: $(STAMP) mosquitto mbpoll interop

# mosquitto is the broker the tests and the demo use; install it when it is missing.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		echo "mosquitto not found: installing it with apt-get"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
		$$SUDO apt-get install -y mosquitto >/dev/null 2>&1 || \
		{ $$SUDO apt-get update >/dev/null 2>&1 && $$SUDO apt-get install -y mosquitto >/dev/null 2>&1; } || \
		echo "could not install mosquitto: the demo uses its embedded broker (amqtt); the tests need mosquitto"; \
	fi

# mbpoll (Debian) is the Modbus client we did not write that the interop test reads our
# simulators with; only the tests need it.
mbpoll:
	@if ! command -v mbpoll >/dev/null 2>&1; then \
		echo "mbpoll not found: installing it with apt-get"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
		$$SUDO apt-get install -y mbpoll >/dev/null 2>&1 || \
		{ $$SUDO apt-get update >/dev/null 2>&1 && $$SUDO apt-get install -y mbpoll >/dev/null 2>&1; } || \
		echo "could not install mbpoll: the Modbus interop test will fail"; \
	fi

# node-opcua: an OPC UA server we did not write, for the interoperability test.
interop: tests/interop/node_modules/.installed

tests/interop/node_modules/.installed: tests/interop/package.json
	@command -v npm >/dev/null 2>&1 || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
		$$SUDO apt-get install -y nodejs npm >/dev/null 2>&1; }
	cd tests/interop && npm install --no-audit --no-fund --silent
	@touch $@

test: deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=25

lint: $(STAMP)
	$(BIN)/ruff check edge_agent simulators tests bench

# The soak tests too (long).
test-all: deps
	$(BIN)/python -m pytest -q -m '' -p no:cacheprovider

# Property tests with fresh random examples (make test always draws the same ones).
explore: deps
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_rule_determinism.py

demo: deps
	$(BIN)/edge-agent demo

bench: deps
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.modbus_poll
	$(BIN)/python -m bench.opcua_subscribe

# The whole fault-injection suite (long; a short tier of it runs in make test).
faults: deps
	$(BIN)/python -m faults.run

clean:
	rm -rf $(VENV) .demo .pytest_cache
