# One entry point for developers and CI. `make up` runs the whole system, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := $(UV) run --frozen python

.PHONY: help bootstrap sync up demo down status test test-unit test-integration lint format asyncapi schemas infra-up infra-down infra-status

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

bootstrap: ## Install uv when missing (from PyPI, into ~/.local/bin)
	@command -v uv >/dev/null 2>&1 || test -x $(HOME)/.local/bin/uv || \
		python3 -m pip install --user --quiet uv 2>/dev/null || \
		python3 -m pip install --user --quiet --break-system-packages uv

sync: bootstrap ## Create the Python environment from the lockfile
	@$(UV) sync --frozen --all-packages

up: sync ## Run the whole system: Kafka, PostgreSQL and every service (Ctrl-C stops the services)
	@$(PY) scripts/run_system.py

demo: sync ## Walk one learner through the whole journey against the running system (`make up` first)
	@$(PY) scripts/demo.py

infra-up: ## Start the project's own Kafka and PostgreSQL (downloads Kafka on first use)
	@python3 scripts/infra.py up

infra-down: ## Stop them
	@python3 scripts/infra.py down

infra-status: ## Show what runs
	@python3 scripts/infra.py status

test: sync infra-up ## Run every test: unit and integration, against real Kafka and PostgreSQL
	@$(UV) run --frozen pytest

test-unit: sync ## Only the tests that need no Kafka or PostgreSQL
	@$(UV) run --frozen pytest -m "not integration"

lint: sync ## ruff and mypy
	@$(UV) run --frozen ruff check .
	@$(UV) run --frozen ruff format --check .
	@$(UV) run --frozen mypy libs services tests scripts

format: sync ## Apply ruff's fixes and formatting
	@$(UV) run --frozen ruff check --fix .
	@$(UV) run --frozen ruff format .

schemas: sync ## Refresh the committed JSON-schema snapshots of the events
	@$(PY) -m microcred_events.snapshots

asyncapi: sync ## Regenerate the AsyncAPI document from the event models
	@$(PY) -m microcred_events.asyncapi

.PHONY: bench
bench: sync infra-up ## Benchmark the system (throughput, latency, ceiling, catalog API); figures in benchmarks/results/bench.txt
	@$(PY) benchmarks/pipeline.py $(BENCH_ARGS)

.PHONY: faults
faults: sync ## Fault injection, full form: 100,000 completions through 2 replicas a service, 3 brokers and PostgreSQL, each killed in turn
	@$(PY) scripts/faults.py --completions 100000 $(FAULTS_ARGS)
