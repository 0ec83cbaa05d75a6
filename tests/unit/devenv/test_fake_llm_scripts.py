"""The offline model's tool arguments: what the quick start's first answer calls."""

from dexorder.devenv.fake_llm.scripts import DEMO_PRICES, example_arguments

# The indicators tool's parameters as MCP lists them: a dataset or inline prices, both optional.
INDICATORS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "sma, ema, rsi, macd, bollinger or atr"},
        "dataset": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "prices": {
            "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "null"}],
            "default": None,
        },
        "period": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
    },
    "required": ["name"],
}


def test_an_optional_list_of_prices_gets_the_demo_prices_and_nothing_else_optional_is_set() -> None:
    assert example_arguments(INDICATORS, "what is my RSI?") == {
        "name": "rsi",
        "prices": DEMO_PRICES,
    }


def test_required_parameters_are_made_from_the_users_words() -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    assert example_arguments(schema, "remember this") == {"text": "remember this"}


def test_a_string_described_as_choices_takes_the_one_the_user_named_else_the_first() -> None:
    assert example_arguments(INDICATORS, "and the sma?")["name"] == "sma"
    assert example_arguments(INDICATORS, "hello")["name"] == "sma"
    assert example_arguments(INDICATORS, "What is my RSI?")["name"] == "rsi"
