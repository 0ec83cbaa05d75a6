"""The complexity classifier: its signals one by one, and its accuracy on a labelled set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from dexorder.gateway.pure.complexity import DEEP_FROM, STANDARD_FROM, Level, classify, level_for

LABELS = Path(__file__).parent / "data" / "complexity_labels.yaml"
#: The floors the classifier must stay above; the measured figures are in the test's output.
TUNED_FLOOR = 0.90
HOLDOUT_FLOOR = 0.80


def labelled(section: str) -> list[tuple[str, Level]]:
    data = yaml.safe_load(LABELS.read_text())
    return [(item["text"], Level(item["label"])) for item in data[section]]


def accuracy(section: str) -> tuple[float, Counter[tuple[str, str]]]:
    cases = labelled(section)
    confusion: Counter[tuple[str, str]] = Counter(
        (expected.value, classify(text).level.value) for text, expected in cases
    )
    right = sum(count for (expected, got), count in confusion.items() if expected == got)
    return right / len(cases), confusion


def test_the_labelled_set_is_big_enough_and_covers_every_level() -> None:
    tuned, holdout = labelled("messages"), labelled("holdout")
    assert len(tuned) + len(holdout) >= 60
    for cases in (tuned, holdout):
        assert {level for _, level in cases} == set(Level)


@pytest.mark.parametrize(
    ("section", "floor"), [("messages", TUNED_FLOOR), ("holdout", HOLDOUT_FLOOR)]
)
def test_accuracy_on_the_labelled_set_is_above_its_floor(
    section: str, floor: float, capsys: pytest.CaptureFixture[str]
) -> None:
    score, confusion = accuracy(section)
    with capsys.disabled():
        print(f"\ncomplexity accuracy on {section}: {score:.1%} (expected, got): {dict(confusion)}")
    assert score >= floor


def test_no_message_is_off_by_two_levels() -> None:
    """A greeting never goes to deep, a backtest never to fast: the costly mistakes."""
    for section in ("messages", "holdout"):
        for text, expected in labelled(section):
            assert abs(classify(text).level.rank - expected.rank) < 2, text


@pytest.mark.parametrize(
    ("score", "level"),
    [
        (0, Level.FAST),
        (STANDARD_FROM - 1, Level.FAST),
        (STANDARD_FROM, Level.STANDARD),
        (DEEP_FROM - 1, Level.STANDARD),
        (DEEP_FROM, Level.DEEP),
        (40, Level.DEEP),
    ],
)
def test_score_thresholds(score: int, level: Level) -> None:
    assert level_for(score) is level


def test_a_greeting_is_fast_for_no_reason() -> None:
    verdict = classify("hello!")
    assert verdict.level is Level.FAST
    assert verdict.signals == ()
    assert verdict.explain() == "fast (score 0: a short, simple message)"


def test_a_backtest_alone_is_deep_and_says_so() -> None:
    verdict = classify("backtest my strategy")
    assert verdict.level is Level.DEEP
    assert any("asks for a backtest ('backtest')" in reason for reason in verdict.reasons)


def test_code_is_noticed_fenced_or_not() -> None:
    fenced = classify("fix this:\n```\nx = 1\n```")
    bare = classify("def f(x):\n    y = x + 1\n    return y\n")
    asked = classify("write a python script to download candles")
    assert "contains code" in fenced.reasons
    assert "contains code" in bare.reasons
    assert "asks for code" in asked.reasons
    assert asked.level is Level.STANDARD


def test_many_numbers_make_it_arithmetic() -> None:
    few = classify("buy 2 at 100")
    many = classify("sum 1, 2, 3, 4.5 and 6%")
    assert not any("numbers" in reason for reason in few.reasons)
    assert "5 numbers to reason over" in many.reasons
    assert many.level is Level.STANDARD


def test_length_adds_weight() -> None:
    long_text = " ".join(["word"] * 160)
    assert classify(long_text).reasons == ("a long message (160 words)",)
    assert classify(long_text).level is Level.STANDARD


def test_analysis_words_are_quoted_in_the_reason() -> None:
    verdict = classify("compare ETH and SOL")
    assert verdict.reasons == ("asks for analysis ('compare')",)
    assert verdict.level is Level.STANDARD


def test_one_tool_need_is_cheap_two_add_a_point() -> None:
    one = classify("price of BTC?")
    two = classify("price and RSI of BTC?")
    assert one.reasons == ("needs tools (market data)",)
    assert one.score == 0
    assert two.score == 1


def test_several_steps_add_weight() -> None:
    verdict = classify("1. Fetch the data\n2. Clean it\n3. Plot it")
    assert "several steps (3 markers)" in verdict.reasons


def test_the_verdict_is_deterministic() -> None:
    text = "Analyse my drawdown and compare it with 2022"
    assert classify(text) == classify(text)
