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


__all__ = ["ShowEvent", "TurnMetrics", "relay_turn"]
