# The README's commands. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run chaos bench mutate test test-fast lint typecheck pytest lock clean

# Create .venv with the locked dependencies; does nothing when already up to date.
install: $(STAMP)

$(STAMP): requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/dev.txt
	touch $(STAMP)

# Debian packages the suite drives: Chromium for the browser tests, Prometheus (and its
# promtool) for the alert rules' tests and the lab. Installed when missing; a failed
# install stops `make test` (those tests never skip quietly).
system-deps:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || { echo "make: Chromium could not be installed (apt-get install chromium); the browser tests need it" >&2; exit 1; }
	@test -x /usr/bin/promtool || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || { echo "make: Prometheus could not be installed (apt-get install prometheus); the alert tests need it" >&2; exit 1; }

# Start the whole shop in one terminal (web, gateway, one worker per queue, beat, Flower); Ctrl-C stops it.
# ARGS=--prometheus also starts Prometheus with the alert rules.
run: install
	$(BIN)/python deploy/run_local.py $(ARGS)

# The failure lab: orders over HTTP while workers, web and Redis are killed; a verdict.
chaos: install system-deps
	mkdir -p var && $(BIN)/python -m deploy.chaos $(ARGS)

# How fast, measured side by side: every scenario against its baseline; report in var/bench/.
bench: install
	$(BIN)/python -m deploy.bench $(ARGS)

# Mutation testing of the reliability core: each module's score; survivors in var/mutate/.
mutate: install
	$(BIN)/python -m deploy.mutate $(ARGS)

# The whole suite: lint, format check, import contract, types, tests.
test: install system-deps lint typecheck pytest

# The edit-run loop: the same checks and every test that starts no worker, web or lab.
test-fast: install lint typecheck
	$(BIN)/pytest -m "not stack"

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
