# chatd: `make run` starts the daemon, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-all lint fmt clean bench bench-quick bench-profile

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/chatd --config etc/chatd.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# Everything, the slow tests included (CI runs this too).
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# The benchmark of issue 7 (see bench/chatbench.py and README "Performance").
bench: $(STAMP)
	$(BIN)/python bench/chatbench.py

bench-quick: $(STAMP)
	$(BIN)/python bench/chatbench.py --quick

# One round with chatd sampled by py-spy; collapsed stacks in bench/results/profile/.
bench-profile: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python bench/chatbench.py --quick --profile bench/results/profile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
