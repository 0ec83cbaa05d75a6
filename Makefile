# The commands the README names. `make demo` and `make test` install what is missing first.
.PHONY: setup demo test lint unit integration bench clean

VENV := .venv/bin
export LITELLM_LOCAL_MODEL_COST_MAP := True

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/dexorder demo

lint: setup
	$(VENV)/ruff check src tests bench
	$(VENV)/ruff format --check src tests bench
	$(VENV)/mypy
	$(VENV)/lint-imports

test: setup lint
	$(VENV)/pytest -m "not kind" tests

unit: setup
	$(VENV)/pytest tests/unit

integration: setup
	$(VENV)/pytest tests/integration

bench: setup
	$(VENV)/dexorder bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
