"""The indicator and backtest tools: load the data, call the pure maths in ``core``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dexorder.agent.datasets import DatasetStore
from dexorder.agent.errors import InvalidInput
from dexorder.agent.limits import MAX_INDICATOR_VALUES, MAX_INLINE_PRICES
from dexorder.agent.strategies import StrategyStore, validate_strategy
from dexorder.agent.trading import indicators
from dexorder.agent.trading.backtest import BacktestError, run_backtest
from dexorder.agent.trading.indicators import INDICATOR_NAMES, IndicatorError, Series
from dexorder.agent.trading.ohlcv import OhlcvSeries
from dexorder.agent.trading.strategy import MAX_PERIOD

_PARAMS: dict[str, tuple[str, ...]] = {
    "sma": (),
    "ema": (),
    "rsi": (),
    "atr": (),
    "macd": ("fast", "slow", "signal"),
    "bollinger": ("k",),
}
_DEFAULT_PERIOD = {"sma": 20, "ema": 20, "rsi": 14, "atr": 14, "bollinger": 20}


def _inline_prices(prices: Sequence[float]) -> list[float]:
    if len(prices) > MAX_INLINE_PRICES:
        raise InvalidInput(
            f"{len(prices):,} inline prices; the limit is {MAX_INLINE_PRICES:,}. "
            "Save a dataset instead"
        )
    values = [float(value) for value in prices]
    if any(not math.isfinite(value) for value in values):
        raise InvalidInput("prices must be finite numbers")
    return values


def compute_indicator(
    name: str,
    *,
    series: OhlcvSeries | None,
    prices: Sequence[float] | None,
    period: int | None,
    params: dict[str, Any] | None,
    source: str,
    last: int,
) -> dict[str, Any]:
    indicator = name.strip().lower()
    if indicator not in INDICATOR_NAMES:
        raise InvalidInput(f"unknown indicator {name!r}; use one of {', '.join(INDICATOR_NAMES)}")
    if not 1 <= last <= MAX_INDICATOR_VALUES:
        raise InvalidInput(f"last must be between 1 and {MAX_INDICATOR_VALUES}, got {last}")
    extra = dict(params or {})
    unknown = sorted(set(extra) - set(_PARAMS[indicator]))
    if unknown:
        allowed = ", ".join(_PARAMS[indicator]) or "none besides period"
        raise InvalidInput(
            f"{indicator} takes no parameter {', '.join(unknown)}; allowed: {allowed}"
        )
    if indicator == "macd" and period is not None:
        raise InvalidInput("macd takes params fast, slow and signal instead of period")
    # The same limit as a strategy's operands: the tool must not compute what no strategy
    # may use, and an indicator's work grows with its period.
    lengths: dict[str, float | None] = {
        "period": period,
        **{key: extra[key] for key in ("fast", "slow", "signal") if key in extra},
    }
    for key, length in lengths.items():
        if length is not None and not 1 <= length <= MAX_PERIOD:
            raise InvalidInput(f"{key} must be between 1 and {MAX_PERIOD:,}, got {length:g}")
    if series is None:
        if indicator == "atr":
            raise InvalidInput("atr needs high, low and close: pass a dataset, not prices")
        assert prices is not None
        closes = _inline_prices(prices)
    else:
        try:
            closes = list(series.column(source))
        except ValueError as error:
            raise InvalidInput(str(error)) from error
    length = period if period is not None else _DEFAULT_PERIOD.get(indicator, 0)
    try:
        outputs = _run(indicator, closes, series, length, extra)
    except IndicatorError as error:
        raise InvalidInput(str(error)) from error
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"{indicator}: bad parameter: {error}") from error
    start = max(0, len(closes) - last)
    result: dict[str, Any] = {
        "indicator": indicator,
        "bars": len(closes),
        "offset": start,
        **({"period": length} if indicator != "macd" else {}),
        **{key: values[start:] for key, values in outputs.items()},
    }
    if series is not None:
        result["timestamps"] = list(series.timestamp[start:])
    return result


def _run(
    indicator: str,
    closes: list[float],
    series: OhlcvSeries | None,
    period: int,
    params: dict[str, Any],
) -> dict[str, Series]:
    if indicator == "sma":
        return {"values": indicators.sma(closes, period)}
    if indicator == "ema":
        return {"values": indicators.ema(closes, period)}
    if indicator == "rsi":
        return {"values": indicators.rsi(closes, period)}
    if indicator == "atr":
        assert series is not None
        return {"values": indicators.atr(series.high, series.low, series.close, period)}
    if indicator == "macd":
        lines = indicators.macd(
            closes,
            int(params.get("fast", 12)),
            int(params.get("slow", 26)),
            int(params.get("signal", 9)),
        )
        return {"macd": lines.macd, "signal": lines.signal, "histogram": lines.histogram}
    bands = indicators.bollinger(closes, period, float(params.get("k", 2.0)))
    return {"upper": bands.upper, "middle": bands.middle, "lower": bands.lower}


def backtest(
    datasets: DatasetStore,
    strategies: StrategyStore,
    *,
    dataset: str,
    strategy: dict[str, Any] | None,
    strategy_name: str | None,
    max_curve_points: int,
) -> dict[str, Any]:
    if (strategy is None) == (strategy_name is None):
        raise InvalidInput("pass exactly one of strategy (inline JSON) or strategy_name")
    if not 2 <= max_curve_points <= MAX_INDICATOR_VALUES:
        raise InvalidInput(f"max_curve_points must be between 2 and {MAX_INDICATOR_VALUES}")
    definition = (
        validate_strategy(strategy) if strategy is not None else strategies.load(str(strategy_name))
    )
    bars = datasets.load(dataset)
    try:
        result = run_backtest(definition, bars)
    except BacktestError as error:
        raise InvalidInput(str(error)) from error
    return {
        "dataset": dataset,
        "strategy": strategy_name or definition.name,
        **result.summary(max_curve_points=max_curve_points),
    }
