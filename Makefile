# The commands the README names. `make demo` and `make test` install what is missing first.
.PHONY: setup demo chat test lint check-venv unit integration bench lock lock-upgrade clean

SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv/bin
export LITELLM_LOCAL_MODEL_COST_MAP := True

setup:
	@scripts/bootstrap.sh

# The demo needs PostgreSQL and the Python package only: its own lighter bootstrap.
demo:
	@scripts/bootstrap.sh demo
	$(VENV)/dexorder demo $(DEMO_ARGS)

chat:
	$(VENV)/dexorder chat

lint: setup
	$(VENV)/ruff check src tests bench
	$(VENV)/ruff format --check src tests bench
	$(VENV)/mypy
	$(VENV)/lint-imports

test: setup check-venv lint
	$(VENV)/pytest -m "not kind" tests

# .venv equals a new venv installed from uv.lock, and uv.lock matches pyproject.toml.
check-venv: setup
	@scripts/check-venv.sh

# uv.lock from pyproject.toml's ranges, keeping every locked version that still fits them.
lock: setup
	@. scripts/uv-env.sh && $(VENV)/uv lock

# The weekly upgrade: every package to its newest version within the ranges, the whole suite
# on it, and what changed in test-artifacts/lock-upgrade.txt (for the commit message).
lock-upgrade: setup
	@scripts/lock-upgrade.sh
	$(MAKE) test
	@echo "lock-upgrade: the suite passed; what changed is in test-artifacts/lock-upgrade.txt"

unit: setup
	$(VENV)/pytest tests/unit

integration: setup
	$(VENV)/pytest tests/integration

bench: setup
	$(VENV)/dexorder bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
