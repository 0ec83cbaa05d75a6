"""Per-user limits in a real Redis: exact across OS processes, budgets, and leases that
outlive no process."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.asyncio import Redis

from dexorder.core.tiers import RateLimits
from dexorder.gateway.pure.ratelimit import Limit
from dexorder.gateway.stores.limits import LimiterUnavailable, RedisLimiter

LIMITS = RateLimits(messages_per_minute=5, tokens_per_day=1000, concurrent_generations=2)

# A worker process: waits for the start signal, then sends its messages as fast as it can
# and prints one JSON decision per line.
_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from redis.asyncio import Redis
    from dexorder.core.tiers import RateLimits
    from dexorder.gateway.stores.limits import RedisLimiter

    async def main(url, user, start_list, count, limit, mode):
        redis = Redis.from_url(url)
        limiter = RedisLimiter(redis)
        limits = RateLimits(
            messages_per_minute=limit, tokens_per_day=10**6, concurrent_generations=100
        )
        await redis.blpop([start_list], timeout=30)
        for _ in range(count):
            if mode == "turn":
                decision = await limiter.admit_turn(user, limits)
                if decision.allowed:
                    await limiter.end_generation(user, decision.lease, 1)
            else:
                decision = await limiter.admit_message(user, limits)
            print(json.dumps([decision.allowed, decision.retry_after]), flush=True)
        await redis.aclose()

    asyncio.run(
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    )
    """
)

# A process that takes a generation slot with a short lease, says so, and then hangs.
_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from redis.asyncio import Redis
    from dexorder.core.tiers import RateLimits
    from dexorder.gateway.stores.limits import RedisLimiter

    async def main(url, user):
        limiter = RedisLimiter(Redis.from_url(url), lease_seconds=1.0)
        limits = RateLimits(messages_per_minute=5, tokens_per_day=10, concurrent_generations=1)
        decision = await limiter.admit_generation(user, limits)
        print("held" if decision.allowed else "refused", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def limiter(redis: Redis) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter(redis, prefix=f"test:{uuid.uuid4().hex[:8]}")
    try:
        yield limiter
    finally:
        await limiter.close()


def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("mode", ["message", "turn"])
async def test_a_limit_is_exact_across_two_processes(
    redis: Redis, redis_url: str, mode: str
) -> None:
    limit = 20
    who, start = user(), f"start:{uuid.uuid4().hex}"
    counts = (limit // 2, limit // 2 + 1)  # N + 1 messages in all, from two processes
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            redis_url,
            who,
            start,
            str(count),
            str(limit),
            mode,
            stdout=asyncio.subprocess.PIPE,
        )
        for count in counts
    ]
    try:
        # Both start at once: when both are connected and blocked on the start list.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            blocked = [c for c in await redis.client_list() if c.get("cmd") == "blpop"]
            if len(blocked) >= len(workers):
                break
            await asyncio.sleep(0.05)
        assert len(blocked) >= len(workers), blocked
        await redis.rpush(start, *["go"] * len(workers))
        async with asyncio.timeout(60):
            outputs = [await worker.communicate() for worker in workers]
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    assert [w.returncode for w in workers] == [0, 0]
    decisions = [json.loads(line) for out, _ in outputs for line in out.decode().splitlines()]
    assert len(decisions) == limit + 1 == sum(counts)
    refused = [retry for allowed, retry in decisions if not allowed]
    assert len(refused) == 1
    assert 0 < refused[0] <= 60


async def test_a_refused_message_is_allowed_again_once_the_window_moves(
    limiter: RedisLimiter, redis: Redis
) -> None:
    who = user()
    limits = RateLimits(messages_per_minute=2, tokens_per_day=10, concurrent_generations=1)
    assert (await limiter.admit_message(who, limits)).allowed
    assert (await limiter.admit_message(who, limits)).allowed
    refused = await limiter.admit_message(who, limits)
    assert not refused.allowed
    assert refused.limit is Limit.MESSAGES_PER_MINUTE
    assert 59 < refused.retry_after <= 60
    # Move the window: age every entry by a minute, as the clock would.
    key = f"{limiter._prefix}:{{{who}}}:messages"
    entries = cast(list[tuple[bytes, float]], await redis.zrange(key, 0, -1, withscores=True))
    aged = {member: score - 60_000 for member, score in entries}
    await redis.zadd(key, aged)
    assert (await limiter.admit_message(who, limits)).allowed


async def test_a_turn_is_admitted_and_ended_in_one_round_trip_each(
    limiter: RedisLimiter, redis: Redis
) -> None:
    who = user()
    one = RateLimits(messages_per_minute=2, tokens_per_day=50, concurrent_generations=1)
    first = await limiter.admit_turn(who, one)
    assert first.allowed
    busy = await limiter.admit_turn(who, one)
    assert busy.limit is Limit.CONCURRENT_GENERATIONS
    await limiter.end_generation(who, first.lease, 50)
    assert await limiter.tokens_today(who) == 50
    assert await redis.zcard(f"{limiter._prefix}:{{{who}}}:leases") == 0
    spent = await limiter.admit_turn(who, one)
    assert spent.limit is Limit.TOKENS_PER_DAY
    # Neither refusal spent a message: one of two is used.
    window = await redis.zcard(f"{limiter._prefix}:{{{who}}}:messages")
    assert window == 1


async def test_the_token_budget_refuses_generations_until_the_next_day(
    limiter: RedisLimiter,
) -> None:
    who = user()
    first = await limiter.admit_generation(who, LIMITS)
    assert first.allowed
    await limiter.add_tokens(who, 999)
    await limiter.release_generation(who, first.lease)
    second = await limiter.admit_generation(who, LIMITS)
    assert second.allowed
    await limiter.add_tokens(who, 1)
    await limiter.release_generation(who, second.lease)
    assert await limiter.tokens_today(who) == 1000
    refused = await limiter.admit_generation(who, LIMITS)
    assert not refused.allowed
    assert refused.limit is Limit.TOKENS_PER_DAY
    assert 0 < refused.retry_after <= 86_400


async def test_seeding_keeps_a_count_redis_already_has(limiter: RedisLimiter) -> None:
    who = user()
    assert await limiter.seed_tokens(who, 900)
    assert not await limiter.seed_tokens(who, 0)
    await limiter.end_generation(who, None, 100)
    assert await limiter.tokens_today(who) == 1000
    assert (await limiter.admit_turn(who, LIMITS)).limit is Limit.TOKENS_PER_DAY


async def test_concurrent_generations_are_capped_and_slots_come_back(
    limiter: RedisLimiter, redis: Redis
) -> None:
    who = user()
    # A second replica shares the limit.
    other = RedisLimiter(redis, prefix=limiter._prefix)
    try:
        first = await limiter.admit_generation(who, LIMITS)
        second = await other.admit_generation(who, LIMITS)
        third = await limiter.admit_generation(who, LIMITS)
        assert first.allowed
        assert second.allowed
        assert not third.allowed
        assert third.limit is Limit.CONCURRENT_GENERATIONS
        await other.release_generation(who)
        fourth = await limiter.admit_generation(who, LIMITS)
        assert fourth.allowed
        await limiter.release_generation(who, first.lease)
        await limiter.release_generation(who, fourth.lease)
    finally:
        await other.close()


async def test_a_held_slot_is_renewed_past_its_lease(redis: Redis) -> None:
    limiter = RedisLimiter(redis, prefix=f"test:{uuid.uuid4().hex[:8]}", lease_seconds=0.5)
    one = RateLimits(messages_per_minute=5, tokens_per_day=10, concurrent_generations=1)
    who = user()
    try:
        held = await limiter.admit_generation(who, one)
        assert held.allowed
        await asyncio.sleep(1.5)  # three leases long: only renewal keeps it
        assert not (await limiter.admit_generation(who, one)).allowed
        await limiter.release_generation(who, held.lease)
        assert (await limiter.admit_generation(who, one)).allowed
        await limiter.release_generation(who)
    finally:
        await limiter.close()


async def test_a_slot_held_by_a_killed_process_expires(
    limiter: RedisLimiter, redis_url: str
) -> None:
    who = user()
    one = RateLimits(messages_per_minute=5, tokens_per_day=10, concurrent_generations=1)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, redis_url, who, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(60):
            line = await holder.stdout.readline()
        assert line.strip() == b"held"
        # The holder's limiter uses the default prefix; so does this one, for this test.
        shared = RedisLimiter(limiter._redis)
        try:
            assert not (await shared.admit_generation(who, one)).allowed
            holder.kill()
            await holder.wait()
            killed = time.monotonic()
            while not (decision := await shared.admit_generation(who, one)).allowed:
                assert time.monotonic() - killed < 5, "the dead process's slot never expired"
                await asyncio.sleep(0.1)
            await shared.release_generation(who, decision.lease)
        finally:
            await shared.close()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_an_unreachable_redis_refuses_with_a_clear_error() -> None:
    from dexorder.devenv.process import free_port

    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    limiter = RedisLimiter(client)
    try:
        with pytest.raises(LimiterUnavailable, match="cannot reach Redis"):
            await limiter.admit_message("u", LIMITS)
    finally:
        await client.aclose()
