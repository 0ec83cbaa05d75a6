"""Daily usage in a real PostgreSQL: upserts that add, from many writers at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dexorder.core.tiers import RateLimits
from dexorder.devenv.process import free_port
from dexorder.gateway.events import JsonlSink, KafkaSink
from dexorder.gateway.metrics import REGISTRY
from dexorder.gateway.pure.events import EventStream
from dexorder.gateway.spool import Spool
from dexorder.gateway.stores.licenses import Pool, open_pool
from dexorder.gateway.stores.limits import MemoryLimiter
from dexorder.gateway.stores.usage import (
    DailyIncrement,
    DailyUsage,
    UsageRecorder,
    UsageStore,
    UsageUnavailable,
)
from dexorder.gateway.turns import ReplyDelta, TurnTally
from tests.integration.gateway.blackhole_proxy import BlackHoleProxy

DAY = dt.date(2026, 11, 24)


@pytest.fixture
async def pool(migrated_dsn: str) -> AsyncIterator[Pool]:
    pool = await open_pool(migrated_dsn)
    try:
        yield pool
    finally:
        await pool.close()


def not_recorded_daily() -> float:
    value = REGISTRY.get_sample_value(
        "dexorder_gateway_usage_not_recorded_total", {"where": "daily"}
    )
    return value or 0.0


def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_usage_adds_up_per_day(pool: Pool) -> None:
    store, who = UsageStore(pool), user()
    await store.add(who, DAY, prompt_tokens=100, completion_tokens=20)
    await store.add(who, DAY, prompt_tokens=5, completion_tokens=1, messages=2)
    await store.add(who, DAY + dt.timedelta(days=1), prompt_tokens=7, completion_tokens=3)

    assert await store.on(who, DAY) == DailyUsage(DAY, 105, 21, 3)
    assert (await store.on(who, DAY)).total_tokens == 126
    days = await store.daily(who, DAY - dt.timedelta(days=7), DAY + dt.timedelta(days=7))
    assert days == [DailyUsage(DAY, 105, 21, 3), DailyUsage(DAY + dt.timedelta(days=1), 7, 3, 1)]
    assert await store.on(who, DAY - dt.timedelta(days=1)) == DailyUsage(
        DAY - dt.timedelta(days=1), 0, 0, 0
    )
    assert await store.on(user(), DAY) == DailyUsage(DAY, 0, 0, 0)


async def test_concurrent_writers_lose_no_increment(pool: Pool, migrated_dsn: str) -> None:
    # Two pools stand for two gateway replicas.
    other = await open_pool(migrated_dsn)
    try:
        stores = [UsageStore(pool), UsageStore(other)]
        who = user()
        await asyncio.gather(
            *(stores[n % 2].add(who, DAY, prompt_tokens=n, completion_tokens=1) for n in range(60))
        )
        assert await stores[0].on(who, DAY) == DailyUsage(DAY, sum(range(60)), 60, 60)
    finally:
        await other.close()


async def test_negative_increments_are_refused(pool: Pool) -> None:
    with pytest.raises(ValueError, match="negative"):
        await UsageStore(pool).add(user(), DAY, prompt_tokens=-1, completion_tokens=0)


async def test_a_finished_turn_is_added_to_todays_usage(pool: Pool, tmp_path: Path) -> None:
    store, who = UsageStore(pool), user()
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=lambda *_: None)

    for tokens in (30, 12):
        turn = await recorder.start_turn(
            user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
        )
        tally = TurnTally()
        tally.see(ReplyDelta("hello"))
        await turn.finish(model="m", prompt_tokens=tokens, completion_tokens=2, tally=tally)
    await recorder.close()
    today = dt.datetime.now(dt.UTC).date()
    assert await store.on(who, today) == DailyUsage(today, 42, 4, 2)


async def test_an_unreachable_database_neither_fails_nor_delays_the_turn(tmp_path: Path) -> None:
    dead = await open_pool(f"postgresql://127.0.0.1:{free_port()}/none", timeout_seconds=0.5)
    try:
        with pytest.raises(UsageUnavailable):
            await UsageStore(dead).add(user(), DAY, prompt_tokens=1, completion_tokens=1)
        recorder = UsageRecorder(JsonlSink(tmp_path), UsageStore(dead), cost=lambda *_: None)
        before = not_recorded_daily()
        first, second = user(), user()
        for who in (first, second, first):  # one write, then the two others in the next
            turn = await recorder.start_turn(
                user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
            )
            usage = await turn.finish(model="m", prompt_tokens=1, completion_tokens=1)
            assert usage is not None  # recorded as an event at once
        await recorder.close()
        assert not_recorded_daily() == before + 3  # each turn of each failed write
    finally:
        await dead.close()


async def test_a_fresh_limiter_is_seeded_with_todays_durable_usage(pool: Pool) -> None:
    limits = RateLimits(messages_per_minute=10, tokens_per_day=10_000, concurrent_generations=2)
    store, who = UsageStore(pool), user()
    today = dt.datetime.now(dt.UTC).date()
    await store.add(who, today, prompt_tokens=400, completion_tokens=100)

    async def durable(user_id: str) -> int:  # as the gateway wires it (app._open_limiter)
        return (await store.on(user_id, today)).total_tokens

    limiter = MemoryLimiter(durable=durable)  # as after a restart: nothing counted today
    assert (await limiter.admit_generation(who, limits)).allowed
    assert await limiter.tokens_today(who) == 500
    await limiter.add_tokens(who, 10)
    await store.add(who, today, prompt_tokens=1, completion_tokens=0)
    assert (await limiter.admit_generation(who, limits)).allowed  # its own count is kept
    assert await limiter.tokens_today(who) == 510


class CountingStore(UsageStore):
    """The real store, counting its writes."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.writes = 0

    async def add_many(self, increments: Iterable[DailyIncrement]) -> None:
        self.writes += 1
        await super().add_many(increments)


def daily_writers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "usage:daily" and not t.done()]


async def test_add_many_adds_all_rows_or_none(pool: Pool) -> None:
    store, first, second = UsageStore(pool), user(), user()
    await store.add_many(
        [
            DailyIncrement(first, DAY, 10, 1),
            DailyIncrement(second, DAY, 20, 2, 3),
            DailyIncrement(first, DAY, 5, 5),  # the same row twice: summed
            DailyIncrement(first, DAY + dt.timedelta(days=1), 1, 1),
        ]
    )
    assert await store.on(first, DAY) == DailyUsage(DAY, 15, 6, 2)
    assert await store.on(second, DAY) == DailyUsage(DAY, 20, 2, 3)
    assert await store.on(first, DAY + dt.timedelta(days=1)) == DailyUsage(
        DAY + dt.timedelta(days=1), 1, 1, 1
    )
    third = user()
    for bad, why in (
        (DailyIncrement("", DAY, 1, 1), "not a user id"),
        (DailyIncrement(third, DAY, 1, -1), "negative"),
    ):
        with pytest.raises(ValueError, match=why):
            await store.add_many([DailyIncrement(third, DAY, 1, 1), bad])
    assert await store.on(third, DAY) == DailyUsage(DAY, 0, 0, 0)
    await store.add_many([])


async def test_a_write_of_more_rows_than_a_statement_takes(pool: Pool) -> None:
    store = UsageStore(pool)
    who = [user() for _ in range(2500)]
    await store.add_many(DailyIncrement(w, DAY, n, 1) for n, w in enumerate(who))
    for n in (0, 999, 1000, 1001, 2499):
        assert await store.on(who[n], DAY) == DailyUsage(DAY, n, 1, 1)


async def test_many_turns_at_once_on_two_replicas_add_up_exactly(
    pool: Pool, migrated_dsn: str, tmp_path: Path
) -> None:
    other = await open_pool(migrated_dsn)
    try:
        stores = [CountingStore(pool), CountingStore(other)]
        recorders = [
            UsageRecorder(JsonlSink(tmp_path / str(n)), store, cost=lambda *_: None)
            for n, store in enumerate(stores)
        ]
        users = [user() for _ in range(8)]
        draw = random.Random(7)
        expected = {who: [0, 0, 0] for who in users}
        before = not_recorded_daily()

        async def one_turn(recorder: UsageRecorder, who: str, spread: float) -> None:
            prompt, completion = draw.randrange(5000), draw.randrange(900)
            expected[who][0] += prompt
            expected[who][1] += completion
            expected[who][2] += 1
            turn = await recorder.start_turn(
                user_id=who, tier="pro", channel="websocket", session_id="s", text="hi"
            )
            await asyncio.sleep(draw.random() * spread)  # the replies end at various times
            await turn.finish(model="m", prompt_tokens=prompt, completion_tokens=completion)

        # All at once: the turns share a few writes.
        await asyncio.gather(*(one_turn(recorders[n % 2], users[n % 8], 0) for n in range(400)))
        await asyncio.gather(*(recorder.drain() for recorder in recorders))
        assert sum(store.writes for store in stores) < 400 / 4
        # Spread over 50 ms: many writes of both replicas, on the same rows at the same time.
        await asyncio.gather(*(one_turn(recorders[n % 2], users[n % 8], 0.05) for n in range(400)))
        for recorder in recorders:
            await recorder.close()

        assert not_recorded_daily() == before
        today = dt.datetime.now(dt.UTC).date()
        for who in users:
            assert await stores[0].on(who, today) == DailyUsage(today, *expected[who])
        assert daily_writers() == []
    finally:
        await other.close()


async def test_a_write_held_up_past_close_is_given_up_and_counted(
    pool: Pool, migrated_dsn: str, tmp_path: Path
) -> None:
    store, who = UsageStore(pool), user()
    today = dt.datetime.now(dt.UTC).date()
    await store.add(who, today, prompt_tokens=1, completion_tokens=1)
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=lambda *_: None)
    before = not_recorded_daily()
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as locker:
        # Another transaction holds the row: the upsert waits for it.
        await locker.execute(
            "SELECT 1 FROM usage_daily WHERE user_id = %s AND day = %s FOR UPDATE", (who, today)
        )
        for _ in range(3):
            turn = await recorder.start_turn(
                user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
            )
            await turn.finish(model="m", prompt_tokens=10, completion_tokens=1)
            await asyncio.sleep(0.01)
        await recorder.close(timeout=0.3)
        assert not_recorded_daily() == before + 3
        assert daily_writers() == []
        await locker.rollback()
    # The write in flight was cancelled in the server too (psycopg cancels the query), so
    # what was counted as not recorded is not in the total either; and the pool still works.
    await store.add(who, today, prompt_tokens=1, completion_tokens=0)
    assert await store.on(who, today) == DailyUsage(today, 2, 1, 2)


async def test_close_fits_the_daily_totals_and_the_event_flush_in_one_timeout(
    pool: Pool, migrated_dsn: str, tmp_path: Path
) -> None:
    """The shutdown gives usage one allowance: a database that holds the last daily write
    up and a broker that is down share it, rather than taking it each in turn (the chart's
    grace period counts it once)."""
    store, who = UsageStore(pool), user()
    today = dt.datetime.now(dt.UTC).date()
    await store.add(who, today, prompt_tokens=1, completion_tokens=1)
    topics = {EventStream.USAGE: "usage-unsent", EventStream.CONVERSATION: "conv-unsent"}
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    sink = KafkaSink(f"127.0.0.1:{free_port()}", topics, spool)  # no broker there
    await sink.start()
    recorder = UsageRecorder(sink, store, cost=lambda *_: None)
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as locker:
        await locker.execute(
            "SELECT 1 FROM usage_daily WHERE user_id = %s AND day = %s FOR UPDATE", (who, today)
        )
        turn = await recorder.start_turn(
            user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
        )
        await turn.finish(model="m", prompt_tokens=10, completion_tokens=1)
        started = time.monotonic()
        await recorder.close(timeout=1.0)
        took = time.monotonic() - started
        await locker.rollback()
    assert took < 2.0, f"closing took {took:.1f} s for an allowance of 1 s"
    reopened = Spool(tmp_path / "spool", max_bytes=1 << 20)
    assert len(reopened.open()) == 3  # the turn's events wait in the spool for the broker
    reopened.close()


async def test_close_gives_up_a_write_to_a_database_that_stopped_answering(
    migrated_dsn: str, tmp_path: Path
) -> None:
    """A database that stops answering mid-write (its network path died) never answers the
    cancel psycopg sends it for the write either: close still ends within its timeout, and
    counts the write as not recorded."""
    dsn = conninfo_to_dict(migrated_dsn)
    proxy = await BlackHoleProxy(int(dsn.get("port") or 5432)).start()
    pool = await open_pool(make_conninfo(migrated_dsn, host="127.0.0.1", port=str(proxy.port)))
    try:
        store, who = UsageStore(pool), user()
        today = dt.datetime.now(dt.UTC).date()
        await store.add(who, today, prompt_tokens=1, completion_tokens=1)
        recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=lambda *_: None)
        before = not_recorded_daily()
        await proxy.black_hole(later_too=True)
        turn = await recorder.start_turn(
            user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
        )
        await turn.finish(model="m", prompt_tokens=10, completion_tokens=1)
        started = time.monotonic()
        await recorder.close(timeout=1.0)
        took = time.monotonic() - started
        assert took < 2.0, f"closing took {took:.1f} s for an allowance of 1 s"
        assert not_recorded_daily() == before + 1
        assert daily_writers() == []
    finally:
        await pool.close(timeout=0.5)
        await proxy.close()
