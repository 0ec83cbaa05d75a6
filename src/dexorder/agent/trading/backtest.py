"""A long-only, bar-by-bar backtest of a data-declared strategy, with no look-ahead.

Timing, which is what keeps it honest:

- Rules are evaluated at the close of bar ``t`` with values computed from bars ``0..t``
  only (every indicator series holds ``None`` until it is defined).
- A signal on bar ``t`` fills at bar ``t+1``'s open; a signal on the last bar is dropped.
- A stop-loss rests from the fill on: when a bar's low reaches the stop price the position
  is closed at that price, or at the bar's open when the bar gaps through it.
- An open position at the end is closed at the last close (``end_of_data``).

Money: an entry spends ``sizing`` of current equity (or a fixed cash amount, capped at
the cash there is) on notional plus fee; fees are ``fee_rate`` of notional on each side.
Sharpe is the mean over the sample standard deviation of per-bar equity returns, scaled
by ``sqrt(periods_per_year)``, with no risk-free rate. Max drawdown is a positive fraction.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dexorder.agent.trading import indicators
from dexorder.agent.trading.indicators import IndicatorError, Series
from dexorder.agent.trading.ohlcv import OhlcvSeries
from dexorder.agent.trading.strategy import (
    Condition,
    ConstantOperand,
    IndicatorOperand,
    Operand,
    PriceOperand,
    Rule,
    Strategy,
)

ExitReason = Literal["signal", "stop_loss", "end_of_data"]


class BacktestError(ValueError):
    """A backtest that cannot run on this data; the message says what is missing."""


@dataclass(frozen=True)
class Trade:
    entry_index: int
    entry_time: float
    entry_price: float
    exit_index: int
    exit_time: float
    exit_price: float
    quantity: float
    fees: float
    pnl: float
    return_pct: float
    exit_reason: ExitReason


@dataclass(frozen=True)
class BacktestResult:
    initial_capital: float
    final_equity: float
    total_return: float
    max_drawdown: float
    sharpe: float
    win_rate: float
    trades: list[Trade]
    timestamps: list[float] = field(repr=False)
    equity_curve: list[float] = field(repr=False)

    def summary(self, *, max_curve_points: int = 500, max_trades: int = 1_000) -> dict[str, Any]:
        """A JSON-ready view, with the curve thinned evenly so large runs stay small."""
        indices = _even_indices(len(self.equity_curve), max_curve_points)
        return {
            "initial_capital": self.initial_capital,
            "final_equity": self.final_equity,
            "total_return": self.total_return,
            "max_drawdown": self.max_drawdown,
            "sharpe": self.sharpe,
            "win_rate": self.win_rate,
            "bars": len(self.equity_curve),
            "trade_count": len(self.trades),
            "trades": [asdict(trade) for trade in self.trades[:max_trades]],
            "trades_truncated": len(self.trades) > max_trades,
            "equity_curve": [
                {"index": i, "timestamp": self.timestamps[i], "equity": self.equity_curve[i]}
                for i in indices
            ],
            "equity_curve_thinned": len(indices) < len(self.equity_curve),
        }


def _even_indices(length: int, limit: int) -> list[int]:
    if length <= limit:
        return list(range(length))
    step = (length - 1) / (limit - 1)
    return sorted({round(i * step) for i in range(limit)})


def operand_series(operand: Operand, bars: OhlcvSeries) -> Series:
    """The operand's value at every bar, ``None`` where it is not defined yet."""
    if isinstance(operand, ConstantOperand):
        return [operand.value] * len(bars)
    if isinstance(operand, PriceOperand):
        return list(bars.column(operand.price))
    return _indicator_series(operand, bars)


def _indicator_series(operand: IndicatorOperand, bars: OhlcvSeries) -> Series:
    source = bars.column(operand.source)
    period = operand.effective_period
    try:
        match operand.indicator:
            case "sma":
                return indicators.sma(source, period)
            case "ema":
                return indicators.ema(source, period)
            case "rsi":
                return indicators.rsi(source, period)
            case "atr":
                return indicators.atr(bars.high, bars.low, bars.close, period)
            case "macd":
                lines = indicators.macd(source, operand.fast, operand.slow, operand.signal)
                return (
                    lines.signal
                    if operand.output == "signal"
                    else (lines.histogram if operand.output == "histogram" else lines.macd)
                )
            case "bollinger":
                bands = indicators.bollinger(source, period, operand.k)
                return (
                    bands.upper
                    if operand.output == "upper"
                    else (bands.lower if operand.output == "lower" else bands.middle)
                )
    except IndicatorError as error:
        raise BacktestError(f"the dataset is too short for {operand.label()}: {error}") from error
    raise BacktestError(f"unknown indicator {operand.indicator!r}")  # pragma: no cover


_Check = Callable[[int], bool]


def _compile_condition(condition: Condition, cache: dict[str, Series], bars: OhlcvSeries) -> _Check:
    def series_of(operand: Operand) -> Series:
        key = operand.model_dump_json()
        if key not in cache:
            cache[key] = operand_series(operand, bars)
        return cache[key]

    left = series_of(condition.left)
    right = series_of(condition.right)
    op = condition.op

    def holds(t: int) -> bool:
        a = left[t]
        b = right[t]
        if a is None or b is None:
            return False
        if op == "gt":
            return a > b
        if op == "ge":
            return a >= b
        if op == "lt":
            return a < b
        if op == "le":
            return a <= b
        if t == 0:
            return False
        a_before = left[t - 1]
        b_before = right[t - 1]
        if a_before is None or b_before is None:
            return False
        if op == "crosses_above":
            return a > b and a_before <= b_before
        return a < b and a_before >= b_before

    return holds


def _compile_rule(rule: Rule, cache: dict[str, Series], bars: OhlcvSeries) -> _Check:
    every = [_compile_condition(c, cache, bars) for c in rule.all]
    some = [_compile_condition(c, cache, bars) for c in rule.any]

    def holds(t: int) -> bool:
        return all(check(t) for check in every) and (not some or any(c(t) for c in some))

    return holds


class _Book:
    """Cash, the open position and the closed trades, as the simulation goes."""

    def __init__(self, strategy: Strategy, bars: OhlcvSeries) -> None:
        self.strategy = strategy
        self.bars = bars
        self.cash = strategy.initial_capital
        self.quantity = 0.0
        self.entry_index = -1
        self.entry_price = 0.0
        self.entry_fee = 0.0
        self.stop_price: float | None = None
        self.trades: list[Trade] = []

    def enter(self, t: int, price: float) -> None:
        if price <= 0:
            return  # nothing can be bought at a zero price; the signal lapses
        sizing = self.strategy.sizing
        budget = (
            self.cash * sizing.value if sizing.mode == "fraction" else min(sizing.value, self.cash)
        )
        fee_rate = self.strategy.fee_rate
        self.quantity = budget / (price * (1.0 + fee_rate))
        self.entry_fee = self.quantity * price * fee_rate
        self.cash -= self.quantity * price + self.entry_fee
        self.entry_index = t
        self.entry_price = price
        stop = self.strategy.stop_loss
        self.stop_price = price * (1.0 - stop) if stop is not None else None

    def leave(self, t: int, price: float, reason: ExitReason) -> None:
        proceeds = self.quantity * price
        exit_fee = proceeds * self.strategy.fee_rate
        self.cash += proceeds - exit_fee
        cost = self.quantity * self.entry_price + self.entry_fee
        pnl = proceeds - exit_fee - cost
        self.trades.append(
            Trade(
                entry_index=self.entry_index,
                entry_time=self.bars.timestamp[self.entry_index],
                entry_price=self.entry_price,
                exit_index=t,
                exit_time=self.bars.timestamp[t],
                exit_price=price,
                quantity=self.quantity,
                fees=self.entry_fee + exit_fee,
                pnl=pnl,
                return_pct=pnl / cost if cost > 0 else 0.0,
                exit_reason=reason,
            )
        )
        self.quantity = 0.0
        self.stop_price = None


def run_backtest(strategy: Strategy, bars: OhlcvSeries) -> BacktestResult:
    count = len(bars)
    if count < 2:
        raise BacktestError("a backtest needs at least 2 bars: signals fill at the next open")
    cache: dict[str, Series] = {}
    should_enter = _compile_rule(strategy.entry, cache, bars)
    should_exit = _compile_rule(strategy.exit, cache, bars)
    book = _Book(strategy, bars)
    equity: list[float] = [0.0] * count
    pending: Literal["enter", "exit"] | None = None
    opens, lows, closes = bars.open, bars.low, bars.close

    for t in range(count):
        if pending == "enter":
            book.enter(t, opens[t])
        elif pending == "exit":
            book.leave(t, opens[t], "signal")
        pending = None

        stop = book.stop_price
        if book.quantity > 0 and stop is not None and lows[t] <= stop:
            book.leave(t, min(opens[t], stop), "stop_loss")

        equity[t] = book.cash + book.quantity * closes[t]

        if t < count - 1:
            if book.quantity == 0:
                if should_enter(t):
                    pending = "enter"
            elif should_exit(t):
                pending = "exit"

    if book.quantity > 0:
        book.leave(count - 1, closes[-1], "end_of_data")
        equity[-1] = book.cash

    initial = strategy.initial_capital
    return BacktestResult(
        initial_capital=initial,
        final_equity=equity[-1],
        total_return=equity[-1] / initial - 1.0,
        max_drawdown=max_drawdown(equity),
        sharpe=sharpe_ratio(equity, strategy.periods_per_year),
        win_rate=(
            sum(1 for trade in book.trades if trade.pnl > 0) / len(book.trades)
            if book.trades
            else 0.0
        ),
        trades=book.trades,
        timestamps=list(bars.timestamp),
        equity_curve=equity,
    )


def max_drawdown(equity: Sequence[float]) -> float:
    peak = -math.inf
    worst = 0.0
    for value in equity:
        peak = max(peak, value)
        if peak > 0:
            worst = max(worst, (peak - value) / peak)
    return worst


def sharpe_ratio(equity: Sequence[float], periods_per_year: int) -> float:
    returns = [equity[t] / equity[t - 1] - 1.0 for t in range(1, len(equity)) if equity[t - 1] > 0]
    if len(returns) < 2:
        return 0.0
    deviation = statistics.stdev(returns)
    if deviation == 0:
        return 0.0
    return statistics.fmean(returns) / deviation * math.sqrt(periods_per_year)
