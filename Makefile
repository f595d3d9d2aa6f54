# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit clean

install: $(STAMP)

# Re-install only when the project metadata changes; editable install covers code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/resizer serve

lint: install
	$(BIN)/ruff check resizer tests
	$(BIN)/ruff format --check resizer tests
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

test: lint unit

clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache
