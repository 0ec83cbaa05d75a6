"""The Redis circuit breaker: open after consecutive failures, a cooldown, then one try."""

from __future__ import annotations

from dexorder.gateway.stores.redis_client import BreakerPolicy, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_after_the_failures_in_a_row_and_closes_on_a_reply() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failures=3, cooldown_seconds=5), clock)
    breaker.failed()
    breaker.failed()
    assert breaker.allow()
    breaker.failed()
    assert not breaker.allow()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.allow()  # one try after the cooldown
    breaker.failed()  # it failed too: open again at once
    assert not breaker.allow()
    clock.now = 10.0
    breaker.succeeded()
    assert breaker.allow()
    breaker.failed()
    assert breaker.allow(), "the count starts again after a reply"


def test_a_reply_between_failures_resets_the_count() -> None:
    breaker = CircuitBreaker(BreakerPolicy(failures=2, cooldown_seconds=5), Clock())
    for _ in range(5):
        breaker.failed()
        breaker.succeeded()
    assert breaker.allow()
