"""Risk of a backtested strategy against a user's risk profile: drawdown, volatility, exposure.

Pure arithmetic over the agent's backtest summary (``BacktestResult.summary()``), so the
strategy-review workflow can explain every number it shows the user.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

RiskProfile = Literal["conservative", "moderate", "aggressive"]
Verdict = Literal["within_limits", "exceeds_limits"]

SECONDS_PER_YEAR: Final = 365.25 * 24 * 3600


class RiskInputError(ValueError):
    """The backtest summary lacks what a risk assessment needs."""


@dataclass(frozen=True)
class RiskLimits:
    max_drawdown: float
    """The largest peak-to-trough fall of equity allowed, as a fraction (0.2 = 20 %)."""
    max_volatility: float
    """The largest annualised volatility of equity returns allowed."""
    max_exposure: float
    """The largest average share of equity held in the market."""


LIMITS_BY_PROFILE: Final[Mapping[RiskProfile, RiskLimits]] = {
    "conservative": RiskLimits(max_drawdown=0.10, max_volatility=0.20, max_exposure=0.50),
    "moderate": RiskLimits(max_drawdown=0.20, max_volatility=0.35, max_exposure=0.80),
    "aggressive": RiskLimits(max_drawdown=0.35, max_volatility=0.60, max_exposure=1.00),
}


@dataclass(frozen=True)
class RiskAssessment:
    profile: RiskProfile
    limits: RiskLimits
    max_drawdown: float
    volatility: float
    exposure: float
    total_return: float
    sharpe: float
    trade_count: int
    breaches: tuple[str, ...]

    @property
    def verdict(self) -> Verdict:
        return "exceeds_limits" if self.breaches else "within_limits"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["breaches"] = list(self.breaches)
        data["verdict"] = self.verdict
        return data

    def describe(self) -> str:
        """One plain paragraph, the facts the LLM summary must not contradict."""
        head = (
            f"Return {self.total_return:.1%}, max drawdown {self.max_drawdown:.1%}, "
            f"annualised volatility {self.volatility:.1%}, average exposure {self.exposure:.0%}, "
            f"Sharpe {self.sharpe:.2f}, {self.trade_count} trades; {self.profile} profile."
        )
        if not self.breaches:
            return head + " Within every limit of the profile."
        return head + " Exceeds: " + "; ".join(self.breaches) + "."


def _number(summary: Mapping[str, Any], key: str) -> float:
    value = summary.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise RiskInputError(f"the backtest summary needs a finite number {key!r}, got {value!r}")
    return float(value)


def _curve(summary: Mapping[str, Any]) -> list[tuple[int, float, float]]:
    points = summary.get("equity_curve")
    if not isinstance(points, list) or not points:
        raise RiskInputError("the backtest summary needs a non-empty 'equity_curve'")
    try:
        return [(int(p["index"]), float(p["timestamp"]), float(p["equity"])) for p in points]
    except (KeyError, TypeError, ValueError) as error:
        raise RiskInputError("each equity_curve point needs index, timestamp and equity") from error


def annualised_volatility(curve: Sequence[tuple[int, float, float]]) -> float:
    """Standard deviation of point-to-point returns, scaled by the points per year."""
    if len(curve) < 3:
        return 0.0
    returns = [b[2] / a[2] - 1.0 for a, b in itertools.pairwise(curve) if a[2] > 0]
    spacing = statistics.median(b[1] - a[1] for a, b in itertools.pairwise(curve))
    if len(returns) < 2 or spacing <= 0:
        return 0.0
    return statistics.stdev(returns) * math.sqrt(SECONDS_PER_YEAR / spacing)


def average_exposure(
    trades: Sequence[Mapping[str, Any]], curve: Sequence[tuple[int, float, float]], bars: int
) -> float:
    """Share of equity in the market, averaged over all bars."""
    if bars <= 0:
        return 0.0
    held = 0.0
    for trade in trades:
        entry, leave = int(trade["entry_index"]), int(trade["exit_index"])
        # Equity at entry: the last curve point at or before it (the curve may be thinned).
        equity = next((e for i, _, e in reversed(curve) if i <= entry), curve[0][2])
        share = float(trade["quantity"]) * float(trade["entry_price"]) / equity if equity else 0
        held += max(0, leave - entry) * min(share, 1.0)
    return held / bars


def assess(summary: Mapping[str, Any], profile: RiskProfile) -> RiskAssessment:
    if profile not in LIMITS_BY_PROFILE:
        raise RiskInputError(f"unknown risk profile {profile!r}")
    limits = LIMITS_BY_PROFILE[profile]
    curve = _curve(summary)
    trades = summary.get("trades") or []
    if not isinstance(trades, list):
        raise RiskInputError("the backtest summary's 'trades' must be a list")
    drawdown = abs(_number(summary, "max_drawdown"))
    volatility = annualised_volatility(curve)
    exposure = average_exposure(trades, curve, int(_number(summary, "bars")))
    breaches: list[str] = []
    if drawdown > limits.max_drawdown:
        breaches.append(f"drawdown {drawdown:.1%} over the {limits.max_drawdown:.0%} limit")
    if volatility > limits.max_volatility:
        breaches.append(f"volatility {volatility:.1%} over the {limits.max_volatility:.0%} limit")
    if exposure > limits.max_exposure:
        breaches.append(f"exposure {exposure:.0%} over the {limits.max_exposure:.0%} limit")
    return RiskAssessment(
        profile=profile,
        limits=limits,
        max_drawdown=drawdown,
        volatility=volatility,
        exposure=exposure,
        total_return=_number(summary, "total_return"),
        sharpe=_number(summary, "sharpe"),
        trade_count=len(trades),
        breaches=tuple(breaches),
    )


__all__ = [
    "LIMITS_BY_PROFILE",
    "RiskAssessment",
    "RiskInputError",
    "RiskLimits",
    "RiskProfile",
    "annualised_volatility",
    "assess",
    "average_exposure",
]
