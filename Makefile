# Two commands do all set-up (each creates or reuses .venv):
#   make train   install, then train the default digits job
#   make test    install, then lint (ruff, import layers) and run the test suite
# make test-fast: the same lint, then only the unit tier (pytest -m unit), in under 3 minutes.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: train test test-fast install

install: $(VENV)/.installed

# Re-install whenever the dependencies in pyproject.toml change.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

train: install
	$(BIN)/dist-train train configs/digits.yaml $(ARGS)

# Two test files at a time (loadfile keeps a file's shared fixtures and its SLURM cluster in
# one worker); PYTEST_ARGS= runs them one by one.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier only (in-process, no subprocess; pyproject.toml's markers): what to run while
# working. `pytest -m multiprocess` and `-m system` run the other two tiers; `make test` all three.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m unit -n 2 --dist loadfile
