"""Strategies as data: what validates, and the messages for what does not."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dexorder.agent.trading.strategy import (
    ConstantOperand,
    IndicatorOperand,
    PriceOperand,
    StrategyError,
    parse_strategy,
)

CROSSOVER: dict[str, Any] = {
    "entry": {
        "all": [
            {
                "left": {"indicator": "sma", "period": 10},
                "op": "crosses_above",
                "right": {"indicator": "sma", "period": 30},
            }
        ]
    },
    "exit": {
        "any": [
            {"left": {"indicator": "rsi", "period": 14}, "op": "gt", "right": {"value": 70}},
            {
                "left": {"price": "close"},
                "op": "lt",
                "right": {"indicator": "bollinger", "output": "lower"},
            },
        ]
    },
    "sizing": {"mode": "fraction", "value": 0.5},
    "fee_rate": 0.001,
    "stop_loss": 0.05,
}


def test_a_crossover_strategy_parses_into_typed_operands() -> None:
    strategy = parse_strategy(CROSSOVER)
    kinds = [type(operand) for operand in strategy.operands()]
    assert kinds == [
        IndicatorOperand,
        IndicatorOperand,
        IndicatorOperand,
        ConstantOperand,
        PriceOperand,
        IndicatorOperand,
    ]
    assert strategy.sizing.value == 0.5
    assert strategy.stop_loss == 0.05
    assert strategy.initial_capital == 10_000


def test_indicator_defaults_and_labels() -> None:
    operand = IndicatorOperand(indicator="bollinger", output="lower")
    assert operand.effective_period == 20
    assert operand.label() == "bollinger(20).lower"
    assert IndicatorOperand(indicator="macd", output="signal").label() == "macd(12,26,9).signal"


def test_round_trips_through_json() -> None:
    strategy = parse_strategy(CROSSOVER)
    assert parse_strategy(strategy.model_dump(mode="json")) == strategy


def with_change(path: list[str | int], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(CROSSOVER)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"entry": CROSSOVER["entry"]}, "exit: Field required"),
        (with_change(["entry"], {"all": [], "any": []}), "at least one condition"),
        (with_change(["entry", "all", 0, "op"], "above"), "entry.all.0.op"),
        (with_change(["entry", "all", 0, "left"], {"foo": 1}), "an operand is"),
        (with_change(["entry", "all", 0, "left"], {"indicator": "vwap"}), "indicator"),
        (
            with_change(["entry", "all", 0, "left"], {"indicator": "sma", "output": "upper"}),
            "output 'upper' does not exist for sma",
        ),
        (
            with_change(["entry", "all", 0, "left"], {"indicator": "macd", "fast": 30}),
            "must be shorter than slow",
        ),
        (
            with_change(["entry", "all", 0, "left"], {"indicator": "sma", "period": 0}),
            "greater than or equal to 1",
        ),
        (
            with_change(["entry", "all", 0, "left"], {"price": "close", "code": "import os"}),
            "Extra inputs are not permitted",
        ),
        (with_change(["sizing"], {"mode": "fraction", "value": 2}), "leverage is not modelled"),
        (with_change(["stop_loss"], 1.5), "stop_loss"),
        (with_change(["fee_rate"], -0.1), "fee_rate"),
        (with_change(["name"], "../etc/passwd"), "name"),
        ("not a strategy", "invalid strategy"),
    ],
)
def test_malformed_strategies_are_refused_with_the_field_named(
    definition: Any, message: str
) -> None:
    with pytest.raises(StrategyError) as caught:
        parse_strategy(definition)
    assert message in str(caught.value)
    assert str(caught.value).startswith("invalid strategy")
