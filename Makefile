# One way to run each thing. `make test` and `make bench` create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint typecheck unit unasync bench bench-check clean redis-server

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

# The Redis tests and benchmarks start their own redis-server processes (never the system
# service): Debian's package gives a current, maintained server; installed only when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server is not on PATH: installing Debian's redis-server package"; \
		log=$$(mktemp); \
		if command -v apt-get >/dev/null 2>&1 && { apt-get install -y redis-server >"$$log" 2>&1 || \
			{ apt-get update >>"$$log" 2>&1 && apt-get install -y redis-server >>"$$log" 2>&1; }; } && \
			command -v redis-server >/dev/null 2>&1; then rm -f "$$log"; else \
			tail -n 20 "$$log" >&2; rm -f "$$log"; \
			echo "could not install redis-server (it takes apt-get, as root); install Redis 6.2" \
				"or newer so that redis-server is on PATH, then run make again" >&2; \
			exit 1; \
		fi; }

unit: $(VENV)/.dev redis-server
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage report --fail-under=90

# Each script records its targets in $(BENCH_RESULTS); the run ends with their table.
# `make bench` fails only when a benchmark breaks; `make bench-check` also when a target is missed.
BENCH_RESULTS := $(VENV)/bench-results.jsonl

bench: $(VENV)/.bench redis-server
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
