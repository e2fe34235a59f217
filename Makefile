# Run it: `make demo`. Test it: `make test`. Needs only python3 (3.11+) and make: the first
# target to run creates .venv and installs the project with its dev extras into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install; pip runs again only when pyproject.toml is newer.
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv demo test lint bench bench-ops coverage clean

help:
	@echo "make demo      run the engine against an embedded broker and Postgres"
	@echo "make test      ruff, mypy, then the whole pytest suite under coverage, with its floor (PYTEST_ARGS=... to narrow)"
	@echo "make lint      ruff and mypy only"
	@echo "make bench     the benchmarks of the live path, (a) to (g)"
	@echo "make bench-ops sweep over 100,000 mentors and replay of 1,000,000 events"
	@echo "make coverage  the test suite under coverage: missing lines and htmlcov/, no floor"
	@echo "make venv      create .venv and install the project (done by the targets above)"
	@echo "make clean     remove .venv and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$(PYTHON) is older than 3.11: set PYTHON=python3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
		|| { echo "'$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/milestones demo $(DEMO_ARGS)

# The suite runs under coverage (branches, this process only: the milestones processes that the
# e2e and fault tests start are not measured). A whole run fails under the floor set in
# pyproject.toml ([tool.coverage.report] fail_under); a run narrowed by PYTEST_ARGS reports
# without the floor.
test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage report $(if $(PYTEST_ARGS),--fail-under=0)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m benchmarks

bench-ops: venv
	$(BIN)/python -m benchmarks.operations

coverage: venv
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage report --show-missing --fail-under=0
	$(BIN)/coverage html --fail-under=0

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage .coverage.* htmlcov build dist
	find . -name '*.egg-info' -prune -exec rm -rf {} +
	find . -name __pycache__ -prune -exec rm -rf {} +
