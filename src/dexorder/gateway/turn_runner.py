"""The runner of one turn: the harness's events, each fanned out to the three sinks.

For each event, in this order:

1. the ``TurnTally`` counts it (the reply text, the first token's time, the tool calls),
   once, for both the usage record and the metrics;
2. the usage record (``usage.Turn.see``) records a finished tool call, before the user sees
   its result;
3. the channel shows it (the WebSocket outbox as frames, Telegram as its reply message).

``TurnFinished`` is not relayed: the conversation counts the turn against the limits and
records its usage first, then shows it, last, since a client may close on ``done``.

Per streamed token this adds the event object and the step through the harness's generator,
and nothing else: no queue, no task, and no coroutine but the channel's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from dexorder.gateway import metrics
from dexorder.gateway.stores.usage import Turn
from dexorder.gateway.turns import ReplyDelta, TurnEvent, TurnFinished, TurnTally

ShowEvent = Callable[[TurnEvent], Awaitable[None]]


async def relay_turn(
    events: AsyncGenerator[TurnEvent, None],
    *,
    tally: TurnTally,
    usage: Turn | None,
    show: ShowEvent,
) -> TurnFinished | None:
    """Fan ``events`` out until the harness's ``TurnFinished``, which is returned (None if
    the events ended without one)."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TurnFinished):
                return event
            tally.see(event)
            try:
                # The usage record takes tool calls alone: the text, nearly every event,
                # skips it.
                if (
                    type(event) is not ReplyDelta
                    and usage is not None
                    and (recorded := usage.see(event)) is not None
                ):
                    await recorded
                await show(event)
            except asyncio.CancelledError as cancel:
                # Cancelled in a sink, while the harness waits at its ``yield``: thrown in
                # there, so the harness records the turn as cancelled (and raises it again).
                with contextlib.suppress(StopAsyncIteration):
                    await events.athrow(cancel)
                raise
    return None


@dataclass(frozen=True)
class TurnDeadlines:
    """How long a turn may run: ``first_token`` seconds until its reply begins (its first
    text or tool call) and ``whole`` seconds in all, each attempt at a message. Measured on
    the turn's events, not on bytes from the model, so a stream that sends only keep-alive
    comments still runs out of time."""

    first_token: float = 120.0
    whole: float = 600.0


class TurnTimedOut(Exception):
    """A turn ran past one of its ``TurnDeadlines``; it was cancelled (and written back so)."""


async def await_turn(
    turn: asyncio.Task[TurnFinished | None], tally: TurnTally, deadlines: TurnDeadlines
) -> TurnFinished | None:
    """The turn's result; past a deadline the turn is cancelled and ``TurnTimedOut`` raised.

    Two timers, not a check per event: nothing is added to the path of each token."""
    loop = asyncio.get_running_loop()
    expired: list[str] = []

    def no_reply_yet() -> None:
        if tally.first_token_at is None and tally.tool_calls == 0:
            expired.append(f"the model began no reply within {deadlines.first_token:g}s")
            turn.cancel()

    def too_long() -> None:
        expired.append(f"the reply took longer than {deadlines.whole:g}s")
        turn.cancel()

    timers = (
        loop.call_later(deadlines.first_token, no_reply_yet),
        loop.call_later(deadlines.whole, too_long),
    )
    try:
        return await turn
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if expired and (current is None or not current.cancelling()):
            raise TurnTimedOut(expired[0]) from None
        raise
    finally:
        for timer in timers:
            timer.cancel()


@dataclass(frozen=True)
class TurnMetrics:
    """The metrics of one attempt at a turn: ``started`` is when the harness was asked
    (``time.perf_counter()``), the start of the first-token histogram."""

    started: float

    @classmethod
    def starting_now(cls) -> TurnMetrics:
        return cls(time.perf_counter())

    def finished(self, finished: TurnFinished, tally: TurnTally) -> None:
        """A turn that ran to its end (a cancelled or failed one counts nothing here)."""
        if finished.route is not None:
            metrics.ROUTES.labels(group=finished.route.group).inc()
        metrics.TOKENS.inc(finished.usage.completion_tokens)
        first_token = tally.first_token_at
        if first_token is not None and first_token >= self.started:  # not an earlier attempt's
            metrics.FIRST_TOKEN.observe(first_token - self.started)


__all__ = [
    "ShowEvent",
    "TurnDeadlines",
    "TurnMetrics",
    "TurnTimedOut",
    "await_turn",
    "relay_turn",
]
