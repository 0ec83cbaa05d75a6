"""What a model's tokens cost, by LiteLLM's offline price list.

A model's price is looked up in LiteLLM once and then is two multiplications
(``litellm_cost``): turns end by the hundred at once, and their end is kept cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dexorder.gateway.llm.adapter import load_litellm

#: Keys of LiteLLM's price map that make a model's price other than (tokens x a fixed rate):
#: token tiers, prices by time of day, per second, per character, per request.
_IRREGULAR_PRICE_KEYS = frozenset(
    {
        "tiered_pricing",
        "off_peak_pricing",
        "cost_per_second",
        "input_cost_per_second",
        "output_cost_per_second",
        "input_cost_per_character",
        "output_cost_per_character",
        "input_cost_per_request",
        "input_cost_per_query",
    }
)
#: (prompt, completion) token counts at which a price read as linear is checked against
#: LiteLLM: each side of every tier threshold its map uses (32k to 512k), and beyond.
_PRICE_CHECKS = (
    (0, 0),
    (7, 3),
    (1234, 567),
    (40_000, 9_000),
    (110_000, 20_000),
    (150_000, 100_000),
    (230_000, 130_000),
    (262_000, 200_000),
    (300_000, 300_000),
    (600_000, 550_000),
    (1_500_000, 1_000_000),
)
#: Model names are few (the deployments of config/models.yaml); past this many, prices
#: are no longer kept, so a stream of odd names cannot grow the process.
_PRICES_KEPT = 1024


def _litellm_cost_per_token(
    model: str, prompt_tokens: int, completion_tokens: int
) -> tuple[float, float] | None:
    """LiteLLM's price of the prompt and of the completion; None for a model it does not know."""
    litellm = load_litellm()
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # litellm raises plain Exception subclasses for unknown models
        return None
    return float(prompt_cost), float(completion_cost)


def _total(prompt_cost: float, completion_cost: float) -> float | None:
    total = prompt_cost + completion_cost
    return total if total >= 0 else None


@dataclass(frozen=True, slots=True)
class _PerToken:
    """A fixed rate per prompt token and per completion token: computed here, as LiteLLM does
    (tokens x rate, each side), so the result is the same float."""

    prompt: float
    completion: float

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        if prompt_tokens < 0 or completion_tokens < 0:  # LiteLLM's business, however odd
            return _AskLitellm().cost(model, prompt_tokens, completion_tokens)
        return _total(prompt_tokens * self.prompt, completion_tokens * self.completion)


@dataclass(frozen=True, slots=True)
class _AskLitellm:
    """A price LiteLLM computes in a way not repeated here (tiers, time of day, ...)."""

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        costs = _litellm_cost_per_token(model, prompt_tokens, completion_tokens)
        return None if costs is None else _total(*costs)


@dataclass(frozen=True, slots=True)
class _Unpriced:
    """A model LiteLLM has no price for (it raises for every token count)."""

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        return None


_Price = _PerToken | _AskLitellm | _Unpriced
_prices: dict[str, _Price] = {}


def _price_entries(model: str) -> list[Mapping[str, Any]]:
    """The entries of LiteLLM's map ``model`` is priced by: its model info, and the raw entry
    ``cost_per_token`` picks (the name as given, else without its provider prefix)."""
    litellm = load_litellm()
    try:
        info: Mapping[str, Any] = litellm.get_model_info(model=model)
    except Exception:  # unknown to litellm: nothing to read
        return []
    picked = next((n for n in (model, model.split("/", 1)[-1]) if n in litellm.model_cost), None)
    return [info] if picked is None else [info, litellm.model_cost[picked]]


def _priced_per_token(entries: Sequence[Mapping[str, Any]]) -> bool:
    return bool(entries) and not any(
        key in _IRREGULAR_PRICE_KEYS or ("_above_" in key and "_tokens" in key)
        for entry in entries
        for key, value in entry.items()
        if value is not None
    )


def _resolve_price(model: str) -> _Price:
    """How to price ``model``: by LiteLLM's own rates when linear, else by asking LiteLLM.

    The rates are LiteLLM's answers for one token, and are kept only if they reproduce its
    answer exactly at every count of ``_PRICE_CHECKS``.
    """
    checked = [(p, c, _litellm_cost_per_token(model, p, c)) for p, c in _PRICE_CHECKS]
    if all(costs is None for _, _, costs in checked):
        return _Unpriced()
    one_prompt = _litellm_cost_per_token(model, 1, 0)
    one_completion = _litellm_cost_per_token(model, 0, 1)
    if one_prompt is None or one_completion is None or not _priced_per_token(_price_entries(model)):
        return _AskLitellm()
    price = _PerToken(one_prompt[0], one_completion[1])
    for prompt_tokens, completion_tokens, costs in checked:
        if costs != (prompt_tokens * price.prompt, completion_tokens * price.completion):
            return _AskLitellm()
    return price


def litellm_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The price by LiteLLM's (offline) price list; None for a model it does not know.

    How a model is priced is worked out once (about 5 ms) and kept: LiteLLM's map is the
    one it loaded at import (``load_litellm``), and nothing here changes it later.
    """
    if not model:
        return None
    price = _prices.get(model)
    if price is None:
        price = _resolve_price(model)
        if len(_prices) < _PRICES_KEPT:
            _prices[model] = price
    return price.cost(model, prompt_tokens, completion_tokens)


__all__ = ["litellm_cost"]
