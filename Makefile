# One entry point for setting up, running and checking pqctl.
#   make run     set up .venv and run the main job on this host: plan the built-in model, serve
#                it (one process per stage), print a generated sample, stop; then, in a
#                terminal, open the dashboard (pqctl) on the same default (DASHBOARD=0 skips it)
#   make test    set up .venv and run the test suite
#   make check   lint, type-check, import contracts and tests (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; on a CUDA machine install the torch build you need first
# (e.g. `TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make setup`).
TORCH_SPEC ?= torch==2.13.0
# make run opens the dashboard after the sample when standard input and output are a terminal
DASHBOARD ?= 1
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck contracts check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/pqctl plan --local -o plan.json
	$(BIN)/pqctl apply plan.json --detach --name quickstart --endpoint 'tcp://127.0.0.1:*'
	$(BIN)/pqctl generate --name quickstart --max-new 64 "ROMEO:"; \
	status=$$?; $(BIN)/pqctl stop --name quickstart; exit $$status
	@if [ "$(DASHBOARD)" = 1 ] && [ -t 0 ] && [ -t 1 ]; then \
		echo "opening the dashboard (pqctl): 1-4 switch tabs, ? help, Ctrl+Q quits"; \
		$(BIN)/pqctl; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

contracts: $(STAMP)
	$(BIN)/lint-imports

check: lint typecheck contracts test

bench: $(STAMP)
	$(BIN)/python bench/plan_search.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
