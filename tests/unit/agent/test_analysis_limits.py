"""The indicators tool's look-back lengths are capped at the strategy limit (issue 21)."""

from __future__ import annotations

from typing import Any

import pytest

from dexorder.agent.analysis import compute_indicator
from dexorder.agent.errors import InvalidInput
from dexorder.agent.trading.strategy import MAX_PERIOD

PRICES = [float(n) for n in range(1, 40)]


def indicator(name: str, period: int | None = None, **params: float) -> dict[str, Any]:
    return compute_indicator(
        name, series=None, prices=PRICES, period=period, params=params, source="close", last=5
    )


@pytest.mark.parametrize(
    ("name", "period", "params"),
    [
        ("sma", MAX_PERIOD + 1, {}),
        ("rsi", 10**9, {}),
        ("ema", 0, {}),
        ("bollinger", -5, {}),
        ("macd", None, {"slow": MAX_PERIOD + 1.0}),
        ("macd", None, {"fast": 0.0}),
        ("macd", None, {"signal": 1e12}),
    ],
)
def test_a_look_back_past_the_strategy_limit_is_refused(
    name: str, period: int | None, params: dict[str, float]
) -> None:
    with pytest.raises(InvalidInput, match=f"must be between 1 and {MAX_PERIOD:,}"):
        indicator(name, period, **params)


def test_a_look_back_within_the_limit_is_computed() -> None:
    assert indicator("sma", 3)["values"][-1] == pytest.approx(38.0)
    assert len(indicator("macd", fast=3, slow=6, signal=2)["macd"]) == 5
