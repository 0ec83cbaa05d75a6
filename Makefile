# The commands the README names. `make demo` and `make test` install what is missing first.
.PHONY: setup demo chat test lint unit integration bench clean

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
