# keel — set-up and everyday commands. `make serve` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHROMIUM ?= /usr/bin/chromium

.PHONY: install serve test test-fast lint fmt bench clean browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -U pip
	@echo "installing keel with the dev, local and embeddings extras (llama-cpp-python compiles once, a few minutes)..."
	@# torch first and pinned: the CPU build (a range alone can resolve to a multi-GB CUDA build)
	$(BIN)/python -m pip install --disable-pip-version-check -q 'torch==2.13.0'
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,local,embeddings]'
	@touch $(STAMP)

install: $(STAMP)

serve: install  ## start keel on http://127.0.0.1:4000 (SQLite in ./.keel/)
	$(BIN)/keel serve

browser:  ## Debian's chromium for the UI tests (Playwright drives it; nothing is downloaded by Playwright)
	@test -x $(CHROMIUM) || (command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
		(echo "the UI tests need Debian's chromium at $(CHROMIUM) (apt-get install chromium)"; exit 1)

lint: install  ## ruff, mypy, import-linter (layers of ARCHITECTURE.md)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: install browser lint  ## the whole suite: SQLite leg and PostgreSQL + Redis leg
	$(BIN)/python -m pytest

test-fast: install  ## the suite on SQLite only, without the browser tests
	KEEL_TEST_BACKENDS=sqlite $(BIN)/python -m pytest -m "not ui"

fmt: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install  ## gateway vs direct vs minimal proxy, one run
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .keel .pytest_cache .mypy_cache .ruff_cache
