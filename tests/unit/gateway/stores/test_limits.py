"""The in-memory limiter: the same three limits as Redis, for one process."""

from __future__ import annotations

import time

import pytest

from dexorder.core.tiers import RateLimits
from dexorder.gateway.pure.ratelimit import Limit
from dexorder.gateway.stores.limits import MemoryLimiter

LIMITS = RateLimits(messages_per_minute=3, tokens_per_day=100, concurrent_generations=2)


async def test_messages_past_the_limit_are_refused_with_a_wait() -> None:
    limiter = MemoryLimiter()
    decisions = [await limiter.admit_message("u", LIMITS) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    refused = decisions[-1]
    assert refused.limit is Limit.MESSAGES_PER_MINUTE
    assert 59 < refused.retry_after <= 60


async def test_users_have_separate_windows() -> None:
    limiter = MemoryLimiter()
    for _ in range(3):
        await limiter.admit_message("a", LIMITS)
    assert (await limiter.admit_message("b", LIMITS)).allowed


async def test_generations_are_leased_and_released() -> None:
    limiter = MemoryLimiter()
    first = await limiter.admit_generation("u", LIMITS)
    second = await limiter.admit_generation("u", LIMITS)
    third = await limiter.admit_generation("u", LIMITS)
    assert first.allowed
    assert second.allowed
    assert not third.allowed
    assert first.lease
    assert second.lease
    assert first.lease != second.lease
    assert third.limit is Limit.CONCURRENT_GENERATIONS
    await limiter.release_generation("u", first.lease)
    assert (await limiter.admit_generation("u", LIMITS)).allowed


async def test_release_without_a_lease_frees_one_of_the_users_slots() -> None:
    limiter = MemoryLimiter()
    await limiter.admit_generation("u", LIMITS)
    await limiter.admit_generation("u", LIMITS)
    await limiter.release_generation("u")
    assert (await limiter.admit_generation("u", LIMITS)).allowed
    assert not (await limiter.admit_generation("u", LIMITS)).allowed


async def test_releasing_another_users_lease_does_nothing() -> None:
    limiter = MemoryLimiter()
    one = RateLimits(messages_per_minute=3, tokens_per_day=100, concurrent_generations=1)
    held = await limiter.admit_generation("u", one)
    await limiter.release_generation("someone-else", held.lease)
    assert not (await limiter.admit_generation("u", one)).allowed


async def test_a_spent_token_budget_refuses_until_tomorrow() -> None:
    limiter = MemoryLimiter()
    await limiter.add_tokens("u", 60)
    assert (await limiter.admit_generation("u", LIMITS)).allowed
    await limiter.add_tokens("u", 40)
    assert await limiter.tokens_today("u") == 100
    refused = await limiter.admit_generation("u", LIMITS)
    assert refused.limit is Limit.TOKENS_PER_DAY
    assert 0 < refused.retry_after <= 86_400


async def test_a_turn_is_admitted_in_one_step_and_counts_one_message() -> None:
    limiter = MemoryLimiter()
    one = RateLimits(messages_per_minute=2, tokens_per_day=100, concurrent_generations=1)
    first = await limiter.admit_turn("u", one)
    assert first.allowed
    assert first.lease is not None
    # Refused for concurrency: the message is not spent.
    busy = await limiter.admit_turn("u", one)
    assert busy.limit is Limit.CONCURRENT_GENERATIONS
    await limiter.end_generation("u", first.lease, 30)
    assert await limiter.tokens_today("u") == 30
    assert (await limiter.admit_turn("u", one)).allowed
    await limiter.end_generation("u", None, 0)
    refused = await limiter.admit_turn("u", one)
    assert refused.limit is Limit.MESSAGES_PER_MINUTE


async def test_seeding_starts_todays_count_only_once() -> None:
    limiter = MemoryLimiter()
    assert await limiter.seed_tokens("u", 70)
    assert not await limiter.seed_tokens("u", 5)
    await limiter.add_tokens("u", 30)
    assert await limiter.tokens_today("u") == 100
    assert (await limiter.admit_generation("u", LIMITS)).limit is Limit.TOKENS_PER_DAY


async def test_messages_leave_the_window_after_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    limiter = MemoryLimiter()
    for step in range(3):
        clock[0] += 10 * step
        assert (await limiter.admit_message("u", LIMITS)).allowed
    refused = await limiter.admit_message("u", LIMITS)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(30)  # the first leaves 60 s after it came
    clock[0] += 30.5
    assert (await limiter.admit_message("u", LIMITS)).allowed
    assert not (await limiter.admit_message("u", LIMITS)).allowed


async def test_a_turn_slot_is_freed_once_with_its_tokens_or_on_leaving() -> None:
    limiter = MemoryLimiter()
    one = RateLimits(messages_per_minute=10, tokens_per_day=100, concurrent_generations=1)
    async with limiter.turn("u", one) as slot:
        assert slot.allowed
        async with limiter.turn("u", one) as refused:
            assert not refused.allowed
            assert refused.decision.limit is Limit.CONCURRENT_GENERATIONS
        await slot.end(7)
        await slot.end(5)  # once per turn: not counted again
    assert await limiter.tokens_today("u") == 7

    async def failing_turn() -> None:
        async with limiter.turn("u", one) as slot:
            assert slot.allowed
            raise RuntimeError("the turn failed")

    with pytest.raises(RuntimeError):
        await failing_turn()
    async with limiter.turn("u", one) as slot:  # the failed turn's slot was given back
        assert slot.allowed
    assert await limiter.tokens_today("u") == 7


async def test_a_count_that_could_not_be_seeded_is_seeded_at_the_next_turn() -> None:
    # The durable usage is down for the first turn, then answers (it has recorded that
    # turn's 30 tokens, as PostgreSQL does).
    answers: list[int | None] = [None, 90]

    async def durable(_user: str) -> int:
        answer = answers.pop(0)
        if answer is None:
            raise ConnectionError("database down")
        return answer

    limiter = MemoryLimiter(durable=durable)
    await limiter.add_tokens("u", 30)  # not counted from zero: left missing
    assert (await limiter.admit_generation("u", LIMITS)).allowed
    assert await limiter.tokens_today("u") == 90
