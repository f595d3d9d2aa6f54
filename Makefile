# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install players run test lint typecheck unit clean loadtest

SCENARIO ?= baseline

install: $(STAMP)

# Re-install only when the project metadata changes; editable install covers code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Browsers and hls.js for tests/test_players.py, nginx for tests/test_nginx.py (apt as root,
# npm ci); fast when present.
players:
	bash tests/players/install.sh

run: install
	$(BIN)/resizer serve

lint: install
	$(BIN)/ruff check resizer tests loadtest
	$(BIN)/ruff format --check resizer tests loadtest
	$(BIN)/mypy

unit: install players
	$(BIN)/pytest -q

test: lint unit

# Starts a server with the scenario's configuration, loads it, writes
# loadtest/results/$(SCENARIO)/report.md (+ result.json, plots). DURATION/CONCURRENCY/WORKERS/MISS_RATE/PLAYBACK override.
loadtest: install
	$(BIN)/python -m loadtest.driver $(SCENARIO) \
		$(if $(DURATION),--duration $(DURATION)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(MISS_RATE),--miss-rate $(MISS_RATE)) \
		$(if $(PLAYBACK),--playback $(PLAYBACK))

clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache tests/players/node_modules
