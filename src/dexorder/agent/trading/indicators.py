"""Technical indicators over plain float sequences, by their standard definitions.

Every function returns a list as long as its input, holding ``None`` where the
indicator is not yet defined (the warm-up bars), so index ``t`` always means
bar ``t`` and a caller can never read a value computed from later bars.

Conventions, chosen to match TA-Lib and the textbook definitions:

- SMA: the mean of the last ``n`` values, first defined at index ``n-1``.
- EMA: ``alpha = 2/(n+1)``, seeded with the SMA of the first ``n`` values at index ``n-1``.
- RSI: Wilder's smoothing. The first average gain and loss are the plain means of the
  first ``n`` changes (so RSI is first defined at index ``n``), then
  ``avg = (avg*(n-1) + current)/n``. With no losses RSI is 100; with no movement at all, 50.
- MACD: ``EMA(fast) - EMA(slow)``; the signal line is the EMA of the MACD line over its
  defined values (seeded with their SMA); histogram = MACD - signal.
- Bollinger: middle = SMA(n); bands = middle +/- k * population standard deviation.
- ATR: true range needs the previous close, so it starts at index 1; the first ATR is the
  mean of the first ``n`` true ranges (index ``n``), then Wilder's smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Series = list[float | None]

INDICATOR_NAMES = ("sma", "ema", "rsi", "macd", "bollinger", "atr")


class IndicatorError(ValueError):
    """Input an indicator cannot be computed from; the message says how to fix it."""


@dataclass(frozen=True)
class Macd:
    macd: Series
    signal: Series
    histogram: Series


@dataclass(frozen=True)
class Bollinger:
    upper: Series
    middle: Series
    lower: Series


def _check_period(name: str, period: int, minimum: int = 1) -> None:
    if isinstance(period, bool) or not isinstance(period, int) or period < minimum:
        raise IndicatorError(f"{name}: period must be an integer >= {minimum}, got {period!r}")


def _check_length(name: str, values: Sequence[float], needed: int, period: int) -> None:
    if len(values) < needed:
        raise IndicatorError(
            f"{name} with period {period} needs at least {needed} bars, got {len(values)}; "
            "supply more data or use a shorter period"
        )


def _check_finite(name: str, values: Sequence[float]) -> None:
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise IndicatorError(f"{name}: value at index {index} is not a finite number")


def sma(values: Sequence[float], period: int) -> Series:
    _check_period("sma", period)
    _check_length("sma", values, period, period)
    _check_finite("sma", values)
    out: Series = [None] * len(values)
    # A fresh sum per window would be O(n*k); a running sum drifts, so it is
    # recomputed exactly every window to keep the 1e-9 guarantee on long series.
    running = math.fsum(values[:period])
    out[period - 1] = running / period
    for t in range(period, len(values)):
        if (t - period) % period == 0:
            running = math.fsum(values[t - period + 1 : t + 1])
        else:
            running += values[t] - values[t - period]
        out[t] = running / period
    return out


def ema(values: Sequence[float], period: int) -> Series:
    _check_period("ema", period)
    _check_length("ema", values, period, period)
    _check_finite("ema", values)
    return _ema_unchecked(values, period)


def _ema_unchecked(values: Sequence[float], period: int) -> Series:
    out: Series = [None] * len(values)
    alpha = 2.0 / (period + 1)
    current = math.fsum(values[:period]) / period
    out[period - 1] = current
    for t in range(period, len(values)):
        current = alpha * values[t] + (1.0 - alpha) * current
        out[t] = current
    return out


def rsi(values: Sequence[float], period: int = 14) -> Series:
    _check_period("rsi", period)
    _check_length("rsi", values, period + 1, period)
    _check_finite("rsi", values)
    out: Series = [None] * len(values)
    gains = 0.0
    losses = 0.0
    for t in range(1, period + 1):
        change = values[t] - values[t - 1]
        if change > 0:
            gains += change
        else:
            losses -= change
    avg_gain = gains / period
    avg_loss = losses / period
    out[period] = _rsi_value(avg_gain, avg_loss)
    for t in range(period + 1, len(values)):
        change = values[t] - values[t - 1]
        gain = change if change > 0 else 0.0
        loss = -change if change < 0 else 0.0
        avg_gain = (avg_gain * (period - 1) + gain) / period
        avg_loss = (avg_loss * (period - 1) + loss) / period
        out[t] = _rsi_value(avg_gain, avg_loss)
    return out


def _rsi_value(avg_gain: float, avg_loss: float) -> float:
    if avg_loss == 0.0:
        return 50.0 if avg_gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


def macd(values: Sequence[float], fast: int = 12, slow: int = 26, signal: int = 9) -> Macd:
    _check_period("macd fast", fast)
    _check_period("macd slow", slow)
    _check_period("macd signal", signal)
    if fast >= slow:
        raise IndicatorError(f"macd: fast period ({fast}) must be shorter than slow ({slow})")
    needed = slow + signal - 1
    if len(values) < needed:
        raise IndicatorError(
            f"macd({fast},{slow},{signal}) needs at least {needed} bars, got {len(values)}; "
            "supply more data or use shorter periods"
        )
    _check_finite("macd", values)
    fast_line = _ema_unchecked(values, fast)
    slow_line = _ema_unchecked(values, slow)
    line: Series = [None] * len(values)
    for t in range(slow - 1, len(values)):
        fast_value = fast_line[t]
        slow_value = slow_line[t]
        # Both are defined from slow-1 on, since fast < slow.
        assert fast_value is not None
        assert slow_value is not None
        line[t] = fast_value - slow_value
    defined = [value for value in line[slow - 1 :] if value is not None]
    signal_tail = _ema_unchecked(defined, signal)
    warm_up: Series = [None] * (slow - 1)
    signal_line: Series = warm_up + signal_tail
    histogram: Series = [
        None if m is None or s is None else m - s for m, s in zip(line, signal_line, strict=True)
    ]
    return Macd(macd=line, signal=signal_line, histogram=histogram)


def bollinger(values: Sequence[float], period: int = 20, k: float = 2.0) -> Bollinger:
    _check_period("bollinger", period)
    if not math.isfinite(k) or k < 0:
        raise IndicatorError(f"bollinger: k must be a finite number >= 0, got {k!r}")
    _check_length("bollinger", values, period, period)
    _check_finite("bollinger", values)
    middle = sma(values, period)
    upper: Series = [None] * len(values)
    lower: Series = [None] * len(values)
    for t in range(period - 1, len(values)):
        mean = middle[t]
        assert mean is not None
        window = values[t - period + 1 : t + 1]
        variance = math.fsum((value - mean) ** 2 for value in window) / period
        width = k * math.sqrt(variance)
        upper[t] = mean + width
        lower[t] = mean - width
    return Bollinger(upper=upper, middle=middle, lower=lower)


def true_range(high: Sequence[float], low: Sequence[float], close: Sequence[float]) -> Series:
    out: Series = [None] * len(close)
    for t in range(1, len(close)):
        previous = close[t - 1]
        out[t] = max(high[t] - low[t], abs(high[t] - previous), abs(low[t] - previous))
    return out


def atr(
    high: Sequence[float], low: Sequence[float], close: Sequence[float], period: int = 14
) -> Series:
    _check_period("atr", period)
    if not len(high) == len(low) == len(close):
        raise IndicatorError("atr: high, low and close must have the same length")
    _check_length("atr", close, period + 1, period)
    for name, column in (("high", high), ("low", low), ("close", close)):
        _check_finite(f"atr {name}", column)
    ranges = true_range(high, low, close)
    out: Series = [None] * len(close)
    current = math.fsum(value for value in ranges[1 : period + 1] if value is not None) / period
    out[period] = current
    for t in range(period + 1, len(close)):
        value = ranges[t]
        assert value is not None
        current = (current * (period - 1) + value) / period
        out[t] = current
    return out
