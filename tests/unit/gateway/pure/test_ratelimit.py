"""Rate-limit arithmetic: the sliding window, the UTC day, leases and refusals."""

from __future__ import annotations

from dexorder.gateway.pure.ratelimit import (
    CONCURRENCY_RETRY_SECONDS,
    DAY,
    Limit,
    day_bucket,
    live_leases,
    refuse_concurrency,
    refuse_tokens,
    seconds_until_next_day,
    sliding_window,
)


def test_a_window_with_room_allows() -> None:
    decision = sliding_window([100.0, 110.0], now=120.0, limit=3)
    assert decision.allowed
    assert decision.retry_after == 0.0
    assert decision.limit is None


def test_a_full_window_refuses_until_its_oldest_event_leaves() -> None:
    decision = sliding_window([100.0, 110.0, 115.0], now=120.0, limit=3)
    assert not decision.allowed
    # The event at 100 leaves the 60 s window at 160.
    assert decision.retry_after == 40.0
    assert decision.limit is Limit.MESSAGES_PER_MINUTE
    assert decision.reason == "3 messages per minute"


def test_events_older_than_the_window_do_not_count() -> None:
    assert sliding_window([50.0, 59.0, 60.0], now=120.0, limit=1).allowed


def test_over_full_window_waits_for_enough_events_to_leave() -> None:
    # The limit was lowered to 2 while 4 events are in the window: two must leave.
    decision = sliding_window([100.0, 101.0, 102.0, 103.0], now=110.0, limit=2)
    assert decision.retry_after == 102.0 + 60.0 - 110.0


def test_day_bucket_is_the_utc_day() -> None:
    assert day_bucket(0.0) == 0
    assert day_bucket(DAY - 0.001) == 0
    assert day_bucket(DAY) == 1


def test_seconds_until_next_day_rounds_up() -> None:
    assert seconds_until_next_day(DAY - 10.5) == 11
    assert seconds_until_next_day(3 * DAY) == DAY


def test_token_refusal_waits_for_the_next_utc_day() -> None:
    decision = refuse_tokens(1000, DAY * 5 + 3600)
    assert not decision.allowed
    assert decision.retry_after == DAY - 3600
    assert decision.limit is Limit.TOKENS_PER_DAY
    assert decision.reason == "1000 tokens per day"


def test_concurrency_refusal_names_the_limit() -> None:
    assert refuse_concurrency(1).reason == "1 concurrent generation"
    assert refuse_concurrency(3).reason == "3 concurrent generations"
    assert refuse_concurrency(3).retry_after == CONCURRENCY_RETRY_SECONDS


def test_live_leases_drops_the_expired_ones() -> None:
    assert live_leases({"a": 10.0, "b": 20.0, "c": 15.0}, now=15.0) == {"b": 20.0}
