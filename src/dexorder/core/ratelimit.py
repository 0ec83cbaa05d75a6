"""Rate-limit arithmetic, shared by the in-memory and the Redis limiters."""

from __future__ import annotations

import math
from dataclasses import dataclass

MINUTE = 60.0
DAY = 86_400.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    reason: str = ""


def sliding_window(
    timestamps: list[float], now: float, limit: int, window: float = MINUTE
) -> Decision:
    """Whether one more event fits in the window; ``timestamps`` are the ones already in it."""
    recent = sorted(t for t in timestamps if t > now - window)
    if len(recent) < limit:
        return Decision(True)
    # The oldest event that must leave the window before another one fits.
    oldest = recent[len(recent) - limit]
    return Decision(
        False, retry_after=max(0.0, oldest + window - now), reason=f"{limit} messages per minute"
    )


def day_bucket(now: float) -> int:
    return int(now // DAY)


def seconds_until_next_day(now: float) -> float:
    return math.ceil((day_bucket(now) + 1) * DAY - now)
