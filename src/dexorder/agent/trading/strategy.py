"""Trading strategies declared as data: rules over prices and indicators, never code.

A strategy is long-only. It enters when its ``entry`` rule holds at a bar's close and
leaves when its ``exit`` rule holds (or its stop-loss is hit); the backtest fills both at
the next bar's open. Example::

    {
      "entry": {"all": [{"left": {"indicator": "sma", "period": 10},
                         "op": "crosses_above",
                         "right": {"indicator": "sma", "period": 30}}]},
      "exit":  {"any": [{"left": {"indicator": "rsi", "period": 14},
                         "op": "gt", "right": {"value": 70}}]},
      "sizing": {"mode": "fraction", "value": 0.5},
      "fee_rate": 0.001,
      "stop_loss": 0.05
    }
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from dexorder.agent.trading.indicators import INDICATOR_NAMES

PriceField = Literal["open", "high", "low", "close", "volume"]
IndicatorName = Literal["sma", "ema", "rsi", "macd", "bollinger", "atr"]
IndicatorOutput = Literal["value", "macd", "signal", "histogram", "upper", "middle", "lower"]
Comparison = Literal["gt", "ge", "lt", "le", "crosses_above", "crosses_below"]

MAX_CONDITIONS_PER_RULE = 32
MAX_PERIOD = 5_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$"

_OUTPUTS: dict[str, tuple[str, ...]] = {
    "sma": ("value",),
    "ema": ("value",),
    "rsi": ("value",),
    "atr": ("value",),
    "macd": ("value", "macd", "signal", "histogram"),
    "bollinger": ("value", "upper", "middle", "lower"),
}
assert set(_OUTPUTS) == set(INDICATOR_NAMES)

_DEFAULT_PERIOD = {"sma": 20, "ema": 20, "rsi": 14, "atr": 14, "bollinger": 20}


class StrategyError(ValueError):
    """A strategy definition that cannot be used; the message says which field to fix."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceOperand(_Frozen):
    price: PriceField


class ConstantOperand(_Frozen):
    value: float = Field(allow_inf_nan=False)


class IndicatorOperand(_Frozen):
    indicator: IndicatorName
    period: int | None = Field(default=None, ge=1, le=MAX_PERIOD)
    source: PriceField = "close"
    output: IndicatorOutput = "value"
    # MACD and Bollinger parameters; ignored by the other indicators.
    fast: int = Field(default=12, ge=1, le=MAX_PERIOD)
    slow: int = Field(default=26, ge=1, le=MAX_PERIOD)
    signal: int = Field(default=9, ge=1, le=MAX_PERIOD)
    k: float = Field(default=2.0, ge=0, le=100, allow_inf_nan=False)

    @model_validator(mode="after")
    def _output_fits_indicator(self) -> Self:
        allowed = _OUTPUTS[self.indicator]
        if self.output not in allowed:
            raise ValueError(
                f"output {self.output!r} does not exist for {self.indicator}; "
                f"use one of {', '.join(allowed)}"
            )
        if self.indicator == "macd" and self.fast >= self.slow:
            raise ValueError(f"macd fast ({self.fast}) must be shorter than slow ({self.slow})")
        return self

    @property
    def effective_period(self) -> int:
        return self.period if self.period is not None else _DEFAULT_PERIOD.get(self.indicator, 0)

    def label(self) -> str:
        if self.indicator == "macd":
            return f"macd({self.fast},{self.slow},{self.signal}).{self.output}"
        suffix = f".{self.output}" if self.output != "value" else ""
        return f"{self.indicator}({self.effective_period}){suffix}"


def _operand_kind(raw: Any) -> str | None:
    """Pick the operand model by its key, so an error names one shape, not three."""
    keys = raw if isinstance(raw, dict) else vars(raw) if isinstance(raw, BaseModel) else {}
    for kind in ("indicator", "price", "value"):
        if kind in keys:
            return kind
    return None


Operand = Annotated[
    Annotated[IndicatorOperand, Tag("indicator")]
    | Annotated[PriceOperand, Tag("price")]
    | Annotated[ConstantOperand, Tag("value")],
    Discriminator(
        _operand_kind,
        custom_error_type="operand_kind",
        custom_error_message=(
            'an operand is {"price": "close"}, {"value": 30} or {"indicator": "sma", "period": 20}'
        ),
    ),
]


class Condition(_Frozen):
    left: Operand
    op: Comparison
    right: Operand


class Rule(_Frozen):
    """Holds when every ``all`` condition holds and, if ``any`` is given, one of those does."""

    all: list[Condition] = Field(default_factory=list, max_length=MAX_CONDITIONS_PER_RULE)
    any: list[Condition] = Field(default_factory=list, max_length=MAX_CONDITIONS_PER_RULE)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.all and not self.any:
            raise ValueError("a rule needs at least one condition in 'all' or 'any'")
        return self

    def conditions(self) -> list[Condition]:
        return [*self.all, *self.any]


class PositionSizing(_Frozen):
    """``fraction``: that share of current equity per entry; ``cash``: a fixed amount."""

    mode: Literal["fraction", "cash"] = "fraction"
    value: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _fraction_at_most_one(self) -> Self:
        if self.mode == "fraction" and self.value > 1:
            raise ValueError("a fraction of equity must be in (0, 1]; leverage is not modelled")
        return self


class Strategy(_Frozen):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2_000)
    entry: Rule
    exit: Rule
    sizing: PositionSizing = Field(default_factory=PositionSizing)
    fee_rate: float = Field(default=0.0, ge=0, lt=0.1, allow_inf_nan=False)
    stop_loss: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False)
    initial_capital: float = Field(default=10_000.0, gt=0, le=1e15, allow_inf_nan=False)
    periods_per_year: int = Field(default=252, ge=1, le=1_000_000)

    def operands(self) -> list[Operand]:
        found: list[Operand] = []
        for rule in (self.entry, self.exit):
            for condition in rule.conditions():
                found.extend((condition.left, condition.right))
        return found


def parse_strategy(definition: Any) -> Strategy:
    """Validate a strategy definition, turning pydantic's errors into one readable message."""
    try:
        return Strategy.model_validate(definition)
    except ValidationError as error:
        raise StrategyError(describe_validation_error(error)) from error


def describe_validation_error(error: ValidationError, limit: int = 5) -> str:
    problems = []
    for detail in error.errors()[:limit]:
        where = ".".join(str(part) for part in detail["loc"]) or "strategy"
        problems.append(f"{where}: {detail['msg']}")
    more = len(error.errors()) - limit
    suffix = f" (and {more} more)" if more > 0 else ""
    return "invalid strategy: " + "; ".join(problems) + suffix
