"""``litellm_cost``: LiteLLM's own numbers, without asking LiteLLM on every turn.

The reference is what ``litellm_cost`` computed before it kept prices: LiteLLM's
``cost_per_token`` on each call, its two parts added.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from dexorder.gateway.llm.adapter import load_litellm
from dexorder.gateway.llm.pricing import litellm_cost

#: Priced per token, by the four providers of config/models.yaml (and their plain names).
LINEAR = [
    "gpt-4o",
    "openai/gpt-4.1-mini",
    "openai/gpt-4.1",
    "anthropic/claude-sonnet-4-5",
    "claude-haiku-4-5",
    "gemini/gemini-2.5-flash",
]
#: Priced otherwise: a higher rate past 200k prompt tokens; a rate by the time of day.
IRREGULAR = ["gemini/gemini-2.5-pro", "deepseek/deepseek-v4-flash"]
UNKNOWN = ["openai/no-such-model-anywhere", "bench", "openai/bench"]

TOKENS = [
    (0, 0),
    (1, 0),
    (0, 1),
    (1, 1),
    (17, 3),
    (1234, 567),
    (8191, 4097),
    (127_999, 1),
    (128_001, 5),
    (199_999, 10),
    (200_000, 10),
    (200_001, 10),
    (272_001, 7),
    (999_999, 123_457),
    (3_000_000, 2_000_000),
]
_draw = random.Random(20261124)
TOKENS += [(_draw.randrange(0, 2_000_000), _draw.randrange(0, 200_000)) for _ in range(60)]


def litellm_itself(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    litellm = load_litellm()
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # what litellm raises for a model it does not know
        return None
    total = float(prompt_cost) + float(completion_cost)
    return total if total >= 0 else None


def test_the_models_named_here_are_in_litellms_map() -> None:
    litellm = load_litellm()
    for model in LINEAR + IRREGULAR:
        info = litellm.get_model_info(model=model)
        assert info["input_cost_per_token"]
    assert load_litellm().get_model_info(model="gemini/gemini-2.5-pro")[
        "input_cost_per_token_above_200k_tokens"
    ]
    assert load_litellm().get_model_info(model="deepseek/deepseek-v4-flash")["off_peak_pricing"]


@pytest.mark.parametrize("model", LINEAR + IRREGULAR + UNKNOWN)
def test_the_price_is_litellms_to_the_last_bit(model: str) -> None:
    for prompt_tokens, completion_tokens in TOKENS:
        expected = litellm_itself(model, prompt_tokens, completion_tokens)
        assert litellm_cost(model, prompt_tokens, completion_tokens) == expected, (
            model,
            prompt_tokens,
            completion_tokens,
        )
    if model in UNKNOWN:
        assert expected is None
    else:
        assert expected is not None
        assert expected > 0


def test_a_linear_price_asks_litellm_no_more_after_the_first_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = {model: litellm_itself(model, 1234, 567) for model in LINEAR + IRREGULAR + UNKNOWN}
    for model in expected:
        litellm_cost(model, 1, 1)  # each model's first turn

    def unavailable(**_: Any) -> tuple[float, float]:
        raise RuntimeError("litellm was asked")

    monkeypatch.setattr(load_litellm(), "cost_per_token", unavailable)
    for model in LINEAR:
        assert litellm_cost(model, 1234, 567) == expected[model]
    for model in UNKNOWN:
        assert litellm_cost(model, 1234, 567) is None
    for model in IRREGULAR:  # still LiteLLM's to price: unavailable here, so unknown
        assert litellm_cost(model, 1234, 567) is None


def test_no_model_has_no_price() -> None:
    assert litellm_cost("", 1000, 1000) is None
