"""Which Events the operator posts on its agents, and which it counts on one posted before.

As Kubernetes' own recorder does: an Event that repeats one already posted on the same
agent (same type, reason and message) raises that Event's ``count`` and ``lastTimestamp``
instead of posting another, so ``kubectl describe`` shows "x2 over 5m" rather than a list
of copies; and each agent may post a burst of Events, then one a while (a failure that
comes and goes with every retry must not write an Event per retry). Pure bookkeeping: the
clock is passed in, and the requests are the reconciler's.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class EventKey:
    """What makes two Events the same: the object (by uid), their type, reason and message."""

    uid: str
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Posted:
    """An Event already on the API server: its name, and how often it happened so far."""

    name: str
    count: int


@dataclass
class _Bucket:
    tokens: float
    at: float


class EventLog:
    """Per agent: the Events posted (the newest ``kept`` of them), and a token bucket that
    allows ``burst`` Events at once and one more every ``refill_seconds``."""

    def __init__(self, *, burst: int = 10, refill_seconds: float = 60.0, kept: int = 8) -> None:
        if burst < 1 or refill_seconds <= 0 or kept < 1:
            raise ValueError("an event log needs a burst, a refill time and room for one")
        self._burst = burst
        self._refill_seconds = refill_seconds
        self._kept = kept
        self._posted: dict[Hashable, dict[EventKey, Posted]] = {}
        self._buckets: dict[Hashable, _Bucket] = {}

    def admit(self, agent: Hashable, now: float) -> bool:
        """Whether ``agent`` may write an Event (a new one or a count) at ``now``; takes
        the token when it may."""
        bucket = self._buckets.get(agent)
        if bucket is None:
            bucket = self._buckets[agent] = _Bucket(float(self._burst), now)
        refilled = (now - bucket.at) / self._refill_seconds
        bucket.tokens, bucket.at = min(float(self._burst), bucket.tokens + refilled), now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def posted(self, agent: Hashable, key: EventKey) -> Posted | None:
        """The Event posted for ``key`` on ``agent``, if any is remembered."""
        return self._posted.get(agent, {}).get(key)

    def record(self, agent: Hashable, key: EventKey, posted: Posted) -> None:
        """``posted`` is now what the API server holds for ``key``."""
        events = self._posted.setdefault(agent, {})
        events.pop(key, None)  # the newest last: the oldest is dropped first
        events[key] = posted
        while len(events) > self._kept:
            del events[next(iter(events))]

    def forget(self, agent: Hashable) -> None:
        self._posted.pop(agent, None)
        self._buckets.pop(agent, None)
