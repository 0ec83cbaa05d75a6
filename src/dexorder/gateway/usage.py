"""What each turn used: its events (to the event sink) and the daily totals (PostgreSQL).

``UsageRecorder.start_turn`` opens a ``Turn`` when a message is admitted; the turn sees the
frames the harness emits (through ``Turn.observe``), so it records each tool call and the
reply as streamed, and ``Turn.finish`` records the reply and the usage. Recording never
fails a turn and never delays its reply: a sink that refuses or a database that is down
is logged and counted, and the daily upsert runs in a task of the recorder's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import Counter

from dexorder.core import protocol
from dexorder.core.events import (
    AssistantReplyEvent,
    Event,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    new_event_id,
)
from dexorder.gateway import metrics
from dexorder.gateway.events import EventSink, EventsRefused
from dexorder.gateway.licenses import Pool
from dexorder.gateway.limits import Limiter, LimiterUnavailable

logger = logging.getLogger(__name__)

Emit = Callable[[protocol.Frame], Awaitable[None]]
#: (model, prompt tokens, completion tokens) to US dollars; None when the price is unknown.
CostFunction = Callable[[str, int, int], float | None]

USAGE_NOT_RECORDED = Counter(
    "dexorder_gateway_usage_not_recorded",
    "Turns whose events or daily totals could not be recorded, by where.",
    ["where"],
    registry=metrics.REGISTRY,
)

_UPSERT = (
    "INSERT INTO usage_daily (user_id, day, prompt_tokens, completion_tokens, messages) "
    "VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (user_id, day) DO UPDATE SET "
    "prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens, "
    "completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens, "
    "messages = usage_daily.messages + EXCLUDED.messages"
)
_SELECT = (
    "SELECT day, prompt_tokens, completion_tokens, messages FROM usage_daily "
    "WHERE user_id = %s AND day BETWEEN %s AND %s ORDER BY day"
)


class UsageUnavailable(Exception):
    """The usage database cannot be reached or used right now."""


@dataclass(frozen=True)
class DailyUsage:
    day: dt.date
    prompt_tokens: int
    completion_tokens: int
    messages: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageStore:
    """Daily totals per user in ``usage_daily``, added to atomically by any replica."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def add(
        self,
        user_id: str,
        day: dt.date,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        messages: int = 1,
    ) -> None:
        if min(prompt_tokens, completion_tokens, messages) < 0:
            raise ValueError("usage increments must not be negative")
        try:
            async with self._pool.connection() as connection:
                await connection.execute(
                    _UPSERT, (user_id, day, prompt_tokens, completion_tokens, messages)
                )
        except (psycopg.Error, TimeoutError) as error:
            raise UsageUnavailable(f"cannot record usage: {error}") from error

    async def daily(self, user_id: str, first: dt.date, last: dt.date) -> list[DailyUsage]:
        """The user's totals for each day from ``first`` to ``last`` that has any."""
        try:
            async with self._pool.connection() as connection:
                cursor = await connection.execute(_SELECT, (user_id, first, last))
                rows = await cursor.fetchall()
        except (psycopg.Error, TimeoutError) as error:
            raise UsageUnavailable(f"cannot read usage: {error}") from error
        return [DailyUsage(row[0], row[1], row[2], row[3]) for row in rows]

    async def on(self, user_id: str, day: dt.date) -> DailyUsage:
        """One day's totals (zeros for a day without use)."""
        found = await self.daily(user_id, day, day)
        return found[0] if found else DailyUsage(day, 0, 0, 0)


def litellm_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The price by LiteLLM's (offline) price list; None for a model it does not know."""
    if not model:
        return None
    from dexorder.gateway.llm import load_litellm

    litellm = load_litellm()
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # litellm raises plain Exception subclasses for unknown models
        return None
    total = float(prompt_cost) + float(completion_cost)
    return total if total >= 0 else None


@dataclass
class _PendingCall:
    name: str
    arguments: dict[str, Any]


class Turn:
    """One admitted message, from its user message to its usage; see the module's text."""

    def __init__(
        self,
        recorder: UsageRecorder,
        *,
        user_id: str,
        tier: str,
        channel: str,
        session_id: str,
    ) -> None:
        self._recorder = recorder
        self.user_id = user_id
        self.tier = tier
        self.channel = channel
        self.session_id = session_id
        self.turn_id = new_event_id()
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self._reply: list[str] = []
        self._calls: dict[str, _PendingCall] = {}
        self._tool_calls = 0
        self._finished = False

    def envelope(self) -> dict[str, Any]:
        return {
            "occurred_at": dt.datetime.now(dt.UTC),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "channel": self.channel,
        }

    @property
    def reply(self) -> str:
        """The reply text streamed so far."""
        return "".join(self._reply)

    def observe(self, emit: Emit) -> Emit:
        """``emit`` that also records what passes: reply text and tool calls."""

        async def observed(frame: protocol.Frame) -> None:
            await self._see(frame)
            await emit(frame)

        return observed

    async def _see(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.DeltaFrame):
            if self._first_token is None:
                self._first_token = time.perf_counter()
            self._reply.append(frame.content)
        elif isinstance(frame, protocol.ToolCallFrame):
            self._tool_calls += 1
            self._calls[frame.id] = _PendingCall(frame.name, dict(frame.arguments))
        elif isinstance(frame, protocol.ToolResultFrame):
            call = self._calls.pop(frame.id, None)
            if call is not None:
                await self._recorder.publish([self._tool_event(frame.id, call, frame)])

    def _tool_event(
        self, call_id: str, call: _PendingCall, result: protocol.ToolResultFrame | None
    ) -> ToolCallEvent:
        return ToolCallEvent(
            **self.envelope(),
            call_id=call_id,
            name=call.name,
            arguments=call.arguments,
            result=None if result is None else result.content,
            is_error=None if result is None else result.is_error,
        )

    async def finish(
        self,
        *,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        outcome: TurnOutcome = TurnOutcome.COMPLETED,
    ) -> UsageEvent | None:
        """Record the reply and the usage once; later calls do nothing and return None."""
        if self._finished:
            return None
        self._finished = True
        ended = time.perf_counter()
        common = self.envelope()
        events: list[Event] = [
            self._tool_event(call_id, call, None) for call_id, call in self._calls.items()
        ]
        self._calls.clear()
        events.append(
            AssistantReplyEvent(**common, content=self.reply, model=model, outcome=outcome)
        )
        usage = UsageEvent(
            **common,
            tier=self.tier,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self._recorder.cost(model, prompt_tokens, completion_tokens),
            latency_ms=(ended - self._started) * 1000,
            first_token_ms=None
            if self._first_token is None
            else (self._first_token - self._started) * 1000,
            tool_calls=self._tool_calls,
            outcome=outcome,
        )
        events.append(usage)
        await self._recorder.publish(events)
        self._recorder.add_daily(usage)
        return usage


class UsageRecorder:
    """One per gateway process: opens turns, and owns the tasks that record them."""

    def __init__(
        self,
        sink: EventSink,
        store: UsageStore | None,
        *,
        cost: CostFunction = litellm_cost,
        daily_timeout: float = 10.0,
    ) -> None:
        self.sink = sink
        self.store = store
        self.cost = cost
        self._daily_timeout = daily_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    async def start_turn(
        self, *, user_id: str, tier: str, channel: str, session_id: str, text: str
    ) -> Turn:
        """A turn for an admitted message; its user message is recorded at once."""
        turn = Turn(self, user_id=user_id, tier=tier, channel=channel, session_id=session_id)
        await self.publish([UserMessageEvent(**turn.envelope(), content=text)])
        return turn

    async def publish(self, events: list[Event]) -> None:
        try:
            await self.sink.publish(events)
        except EventsRefused as error:
            USAGE_NOT_RECORDED.labels(where="events").inc(len(events))
            logger.error("%d events not recorded: %s", len(events), error)  # noqa: TRY400

    def add_daily(self, usage: UsageEvent) -> None:
        if self.store is None:
            return
        task = asyncio.create_task(self._add_daily(self.store, usage), name="usage:daily")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_daily(self, store: UsageStore, usage: UsageEvent) -> None:
        try:
            async with asyncio.timeout(self._daily_timeout):
                await store.add(
                    usage.user_id,
                    usage.occurred_at.astimezone(dt.UTC).date(),
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
        except (UsageUnavailable, TimeoutError) as error:
            # The event still carries it; the daily total is short by this turn.
            USAGE_NOT_RECORDED.labels(where="daily").inc()
            logger.error(  # noqa: TRY400 - the cause is in the message
                "daily usage of %s not recorded (turn %s): %s", usage.user_id, usage.turn_id, error
            )
        except Exception:
            # A task of our own: nothing may escape it unseen.
            USAGE_NOT_RECORDED.labels(where="daily").inc()
            logger.exception(
                "daily usage of %s not recorded (turn %s)", usage.user_id, usage.turn_id
            )

    async def seed_budget(self, limiter: Limiter, user_id: str) -> None:
        """Give the limiter today's tokens from PostgreSQL if it has no count of its own
        (after a restart without Redis, or a Redis that lost its data). Best effort: a
        database or Redis that is down leaves the limiter as it is."""
        if self.store is None:
            return
        today = dt.datetime.now(dt.UTC).date()
        try:
            used = await self.store.on(user_id, today)
            await limiter.seed_tokens(user_id, used.total_tokens)
        except (UsageUnavailable, LimiterUnavailable) as error:
            logger.warning("today's token budget of %s not seeded: %s", user_id, error)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the daily totals being written; past ``timeout``, give up on them."""
        pending = set(self._tasks)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
            USAGE_NOT_RECORDED.labels(where="daily").inc(len(late))
            logger.error("%d daily usage updates abandoned at shutdown", len(late))

    async def close(self, timeout: float = 5.0) -> None:
        """Finish the daily totals (for at most ``timeout``), then close the sink."""
        await self.drain(timeout)
        await self.sink.close()
