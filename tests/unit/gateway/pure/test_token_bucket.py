"""The token bucket that paces the bot's calls: a burst, then one call per 1/rate s."""

from __future__ import annotations

import pytest

from dexorder.gateway.pure.ratelimit import TokenBucket


def test_a_burst_goes_at_once_and_the_rest_queue_one_interval_apart() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3])


def test_tokens_come_back_with_time_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.reserve(0.0) == 0
    assert bucket.reserve(0.0) == 0
    assert bucket.reserve(0.05) == pytest.approx(0.05)
    # Long idle: only the burst is saved up, not every second's tokens.
    assert [bucket.reserve(100.0) for _ in range(3)] == pytest.approx([0, 0, 0.1])


def test_a_bucket_needs_a_rate_and_a_token() -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate=0, burst=1, now=0.0)
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate=1, burst=0.5, now=0.0)
