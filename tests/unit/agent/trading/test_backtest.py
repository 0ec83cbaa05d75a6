"""Backtests on small series whose trades and returns were worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from dexorder.agent.trading.backtest import BacktestError, max_drawdown, run_backtest, sharpe_ratio
from dexorder.agent.trading.ohlcv import OhlcvSeries, build_series
from dexorder.agent.trading.strategy import parse_strategy

TOLERANCE = 1e-9


def bars(rows: Sequence[tuple[float, float, float, float]]) -> OhlcvSeries:
    """(open, high, low, close) rows at timestamps 0, 1, 2, ..."""
    return build_series(((t, *row, 0.0) for t, row in enumerate(rows)), source="test")


def threshold_strategy(**extra: Any) -> dict[str, Any]:
    """Enter when the close is above 10, leave when it is below 10."""
    return {
        "entry": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 10}}]},
        "exit": {"all": [{"left": {"price": "close"}, "op": "lt", "right": {"value": 10}}]},
        "initial_capital": 1000,
        **extra,
    }


TWO_TRADES = [
    (9, 9.5, 8.5, 9),  # 0: no signal
    (9, 11, 9, 11),  # 1: entry signal at the close
    (12, 13, 11.5, 13),  # 2: entry fills at this open, 12
    (14, 14, 9, 9.5),  # 3: exit signal at the close
    (10, 10.5, 9.8, 10),  # 4: exit fills at this open, 10
    (10, 12, 10, 11.5),  # 5: entry signal
    (11, 12.5, 10.9, 12),  # 6: entry fills at 11
    (12, 12.2, 11.8, 12),  # 7: last bar: closed at the close, 12
]


def test_signals_fill_at_the_next_open_with_fees_on_both_sides() -> None:
    result = run_backtest(parse_strategy(threshold_strategy(fee_rate=0.01)), bars(TWO_TRADES))

    first_quantity = 1000 / (12 * 1.01)
    after_first = first_quantity * 10 * 0.99  # = 9900 / 12.12
    second_quantity = after_first / (11 * 1.01)
    final = second_quantity * 12 * 0.99

    first, second = result.trades
    assert (first.entry_index, first.entry_price, first.exit_index, first.exit_price) == (
        2,
        12,
        4,
        10,
    )
    assert first.exit_reason == "signal"
    assert first.quantity == pytest.approx(first_quantity, abs=TOLERANCE)
    assert first.fees == pytest.approx(
        first_quantity * 12 * 0.01 + first_quantity * 10 * 0.01, abs=TOLERANCE
    )
    assert first.pnl == pytest.approx(after_first - 1000, abs=TOLERANCE)
    assert (second.entry_index, second.entry_price, second.exit_index, second.exit_price) == (
        6,
        11,
        7,
        12,
    )
    assert second.exit_reason == "end_of_data"
    assert second.pnl > 0

    assert result.final_equity == pytest.approx(final, abs=TOLERANCE)
    assert result.total_return == pytest.approx(final / 1000 - 1, abs=TOLERANCE)
    assert result.win_rate == 0.5
    # The peak is bar 2's close (13 a unit), the trough bar 3's (9.5 a unit).
    assert result.max_drawdown == pytest.approx(1 - 9.5 / 13, abs=TOLERANCE)
    assert result.equity_curve[:2] == [1000, 1000]
    assert result.equity_curve[2] == pytest.approx(first_quantity * 13, abs=TOLERANCE)
    assert result.equity_curve[4] == pytest.approx(after_first, abs=TOLERANCE)


def test_no_fees_and_half_sizing() -> None:
    strategy = parse_strategy(threshold_strategy(sizing={"mode": "fraction", "value": 0.5}))
    result = run_backtest(strategy, bars(TWO_TRADES[:5]))
    # 500 buys 500/12 units at 12, sold at 10: a loss of 500/12 * 2.
    assert result.final_equity == pytest.approx(1000 - 500 / 12 * 2, abs=TOLERANCE)
    assert result.trades[0].return_pct == pytest.approx(10 / 12 - 1, abs=TOLERANCE)


def test_fixed_cash_sizing_is_capped_at_the_cash_there_is() -> None:
    strategy = parse_strategy(threshold_strategy(sizing={"mode": "cash", "value": 5000}))
    result = run_backtest(strategy, bars(TWO_TRADES[:5]))
    assert result.trades[0].quantity == pytest.approx(1000 / 12, abs=TOLERANCE)


STOP_LOSS = {
    "entry": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 10}}]},
    "exit": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 1000}}]},
    "initial_capital": 1000,
    "stop_loss": 0.1,
}


def test_a_stop_loss_fills_at_the_stop_price() -> None:
    series = bars([(9, 11, 9, 11), (10, 10.5, 9.5, 10), (9.5, 9.6, 8.5, 9), (9, 9, 9, 9)])
    result = run_backtest(parse_strategy(STOP_LOSS), series)
    (trade,) = result.trades
    assert (trade.entry_price, trade.exit_index, trade.exit_price) == (10, 2, 9)
    assert trade.exit_reason == "stop_loss"
    assert result.final_equity == pytest.approx(900, abs=TOLERANCE)


def test_a_gap_through_the_stop_fills_at_the_open() -> None:
    series = bars([(9, 11, 9, 11), (10, 10.5, 9.5, 10), (8, 8.5, 7, 8), (8, 8, 8, 8)])
    (trade,) = run_backtest(parse_strategy(STOP_LOSS), series).trades
    assert (trade.exit_price, trade.exit_reason) == (8, "stop_loss")


def test_a_signal_on_the_last_bar_never_fills() -> None:
    series = bars([(9, 9, 9, 9), (9, 11, 9, 11)])
    result = run_backtest(parse_strategy(threshold_strategy()), series)
    assert result.trades == []
    assert result.equity_curve == [1000, 1000]


def test_crossovers_fire_once_on_the_bar_that_crosses() -> None:
    closes = [5, 4, 3, 4, 6, 8, 9, 7, 4, 2, 2]
    series = bars([(c, c, c, c) for c in closes])
    strategy = parse_strategy(
        {
            "entry": {
                "all": [
                    {
                        "left": {"indicator": "sma", "period": 2},
                        "op": "crosses_above",
                        "right": {"indicator": "sma", "period": 3},
                    }
                ]
            },
            "exit": {
                "all": [
                    {
                        "left": {"indicator": "sma", "period": 2},
                        "op": "crosses_below",
                        "right": {"indicator": "sma", "period": 3},
                    }
                ]
            },
        }
    )
    result = run_backtest(strategy, series)
    # sma2 - sma3 from bar 2: -0.5, -1/6, +2/3 (crosses above on bar 4), 1, 5/6,
    # 0 (touching is not crossing), -7/6 (crosses below on bar 8). Fills come a bar later.
    (trade,) = result.trades
    assert (trade.entry_index, trade.entry_price) == (5, 8)
    assert (trade.exit_index, trade.exit_price) == (9, 2)


def test_no_look_ahead_a_prefix_gives_the_same_equity() -> None:
    closes = [100 + 10 * math.sin(i / 3) for i in range(120)]
    series = bars([(c, c + 1, c - 1, c) for c in closes])
    strategy = parse_strategy(
        {
            "entry": {
                "all": [
                    {"left": {"indicator": "rsi", "period": 5}, "op": "lt", "right": {"value": 40}}
                ]
            },
            "exit": {
                "all": [
                    {"left": {"indicator": "rsi", "period": 5}, "op": "gt", "right": {"value": 60}}
                ]
            },
            "fee_rate": 0.001,
        }
    )
    full = run_backtest(strategy, series)
    assert len(full.trades) >= 3
    for cut in (30, 61, 90):
        prefix = OhlcvSeries(
            *(
                column[:cut]
                for column in (
                    series.timestamp,
                    series.open,
                    series.high,
                    series.low,
                    series.close,
                    series.volume,
                )
            )
        )
        partial = run_backtest(strategy, prefix)
        # Only the last bar differs: the prefix closes its open position there.
        assert partial.equity_curve[: cut - 1] == full.equity_curve[: cut - 1]


def test_too_short_a_dataset_for_an_indicator_names_it() -> None:
    strategy = parse_strategy(
        {
            "entry": {
                "all": [
                    {
                        "left": {"indicator": "sma", "period": 50},
                        "op": "gt",
                        "right": {"price": "close"},
                    }
                ]
            },
            "exit": {"all": [{"left": {"price": "close"}, "op": "gt", "right": {"value": 1}}]},
        }
    )
    with pytest.raises(
        BacktestError, match=r"too short for sma\(50\).*needs at least 50 bars, got 8"
    ):
        run_backtest(strategy, bars(TWO_TRADES))


def test_a_single_bar_cannot_be_backtested() -> None:
    with pytest.raises(BacktestError, match="at least 2 bars"):
        run_backtest(parse_strategy(threshold_strategy()), bars([(9, 9, 9, 9)]))


def test_metrics() -> None:
    assert max_drawdown([100, 120, 90, 130, 65]) == 0.5
    assert sharpe_ratio([100, 110, 110], 252) == pytest.approx(
        0.05 / math.sqrt(0.005) * math.sqrt(252)
    )
    assert sharpe_ratio([100, 100, 100], 252) == 0.0


def test_summary_thins_the_curve_but_keeps_both_ends() -> None:
    closes = [10 + (i % 5) for i in range(2_000)]
    result = run_backtest(
        parse_strategy(threshold_strategy()), bars([(c, c, c, c) for c in closes])
    )
    summary = result.summary(max_curve_points=100)
    points = summary["equity_curve"]
    assert len(points) == 100
    assert points[0]["index"] == 0
    assert points[-1]["index"] == 1_999
    assert summary["equity_curve_thinned"] is True
    assert summary["trade_count"] == len(result.trades)
