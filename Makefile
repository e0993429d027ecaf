# Two commands do all set-up on a fresh machine: `make dev` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test chromium lint bench bench-channels chaos soak clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/python -m core.devstack

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-channels: $(STAMP)
	$(BIN)/python -m bench.channels

# Faults under load (bench/README.md): 10,000 events, worker SIGKILLed 5x, Temporal and
# PostgreSQL restarted once; counted at the sinks and in the database.
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

# Memory and errors under steady load: `make soak MINUTES=30 RATE=250`.
MINUTES ?= 30
RATE ?= 250
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $(MINUTES) --rate $(RATE)

# A headless browser for tests/api/test_docs_offline.py: Debian's chromium (Playwright drives
# it; it downloads no browser). A machine keeps nothing installed by hand, so this checks every
# time and installs only when it is missing (a no-op otherwise).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v chromium >/dev/null

clean:
	rm -rf $(VENV) .data
