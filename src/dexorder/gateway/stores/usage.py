"""What each turn used: its events (to the event sink) and the daily totals (PostgreSQL).

``UsageRecorder.start_turn`` opens a ``Turn`` when a message is admitted; the turn sees the
events the harness yields (``Turn.see``), so it records each tool call as it finishes, and
``Turn.finish`` records the reply and the usage from the turn's ``TurnTally``. Recording never
fails a turn and never delays its reply: a sink that refuses or a database that is down
is logged and counted, and the daily totals are written by a task of the recorder's own.

Turns end by the hundred at once, so their end is kept cheap: a model's price is looked up
in LiteLLM once and then is two multiplications (``llm.pricing.litellm_cost``), and the
daily totals are group-committed (one writer per recorder; what turns add while it writes
is summed per user and day and goes in its next statement).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import Counter

from dexorder.gateway import metrics
from dexorder.gateway.events import EventSink, EventsRefused
from dexorder.gateway.llm.pricing import litellm_cost
from dexorder.gateway.pure.events import (
    AssistantReplyEvent,
    Event,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    new_event_id,
)
from dexorder.gateway.stores.licenses import Pool
from dexorder.gateway.supervision import supervise
from dexorder.gateway.turns import ToolFinished, ToolStarted, TurnEvent, TurnTally

logger = logging.getLogger(__name__)

#: (model, prompt tokens, completion tokens) to US dollars; None when the price is unknown.
CostFunction = Callable[[str, int, int], float | None]

USAGE_NOT_RECORDED = Counter(
    "dexorder_gateway_usage_not_recorded",
    "Turns whose events or daily totals could not be recorded, by where.",
    ["where"],
    registry=metrics.REGISTRY,
)

_UPSERT_INTO = "INSERT INTO usage_daily (user_id, day, prompt_tokens, completion_tokens, messages) "
_UPSERT_ADDING = (
    " ON CONFLICT (user_id, day) DO UPDATE SET "
    "prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens, "
    "completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens, "
    "messages = usage_daily.messages + EXCLUDED.messages"
)
#: Rows per statement: PostgreSQL takes at most 65535 parameters (5 a row) in one.
_ROWS_PER_STATEMENT = 1000
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


@dataclass(frozen=True)
class DailyIncrement:
    """What to add to one user's totals of one day."""

    user_id: str
    day: dt.date
    prompt_tokens: int
    completion_tokens: int
    messages: int = 1

    def refusal(self) -> str | None:
        """Why the table would refuse it (found before it is sent, with other rows)."""
        if not self.user_id or "\x00" in self.user_id:
            return f"not a user id: {self.user_id!r}"
        if min(self.prompt_tokens, self.completion_tokens, self.messages) < 0:
            return "usage increments must not be negative"
        return None


@functools.lru_cache(maxsize=64)
def _upsert_rows(rows: int) -> str:
    """One upsert adding ``rows`` rows: measured cheaper for the client than ``executemany``
    (one statement per row) and than ``unnest`` of arrays (whose adaptation costs more than
    the rows save) at the few rows a write usually carries."""
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * rows)
    return f"{_UPSERT_INTO}VALUES {values}{_UPSERT_ADDING}"


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
        await self.add_many(
            [DailyIncrement(user_id, day, prompt_tokens, completion_tokens, messages)]
        )

    async def add_many(self, increments: Iterable[DailyIncrement]) -> None:
        """Add them all in one transaction: all are added, or none (and this raises).

        Two increments of the same user and day are summed first (a statement may not
        update a row twice). Rows go in (user, day) order, the same in every replica, so
        two replicas' writes wait for each other's row locks instead of deadlocking.
        """
        summed: dict[tuple[str, dt.date], list[int]] = {}
        for increment in increments:
            if (refusal := increment.refusal()) is not None:
                raise ValueError(refusal)
            totals = summed.setdefault((increment.user_id, increment.day), [0, 0, 0])
            totals[0] += increment.prompt_tokens
            totals[1] += increment.completion_tokens
            totals[2] += increment.messages
        if not summed:
            return
        rows = [(*key, *summed[key]) for key in sorted(summed)]
        try:
            async with self._pool.connection() as connection:
                if len(rows) <= _ROWS_PER_STATEMENT:
                    await _upsert(connection, rows)
                else:
                    async with connection.transaction():
                        for first in range(0, len(rows), _ROWS_PER_STATEMENT):
                            await _upsert(connection, rows[first : first + _ROWS_PER_STATEMENT])
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


async def _upsert(
    connection: psycopg.AsyncConnection[Any], rows: Sequence[tuple[Any, ...]]
) -> None:
    await connection.execute(_upsert_rows(len(rows)), [value for row in rows for value in row])


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
        #: Tools called and not finished yet; recorded without a result if the turn ends.
        self._calls: dict[str, _PendingCall] = {}
        self._finished = False

    def envelope(self) -> dict[str, Any]:
        return {
            "occurred_at": dt.datetime.now(dt.UTC),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "channel": self.channel,
        }

    def see(self, event: TurnEvent) -> Awaitable[None] | None:
        """Record a tool's call as its events pass; on its finish, the awaitable that
        publishes the call's event (awaited before the event goes on to the channel).

        It runs once per streamed token, so it makes no coroutine for any other event."""
        if isinstance(event, ToolStarted):
            self._calls[event.call_id] = _PendingCall(event.name, dict(event.arguments))
        elif isinstance(event, ToolFinished):
            call = self._calls.pop(event.call_id, None)
            if call is not None:
                return self._recorder.publish([self._tool_event(event.call_id, call, event)])
        return None

    def _tool_event(
        self, call_id: str, call: _PendingCall, result: ToolFinished | None
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
        tally: TurnTally | None = None,
    ) -> UsageEvent | None:
        """Record the reply and the usage once; later calls do nothing and return None.

        ``tally`` is what the turn's events added up to (None: nothing was streamed)."""
        if self._finished:
            return None
        self._finished = True
        ended = time.perf_counter()
        tally = TurnTally() if tally is None else tally
        common = self.envelope()
        events: list[Event] = [
            self._tool_event(call_id, call, None) for call_id, call in self._calls.items()
        ]
        self._calls.clear()
        events.append(
            AssistantReplyEvent(**common, content=tally.reply, model=model, outcome=outcome)
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
            if tally.first_token_at is None
            else (tally.first_token_at - self._started) * 1000,
            tool_calls=tally.tool_calls,
            outcome=outcome,
        )
        events.append(usage)
        await self._recorder.publish(events)
        self._recorder.add_daily(usage)
        return usage


_CANCEL_GRACE_SECONDS = 0.2
"""How long a cancelled daily write may take to end before it is cancelled again."""

DAILY_BATCH_SECONDS = 0.05
"""How long the gateway's daily-totals writer gathers turns before each write."""


@dataclass
class _PendingDaily:
    """What turns added to one user's day and is not written yet, and which turns."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    turn_ids: list[str] = field(default_factory=list)


_DailyBatch = dict[tuple[str, dt.date], _PendingDaily]


class UsageRecorder:
    """One per gateway process: opens turns, and owns the task that records their totals
    (one write at a time, each given up after ``daily_timeout`` seconds)."""

    def __init__(
        self,
        sink: EventSink,
        store: UsageStore | None,
        *,
        cost: CostFunction = litellm_cost,
        daily_timeout: float = 10.0,
        daily_batch_seconds: float = 0.0,
    ) -> None:
        self.sink = sink
        self.store = store
        self.cost = cost
        self._daily_timeout = daily_timeout
        self._daily_batch_seconds = daily_batch_seconds
        #: Added since the write in flight began; the next write carries all of it.
        self._pending: _DailyBatch = {}
        #: What the write in flight carries.
        self._writing: _DailyBatch = {}
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

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
        """Add the turn to its user's daily totals, in the background."""
        if self.store is None:
            return
        key = (usage.user_id, usage.occurred_at.astimezone(dt.UTC).date())
        # Refused here, a bad turn fails alone, not with the write it would share; and after
        # close no writer would be waited for, so none is started.
        refusal = (
            "the recorder is closed"
            if self._closed
            else DailyIncrement(*key, usage.prompt_tokens, usage.completion_tokens).refusal()
        )
        if refusal is not None:
            _not_recorded({key: _PendingDaily(turn_ids=[usage.turn_id])}, refusal)
            return
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _PendingDaily()
        pending.prompt_tokens += usage.prompt_tokens
        pending.completion_tokens += usage.completion_tokens
        pending.turn_ids.append(usage.turn_id)
        # A writer cancelled before it began (so before its try) left its turns pending.
        if self._writer is None or self._writer.done():
            self._writer = supervise(self._write_daily(self.store), name="usage:daily")

    async def _write_daily(self, store: UsageStore) -> None:
        """Write until nothing is pending; each write takes all that is pending."""
        try:
            while self._pending:
                if self._daily_batch_seconds > 0:
                    # The turns that end meanwhile share this write (a statement costs a
                    # fraction of a millisecond of this process's CPU, whatever it carries).
                    await asyncio.sleep(self._daily_batch_seconds)
                self._writing, self._pending = self._pending, {}
                await self._write(store, self._writing)
                self._writing = {}
        except asyncio.CancelledError:
            self._abandon()
            raise
        finally:
            self._writer = None

    def _abandon(self) -> None:
        """Count and log, as not recorded, every turn not written yet."""
        abandoned = _turns(self._writing) + _turns(self._pending)
        self._writing, self._pending = {}, {}
        if abandoned:
            USAGE_NOT_RECORDED.labels(where="daily").inc(abandoned)
            logger.error("%d daily usage updates abandoned at shutdown", abandoned)

    async def _write(self, store: UsageStore, batch: _DailyBatch) -> None:
        increments = [
            DailyIncrement(
                user_id,
                day,
                pending.prompt_tokens,
                pending.completion_tokens,
                len(pending.turn_ids),
            )
            for (user_id, day), pending in batch.items()
        ]
        try:
            async with asyncio.timeout(self._daily_timeout):
                await store.add_many(increments)
        except (UsageUnavailable, TimeoutError) as error:
            # The events still carry them; the daily totals are short by these turns.
            _not_recorded(batch, str(error) or "timed out")
        except Exception as error:
            # The writer is ours: nothing may escape it unseen.
            logger.exception("daily usage write failed")
            _not_recorded(batch, repr(error))

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the daily totals to be written, those added meanwhile too; past
        ``timeout``, give up on what is left (counted and logged as not recorded)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (writer := self._writer) is not None:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if not writer.done():
                done, _ = await asyncio.wait({writer}, timeout=left)
                if done:
                    continue  # it ended by itself: the next writer, if any, is waited for
                writer.cancel()  # a writer that has begun counts what it abandons
                # psycopg answers a cancel by asking the server to cancel the query, and
                # waits for it: a server that does not answer never does. A second cancel
                # makes it close the connection instead.
                _, late = await asyncio.wait({writer}, timeout=_CANCEL_GRACE_SECONDS)
                if late:
                    writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if self._writer is writer:  # it was cancelled before it began: count for it
                self._writer = None
                self._abandon()
            return

    async def close(self, timeout: float = 5.0) -> None:
        """Finish the daily totals, then close the sink (which delivers what it can), both
        within ``timeout``: the shutdown's one allowance for usage. Turns that end after
        this are not added to the daily totals (and are counted as such)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.drain(timeout)
        # What the sink cannot deliver in the time left stays in its spool.
        await self.sink.close(max(0.0, deadline - loop.time()))


def _turns(batch: _DailyBatch) -> int:
    return sum(len(pending.turn_ids) for pending in batch.values())


def _not_recorded(batch: _DailyBatch, why: str) -> None:
    USAGE_NOT_RECORDED.labels(where="daily").inc(_turns(batch))
    for (user_id, _), pending in batch.items():
        for turn_id in pending.turn_ids:
            logger.error("daily usage of %s not recorded (turn %s): %s", user_id, turn_id, why)
