# One way to run each thing. `make test` and `make bench` create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint typecheck unit unasync bench bench-check clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "resilient needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	@touch $@

test: lint typecheck unit

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/unasync.py --check

# The sync twins of the async healthy paths are generated: edit the async code, then run this.
unasync: $(VENV)/.dev
	$(BIN)/python scripts/unasync.py

typecheck: $(VENV)/.dev
	$(BIN)/mypy --strict resilient

unit: $(VENV)/.dev
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report --fail-under=90

# Each script records its targets in $(BENCH_RESULTS); the run ends with their table.
# `make bench` fails only when a benchmark breaks; `make bench-check` also when a target is missed.
BENCH_RESULTS := $(VENV)/bench-results.jsonl

bench: $(VENV)/.bench
	@rm -f $(BENCH_RESULTS)
	@for script in benchmarks/*.py; do \
		case "$$script" in benchmarks/_*) continue;; esac; \
		echo "== $$script"; \
		RESILIENT_BENCH_RESULTS=$(BENCH_RESULTS) $(BIN)/python "$$script" || exit 1; \
	done
	@$(BIN)/python benchmarks/_targets.py $(BENCH_RESULTS)

bench-check: bench
	@$(BIN)/python benchmarks/_targets.py $(BENCH_RESULTS) --check > /dev/null

# Five KV node processes, a naive quorum client and ClusterClient side by side through
# scheduled faults; under 2 minutes, every process stopped at the end (also on Ctrl-C).
.PHONY: demo
demo: $(VENV)/.dev
	$(BIN)/python demo/cluster.py

clean:
	rm -rf $(VENV) .coverage .mypy_cache .pytest_cache .ruff_cache
