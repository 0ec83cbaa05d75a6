"""Rate-limit arithmetic, shared by the in-memory and the Redis limiters.

Three limits per user: messages in a sliding minute, tokens in a UTC day, and
generations running at once. Concurrency is held as leases that expire, so a slot
taken by a process that died comes back by itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

MINUTE = 60.0
DAY = 86_400.0
#: How long a generation slot is held without renewal; the holder renews it well before.
LEASE_SECONDS = 60.0
#: A refused generation is retried about this soon when only concurrency stands in the way.
CONCURRENCY_RETRY_SECONDS = 1.0


class Limit(StrEnum):
    """Which limit refused; stable, for clients and metrics."""

    MESSAGES_PER_MINUTE = "messages_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"
    CONCURRENT_GENERATIONS = "concurrent_generations"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: Seconds until the same request would be allowed; 0 when allowed.
    retry_after: float = 0.0
    #: For people: "10 messages per minute".
    reason: str = ""
    #: Which limit refused; None when allowed.
    limit: Limit | None = None
    #: An admitted generation's slot, to renew and release; None otherwise.
    lease: str | None = None


def sliding_window(
    timestamps: list[float], now: float, limit: int, window: float = MINUTE
) -> Decision:
    """Whether one more event fits in the window; ``timestamps`` are the ones already in it."""
    recent = sorted(t for t in timestamps if t > now - window)
    if len(recent) < limit:
        return Decision(True)
    # The oldest event that must leave the window before another one fits.
    oldest = recent[len(recent) - limit]
    return refuse_messages(limit, max(0.0, oldest + window - now))


def refuse_messages(limit: int, retry_after: float) -> Decision:
    return Decision(
        False,
        retry_after=retry_after,
        reason=f"{limit} messages per minute",
        limit=Limit.MESSAGES_PER_MINUTE,
    )


def refuse_tokens(limit: int, now: float) -> Decision:
    return Decision(
        False,
        retry_after=seconds_until_next_day(now),
        reason=f"{limit} tokens per day",
        limit=Limit.TOKENS_PER_DAY,
    )


def refuse_concurrency(limit: int) -> Decision:
    return Decision(
        False,
        retry_after=CONCURRENCY_RETRY_SECONDS,
        reason=f"{limit} concurrent generation{'s' if limit != 1 else ''}",
        limit=Limit.CONCURRENT_GENERATIONS,
    )


def live_leases(leases: Mapping[str, float], now: float) -> dict[str, float]:
    """The leases (id to expiry time) that have not expired at ``now``."""
    return {lease: expiry for lease, expiry in leases.items() if expiry > now}


def day_bucket(now: float) -> int:
    """The UTC day of a Unix time, as days since the epoch."""
    return int(now // DAY)


def seconds_until_next_day(now: float) -> float:
    return math.ceil((day_bucket(now) + 1) * DAY - now)


class TokenBucket:
    """``rate`` calls a second on average, ``burst`` at once: ``reserve(now)`` takes the
    next token and returns the seconds to wait before using it (0 when one was saved up).

    Tokens may be owed: callers who reserve while the bucket is empty each wait for a
    later token of their own, in the order they came, so a burst is spread out, not
    refused. Pure: the caller passes the clock's ``now`` (monotonic seconds)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1: {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def reserve(self, now: float) -> float:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = max(self._at, now)
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
