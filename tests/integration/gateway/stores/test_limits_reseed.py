"""Redis losing its data mid-day: today's token count is seeded again from PostgreSQL
whenever it is missing, so a wipe does not restart anyone's daily budget."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from dexorder.core.tiers import RateLimits
from dexorder.gateway.stores.licenses import Pool, open_pool
from dexorder.gateway.stores.limits import RedisLimiter
from dexorder.gateway.stores.usage import UsageStore

LIMITS = RateLimits(messages_per_minute=100, tokens_per_day=1000, concurrent_generations=5)
# The limiter's own database, so wiping it touches no other test's keys.
LIMITER_DB = 10


@pytest.fixture
async def pool(migrated_dsn: str) -> AsyncIterator[Pool]:
    pool = await open_pool(migrated_dsn)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{LIMITER_DB}")
    try:
        await client.flushdb()
        yield client
    finally:
        await client.aclose()


def limiter_on(redis: Redis, store: UsageStore, seed_timeout: float = 2.0) -> RedisLimiter:
    async def durable(user_id: str) -> int:
        return (await store.on(user_id, dt.datetime.now(dt.UTC).date())).total_tokens

    return RedisLimiter(redis, durable=durable, seed_timeout=seed_timeout)


async def used_today(store: UsageStore, user: str, tokens: int) -> None:
    today = dt.datetime.now(dt.UTC).date()
    await store.add(user, today, prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2)


async def test_a_count_redis_lost_is_seeded_before_a_turn_is_admitted(
    redis: Redis, pool: Pool
) -> None:
    store, user = UsageStore(pool), f"user-{uuid.uuid4().hex}"
    await used_today(store, user, 1000)  # the whole day's budget, as PostgreSQL has it
    limiter = limiter_on(redis, store)
    try:
        decision = await limiter.admit_turn(user, LIMITS)
        assert not decision.allowed
        assert decision.limit == "tokens_per_day"
        assert await limiter.tokens_today(user) == 1000
    finally:
        await limiter.close()


async def test_tokens_counted_after_a_wipe_add_to_the_durable_count(
    redis: Redis, pool: Pool
) -> None:
    store, user = UsageStore(pool), f"user-{uuid.uuid4().hex}"
    await used_today(store, user, 900)
    limiter = limiter_on(redis, store)
    try:
        decision = await limiter.admit_turn(user, LIMITS)
        assert decision.allowed
        assert await limiter.tokens_today(user) == 900
        await redis.flushall()  # Redis loses everything while the turn runs
        await limiter.end_generation(user, decision.lease, 200)
        assert await limiter.tokens_today(user) == 1100
        refused = await limiter.admit_turn(user, LIMITS)
        assert not refused.allowed
    finally:
        await limiter.close()


async def test_without_the_database_a_turn_is_still_admitted_and_seeded_later(
    redis: Redis, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    user = f"user-{uuid.uuid4().hex}"
    await used_today(UsageStore(pool), user, 950)
    dead = await open_pool("postgresql://dexorder@127.0.0.1:1/dexorder", timeout_seconds=0.2)
    try:
        down = limiter_on(redis, UsageStore(dead), seed_timeout=0.5)
        for _ in range(3):
            decision = await down.admit_turn(user, LIMITS)
            assert decision.allowed  # the limiter does not refuse chat for a seed
            await down.end_generation(user, decision.lease, 10)
        assert await down.tokens_today(user) == 0, "the count stays missing, to be seeded"
        await down.close()
        seeds = [r for r in caplog.records if "could not be seeded" in r.getMessage()]
        assert len(seeds) == 1, "one warning a minute, not one per turn"
    finally:
        await dead.close()
    back = limiter_on(redis, UsageStore(pool))
    try:
        await back.admit_turn(user, LIMITS)
        assert await back.tokens_today(user) == 950
    finally:
        await back.close()
