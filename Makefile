# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test serve console screenshots proto proto-check docs docs-check lint imports typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/certbroker demo

serve: $(STAMP)
	@echo "web console: in another terminal, make console (http://127.0.0.1:8080/)"
	$(BIN)/certbroker serve

## The web console for auditors, hall supervisors and security officers (docs/console.md).
console: $(STAMP)
	$(BIN)/certbroker console

## The screenshots in docs/console.md: a broker and a console on free ports, a few lookups,
## Chromium (Playwright) on each main page.
screenshots: $(STAMP)
	$(BIN)/python scripts/screenshots.py docs/console

## The one command that regenerates certbroker/v1 from proto/.
proto: $(STAMP)
	$(BIN)/python scripts/protogen.py

proto-check: $(STAMP)
	$(BIN)/python scripts/protogen.py --check

## The README's configuration reference, generated from the declarations in certbroker/config.py.
docs: $(STAMP)
	$(BIN)/python scripts/docgen.py

docs-check: $(STAMP)
	$(BIN)/python scripts/docgen.py --check

lint: $(STAMP)
	$(BIN)/ruff check certbroker tests scripts bench
	$(BIN)/ruff format --check certbroker tests scripts bench

## The architecture: layers, what adapters may import, no import cycles ([tool.importlinter]).
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -n auto

test: proto-check docs-check lint imports typecheck unit

## Benchmarks with real broker/adapter processes (several minutes); a table per scenario.
## `make bench BENCH_ARGS=--write` also records the results in docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .certbroker .pytest_cache .mypy_cache .ruff_cache
