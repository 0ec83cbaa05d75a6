"""How hard a chat message is, judged cheaply and explainably, as a model group.

The router sends simple messages (greetings, a price, a definition) to the ``fast`` group,
ordinary analytical ones to ``standard`` and heavy ones (backtests, long code, multi-step
research) to ``deep``. The judgement must cost microseconds and be explainable to the user, so
it is a small additive score over visible signals, never a model call:

- length: a long message usually carries a long task;
- code: pasted code or a request to write some;
- numbers: many figures to reason over;
- analysis: words that ask to compare, evaluate, explain why, optimise...;
- backtests: a request to test a strategy on history, the heaviest thing the agent does;
- steps: several tasks chained in one message;
- tool needs: market data, indicators or memory the answer must fetch first.

Each signal that fires adds points and one human-readable reason; the total picks the group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Level(StrEnum):
    """The complexity levels, named after the model groups that serve them."""

    FAST = "fast"
    STANDARD = "standard"
    DEEP = "deep"

    @property
    def rank(self) -> int:
        return LEVELS.index(self)


LEVELS: Final = (Level.FAST, Level.STANDARD, Level.DEEP)

#: Scores from these up reach the level (a score below STANDARD_FROM is FAST).
STANDARD_FROM: Final = 2
DEEP_FROM: Final = 5

LONG_WORDS: Final = 60
VERY_LONG_WORDS: Final = 150
MANY_NUMBERS: Final = 5
LOTS_OF_NUMBERS: Final = 10

_WORD = re.compile(r"[\w'$%.-]+")
_NUMBER = re.compile(r"(?<![\w.])[-+$]?\d[\d,]*(?:\.\d+)?%?(?![\w])")
_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \w+ import |for .+:$|if .+:$|return\b|function\b|"
    r"const |let |var |SELECT\b|[A-Za-z_][\w.]*\s*=\s*\S.*$|[{}];?$)",
    re.MULTILINE,
)
_CODE_REQUEST = re.compile(
    r"\b(?:write|implement|code|refactor|debug|fix)\b[^.?!]{0,40}\b(?:code|script|function|"
    r"class|bot|program|python|pine ?script|sql|indicator|strategy)\b",
    re.IGNORECASE,
)
_BACKTEST = re.compile(
    r"\b(?:back-?test\w*|walk[- ]forward|monte[- ]carlo|out[- ]of[- ]sample|"
    r"paper[- ]trade|simulat\w+ (?:the |this |my )?(?:strategy|trades|portfolio))",
    re.IGNORECASE,
)
_ANALYSIS: Final = (
    "analy",
    "explain",
    "difference",
    "summari",
    "compare",
    "comparison",
    "evaluate",
    "assess",
    "explain why",
    "why did",
    "why is",
    "why does",
    "correlat",
    "regression",
    "optimi",
    "drawdown",
    "volatility",
    "sharpe",
    "risk",
    "hedg",
    "allocation",
    "rebalanc",
    "forecast",
    "predict",
    "scenario",
    "trade-off",
    "tradeoff",
    "pros and cons",
    "in depth",
    "in-depth",
    "thorough",
    "detailed",
    "strategy",
    "diversif",
)
_STEP_MARKERS = re.compile(
    r"(?:(?:^|\s)\d[.)]\s+[A-Z])|(?:^\s*[-*•]\s+\S)|\b(?:and then|after that|step by step|first[, ].+then|"
    r"finally)\b",
    re.IGNORECASE | re.MULTILINE,
)
#: What the answer has to fetch through the agent's tools, by the words that reveal it.
_TOOL_NEEDS: Final = {
    "market data": re.compile(
        r"\b(?:price|prices|chart|candles?|ohlcv?|volume|quote|ticker|market cap|"
        r"how (?:is|did) \w+ (?:doing|trading|do))\b",
        re.IGNORECASE,
    ),
    "indicators": re.compile(
        r"\b(?:rsi|macd|sma|ema|bollinger|atr|vwap|stochastic|moving average|indicators?)\b",
        re.IGNORECASE,
    ),
    "memory": re.compile(
        r"\b(?:remember|recall|what did i (?:say|tell)|my notes?|last time|earlier i)\b",
        re.IGNORECASE,
    ),
}


@dataclass(frozen=True)
class Signal:
    """One thing the classifier noticed, the points it adds, and how to say it."""

    name: str
    points: int
    reason: str


@dataclass(frozen=True)
class Complexity:
    """The verdict on one message: its level, its score, and every reason behind it."""

    level: Level
    score: int
    signals: tuple[Signal, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(signal.reason for signal in self.signals)

    def explain(self) -> str:
        """One line for the user: ``standard (score 3: asks for analysis; 6 numbers)``."""
        why = "; ".join(self.reasons) if self.signals else "a short, simple message"
        return f"{self.level.value} (score {self.score}: {why})"


def level_for(score: int) -> Level:
    if score >= DEEP_FROM:
        return Level.DEEP
    if score >= STANDARD_FROM:
        return Level.STANDARD
    return Level.FAST


def _length(text: str) -> Signal | None:
    words = len(_WORD.findall(text))
    if words >= VERY_LONG_WORDS:
        return Signal("length", 3, f"a long message ({words} words)")
    if words >= LONG_WORDS:
        return Signal("length", 1, f"a longish message ({words} words)")
    return None


def _code(text: str) -> Signal | None:
    code_lines = len(_CODE_LINE.findall(text))
    if _FENCE.search(text) or code_lines >= 3:
        return Signal("code", 3, "contains code")
    if _CODE_REQUEST.search(text):
        return Signal("code", 2, "asks for code")
    return None


def _numbers(text: str) -> Signal | None:
    count = len(_NUMBER.findall(text))
    if count >= LOTS_OF_NUMBERS:
        return Signal("numbers", 3, f"{count} numbers to reason over")
    if count >= MANY_NUMBERS:
        return Signal("numbers", 2, f"{count} numbers to reason over")
    return None


def _analysis(text: str) -> Signal | None:
    lowered = text.lower()
    found = sorted({stem for stem in _ANALYSIS if stem in lowered})
    if not found:
        return None
    points = min(len(found) + 1, 4)
    shown = ", ".join(repr(stem) for stem in found[:3])
    return Signal("analysis", points, f"asks for analysis ({shown})")


def _backtest(text: str) -> Signal | None:
    match = _BACKTEST.search(text)
    if match is None:
        return None
    return Signal("backtest", 5, f"asks for a backtest ({match.group(0).lower()!r})")


def _steps(text: str) -> Signal | None:
    markers = len(_STEP_MARKERS.findall(text))
    if markers >= 3:
        return Signal("steps", 2, f"several steps ({markers} markers)")
    if markers >= 2:
        return Signal("steps", 1, f"several steps ({markers} markers)")
    return None


def _tool_needs(text: str) -> Signal | None:
    needs = [name for name, pattern in _TOOL_NEEDS.items() if pattern.search(text)]
    if not needs:
        return None
    # Fetching is cheap for any model; combining fetched sources is what takes a stronger one.
    points = 1 if len(needs) >= 2 else 0
    return Signal("tools", points, f"needs tools ({', '.join(needs)})")


_DETECTORS: Final = (_length, _code, _numbers, _analysis, _backtest, _steps, _tool_needs)


def classify(text: str) -> Complexity:
    """The level of one user message, with the signals that decided it."""
    signals = tuple(signal for detect in _DETECTORS if (signal := detect(text)) is not None)
    score = sum(signal.points for signal in signals)
    return Complexity(level=level_for(score), score=score, signals=signals)
