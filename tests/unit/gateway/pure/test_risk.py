from __future__ import annotations

import math
from typing import Any

import pytest

from dexorder.gateway.pure.risk import (
    LIMITS_BY_PROFILE,
    RiskInputError,
    annualised_volatility,
    assess,
    average_exposure,
)

DAY = 86_400.0


def summary(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "total_return": 0.089,
        "max_drawdown": -0.10,
        "sharpe": 1.2,
        "bars": 10,
        "trades": [
            {"entry_index": 2, "exit_index": 7, "quantity": 5.0, "entry_price": 10.0},
        ],
        "equity_curve": [
            {"index": 0, "timestamp": 0 * DAY, "equity": 100.0},
            {"index": 3, "timestamp": 1 * DAY, "equity": 110.0},
            {"index": 6, "timestamp": 2 * DAY, "equity": 99.0},
            {"index": 9, "timestamp": 3 * DAY, "equity": 108.9},
        ],
    }
    base.update(overrides)
    return base


def test_volatility_is_the_sample_deviation_of_returns_scaled_to_a_year() -> None:
    curve = [(p["index"], p["timestamp"], p["equity"]) for p in summary()["equity_curve"]]
    # Returns +10 %, -10 %, +10 %: sample deviation 0.11547 per day, 365.25 days a year.
    expected = math.sqrt(((0.2 / 3) ** 2 * 2 + (0.4 / 3) ** 2) / 2) * math.sqrt(365.25)
    assert annualised_volatility(curve) == pytest.approx(expected)
    assert annualised_volatility(curve[:2]) == 0.0


def test_exposure_weights_time_in_the_market_by_the_share_of_equity_held() -> None:
    curve = [(0, 0.0, 100.0), (3, DAY, 110.0)]
    # 5 units at 10 = half of the 100 equity, held for 5 of 10 bars.
    trades = [{"entry_index": 2, "exit_index": 7, "quantity": 5.0, "entry_price": 10.0}]
    assert average_exposure(trades, curve, bars=10) == pytest.approx(0.25)
    # Entry after index 3 is valued against the equity then.
    late = [{"entry_index": 4, "exit_index": 9, "quantity": 11.0, "entry_price": 10.0}]
    assert average_exposure(late, curve, bars=10) == pytest.approx(0.5)


def test_a_strategy_within_the_aggressive_limits_breaches_the_conservative_ones() -> None:
    calm = assess(summary(), "aggressive")
    strict = assess(summary(), "conservative")

    assert calm.verdict == "exceeds_limits"  # 220 % volatility exceeds even aggressive
    assert strict.max_drawdown == pytest.approx(0.10)
    assert strict.exposure == pytest.approx(0.25)
    assert any(b.startswith("volatility") for b in strict.breaches)
    assert not any(b.startswith("drawdown") for b in strict.breaches)  # 10 % is the limit


def test_a_smooth_curve_is_within_limits_and_the_description_says_so() -> None:
    smooth = summary(
        max_drawdown=-0.01,
        equity_curve=[
            {"index": i, "timestamp": i * DAY, "equity": 100.0 + i * 0.1 + (i % 2) * 0.05}
            for i in range(10)
        ],
    )
    result = assess(smooth, "moderate")
    assert result.verdict == "within_limits"
    assert result.limits == LIMITS_BY_PROFILE["moderate"]
    assert "Within every limit" in result.describe()
    assert result.as_dict()["verdict"] == "within_limits"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_drawdown": None}, "finite number 'max_drawdown'"),
        ({"sharpe": float("nan")}, "finite number 'sharpe'"),
        ({"equity_curve": []}, "non-empty 'equity_curve'"),
        ({"equity_curve": [{"index": 0}]}, "index, timestamp and equity"),
        ({"trades": "many"}, "'trades' must be a list"),
    ],
)
def test_a_summary_missing_what_is_needed_is_refused(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(RiskInputError, match=message):
        assess(summary(**override), "moderate")


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(RiskInputError, match="unknown risk profile"):
        assess(summary(), "reckless")  # type: ignore[arg-type]
