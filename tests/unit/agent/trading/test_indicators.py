"""Indicator values against fixtures worked out by hand (exact fractions), to 1e-9."""

from __future__ import annotations

import math
import random

import pytest

from dexorder.agent.trading import indicators
from dexorder.agent.trading.indicators import IndicatorError

TOLERANCE = 1e-9


def assert_series(actual: list[float | None], expected: list[float | None]) -> None:
    assert len(actual) == len(expected)
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if want is None:
            assert got is None, f"index {index}: expected warm-up None, got {got}"
        else:
            assert got is not None, f"index {index}: expected {want}, got None"
            assert abs(got - want) <= TOLERANCE, f"index {index}: {got} != {want}"


def test_sma_is_the_mean_of_the_last_n_values() -> None:
    assert_series(indicators.sma([2, 4, 6, 9, 1], 3), [None, None, 4, 19 / 3, 16 / 3])


def test_sma_matches_a_naive_mean_on_a_long_noisy_series() -> None:
    rng = random.Random(7)
    values = [1000 + rng.uniform(-50, 50) for _ in range(20_000)]
    result = indicators.sma(values, 50)
    for t in range(49, len(values), 997):
        assert abs((result[t] or 0) - math.fsum(values[t - 49 : t + 1]) / 50) <= TOLERANCE


def test_ema_is_seeded_with_the_sma_and_uses_alpha_two_over_n_plus_one() -> None:
    # period 3: alpha 0.5, seed (22+24+23)/3 = 23; then 0.5*26 + 0.5*23; 0.5*25 + 0.5*24.5
    assert_series(indicators.ema([22, 24, 23, 26, 25], 3), [None, None, 23, 24.5, 24.75])
    # period 4: alpha 0.4, seed 11.5; then 0.4*20 + 0.6*11.5
    assert_series(indicators.ema([10, 11, 12, 13, 20], 4), [None, None, None, 11.5, 14.9])


def test_rsi_uses_wilders_smoothing() -> None:
    # changes +1 -1 +2 | +1 -1: first averages 1 and 1/3 (RS 3), then Wilder's updates.
    result = indicators.rsi([10, 11, 10, 12, 13, 12], 3)
    assert_series(result, [None, None, None, 75.0, 900 / 11, 1800 / 31])


def test_rsi_is_100_without_losses_and_50_without_movement() -> None:
    assert indicators.rsi([1, 2, 3, 4, 5], 3)[-1] == 100.0
    assert indicators.rsi([5, 5, 5, 5, 5], 3)[-1] == 50.0


def test_macd_line_signal_and_histogram() -> None:
    lines = indicators.macd([1, 2, 4, 8, 16, 32], fast=2, slow=3, signal=2)
    # EMA2 = 1.5, 19/6, 115/18, 691/54, 4147/162; EMA3 = 7/3, 31/6, 127/12, 511/24
    assert_series(lines.macd, [None, None, 5 / 6, 11 / 9, 239 / 108, 2791 / 648])
    assert_series(lines.signal, [None, None, None, 37 / 36, 589 / 324, 845 / 243])
    assert_series(
        lines.histogram,
        [None, None, None, 11 / 9 - 37 / 36, 239 / 108 - 589 / 324, 2791 / 648 - 845 / 243],
    )


def test_macd_defaults_are_12_26_9() -> None:
    values = [100 + math.sin(i / 5) * 10 for i in range(60)]
    default = indicators.macd(values)
    explicit = indicators.macd(values, 12, 26, 9)
    assert default == explicit
    assert default.macd[24] is None
    assert default.macd[25] is not None
    assert default.signal[32] is None
    assert default.signal[33] is not None


def test_bollinger_uses_the_population_standard_deviation() -> None:
    bands = indicators.bollinger([1, 2, 3, 4, 6], period=3, k=2)
    assert_series(bands.middle, [None, None, 2, 3, 13 / 3])
    assert_series(
        bands.upper,
        [
            None,
            None,
            2 + 2 * math.sqrt(2 / 3),
            3 + 2 * math.sqrt(2 / 3),
            13 / 3 + 2 * math.sqrt(14) / 3,
        ],
    )
    assert_series(
        bands.lower,
        [
            None,
            None,
            2 - 2 * math.sqrt(2 / 3),
            3 - 2 * math.sqrt(2 / 3),
            13 / 3 - 2 * math.sqrt(14) / 3,
        ],
    )


def test_bollinger_defaults_are_20_and_2() -> None:
    values = [float(i % 7) for i in range(25)]
    assert indicators.bollinger(values) == indicators.bollinger(values, 20, 2.0)


def test_atr_uses_the_true_range_and_wilders_smoothing() -> None:
    high = [10, 12, 13, 12]
    low = [8, 9, 11, 9]
    close = [9, 11, 12, 10]
    # true ranges from bar 1: 3, 2, 3; first ATR (3+2)/2, then (2.5*1 + 3)/2
    assert_series(indicators.atr(high, low, close, 2), [None, None, 2.5, 2.75])


def test_true_range_counts_a_gap_from_the_previous_close() -> None:
    assert indicators.true_range([10, 15], [9, 14], [9.5, 14.5]) == [None, 5.5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: indicators.sma([1, 2, 3], 5), "sma with period 5 needs at least 5 bars, got 3"),
        (lambda: indicators.ema([1, 2], 3), "needs at least 3 bars"),
        (lambda: indicators.rsi([1, 2, 3], 3), "rsi with period 3 needs at least 4 bars"),
        (lambda: indicators.macd([1.0] * 30), "needs at least 34 bars"),
        (lambda: indicators.bollinger([1.0] * 5), "needs at least 20 bars"),
        (lambda: indicators.atr([1, 2], [1, 2], [1, 2], 2), "needs at least 3 bars"),
        (lambda: indicators.sma([1, 2, 3], 0), "period must be an integer >= 1"),
        (lambda: indicators.macd([1.0] * 50, 26, 12), "fast period (26) must be shorter"),
        (lambda: indicators.sma([1, math.nan, 3], 2), "index 1 is not a finite number"),
        (lambda: indicators.atr([1, 2, 3], [1, 2], [1, 2, 3], 2), "same length"),
        (lambda: indicators.bollinger([1.0] * 30, 20, -1), "k must be"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_says_what_to_change(
    call: object, message: str
) -> None:
    assert callable(call)
    with pytest.raises(IndicatorError) as caught:
        call()
    assert message in str(caught.value)
