# The README's commands. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run chaos bench test lint typecheck pytest lock clean

# Create .venv with the locked dependencies; does nothing when already up to date.
install: $(STAMP)

$(STAMP): requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/dev.txt
	touch $(STAMP)

# Start the whole shop in one terminal (web, gateway, one worker per queue, beat, Flower); Ctrl-C stops it.
run: install
	$(BIN)/python deploy/run_local.py

# The failure lab: orders over HTTP while workers, web and Redis are killed; a verdict.
chaos: install
	mkdir -p var && $(BIN)/python -m deploy.chaos $(ARGS)

# How fast, measured side by side: every scenario against its baseline; report in var/bench/.
bench: install
	$(BIN)/python -m deploy.bench $(ARGS)

# The whole suite: lint, format check, import contract, types, tests.
test: install lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy .

pytest: install
	$(BIN)/pytest

# Re-resolve the hashed lock files after editing pyproject.toml.
lock: install
	$(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 -o requirements/base.txt -q
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements/dev.txt -q

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
