"""Daily usage in a real PostgreSQL: upserts that add, from many writers at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dexorder.core import protocol
from dexorder.devenv.process import free_port
from dexorder.gateway.events import JsonlSink
from dexorder.gateway.licenses import Pool, open_pool
from dexorder.gateway.limits import MemoryLimiter
from dexorder.gateway.metrics import REGISTRY
from dexorder.gateway.usage import (
    DailyUsage,
    UsageRecorder,
    UsageStore,
    UsageUnavailable,
)

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

    async def shown(_: protocol.Frame) -> None:
        return None

    for tokens in (30, 12):
        turn = await recorder.start_turn(
            user_id=who, tier="free", channel="websocket", session_id="s", text="hi"
        )
        await turn.observe(shown)(protocol.DeltaFrame(content="hello"))
        await turn.finish(model="m", prompt_tokens=tokens, completion_tokens=2)
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
        turn = await recorder.start_turn(
            user_id=user(), tier="free", channel="websocket", session_id="s", text="hi"
        )
        usage = await turn.finish(model="m", prompt_tokens=1, completion_tokens=1)
        assert usage is not None  # recorded as an event at once
        await recorder.close()
        assert not_recorded_daily() == before + 1
    finally:
        await dead.close()


async def test_a_fresh_limiter_is_seeded_with_todays_durable_usage(
    pool: Pool, tmp_path: Path
) -> None:
    store, who = UsageStore(pool), user()
    today = dt.datetime.now(dt.UTC).date()
    await store.add(who, today, prompt_tokens=400, completion_tokens=100)
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=lambda *_: None)
    limiter = MemoryLimiter()  # as after a restart: it has counted nothing today
    await recorder.seed_budget(limiter, who)
    assert await limiter.tokens_today(who) == 500
    await limiter.add_tokens(who, 10)
    await recorder.seed_budget(limiter, who)  # a count of its own is kept
    assert await limiter.tokens_today(who) == 510
    await recorder.close()
