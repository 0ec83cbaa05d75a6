"""Per-user limits: messages per minute, tokens per day, concurrent generations.

With Redis, every check is one atomic Lua script, so a limit holds across any number
of gateway replicas (per-pod limits multiply with the replica count, as LiteLLM's
users found). Without Redis, one process keeps them in memory.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from typing import Protocol

from redis.asyncio import Redis

from dexorder.core.ratelimit import (
    DAY,
    MINUTE,
    Decision,
    day_bucket,
    seconds_until_next_day,
    sliding_window,
)
from dexorder.core.tiers import RateLimits


class Limiter(Protocol):
    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision: ...

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision: ...

    async def release_generation(self, user_id: str) -> None: ...

    async def add_tokens(self, user_id: str, tokens: int) -> None: ...


class MemoryLimiter:
    def __init__(self) -> None:
        self._messages: dict[str, list[float]] = defaultdict(list)
        self._tokens: dict[tuple[str, int], int] = defaultdict(int)
        self._running: dict[str, int] = defaultdict(int)

    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision:
        now = time.time()
        window = [t for t in self._messages[user_id] if t > now - MINUTE]
        decision = sliding_window(window, now, limits.messages_per_minute)
        if decision.allowed:
            window.append(now)
        self._messages[user_id] = window
        return decision

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision:
        now = time.time()
        if self._tokens[(user_id, day_bucket(now))] >= limits.tokens_per_day:
            return Decision(
                False, seconds_until_next_day(now), f"{limits.tokens_per_day} tokens per day"
            )
        if self._running[user_id] >= limits.concurrent_generations:
            return Decision(False, 1.0, f"{limits.concurrent_generations} concurrent generations")
        self._running[user_id] += 1
        return Decision(True)

    async def release_generation(self, user_id: str) -> None:
        self._running[user_id] = max(0, self._running[user_id] - 1)

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        self._tokens[(user_id, day_bucket(time.time()))] += tokens


# KEYS[1] window zset; ARGV: now, window, limit, member. Returns {allowed, retry_after_ms}.
_MESSAGE_SCRIPT = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {0, math.ceil((tonumber(oldest[2]) + window - now) * 1000)}
"""

# KEYS[1] tokens today, KEYS[2] running count; ARGV: token limit, concurrency limit, ttl.
_GENERATION_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return {0, 1} end
local running = tonumber(redis.call('GET', KEYS[2]) or '0')
if running >= tonumber(ARGV[2]) then return {0, 2} end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return {1, 0}
"""

_RELEASE_SCRIPT = """
local running = tonumber(redis.call('GET', KEYS[1]) or '0')
if running > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


class RedisLimiter:
    """The same limits, held in Redis for every replica at once."""

    def __init__(
        self, redis: Redis, *, prefix: str = "dexorder:limits", generation_ttl: int = 600
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._generation_ttl = generation_ttl
        self._message = redis.register_script(_MESSAGE_SCRIPT)
        self._generation = redis.register_script(_GENERATION_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    def _key(self, kind: str, user_id: str) -> str:
        return f"{self._prefix}:{kind}:{user_id}"

    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision:
        allowed, retry_ms = await self._message(
            keys=[self._key("messages", user_id)],
            args=[time.time(), MINUTE, limits.messages_per_minute, uuid.uuid4().hex],
        )
        if allowed:
            return Decision(True)
        return Decision(
            False, int(retry_ms) / 1000, f"{limits.messages_per_minute} messages per minute"
        )

    def _tokens_key(self, user_id: str) -> str:
        return self._key(f"tokens:{day_bucket(time.time())}", user_id)

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision:
        allowed, why = await self._generation(
            keys=[self._tokens_key(user_id), self._key("running", user_id)],
            args=[limits.tokens_per_day, limits.concurrent_generations, self._generation_ttl],
        )
        if allowed:
            return Decision(True)
        if int(why) == 1:
            return Decision(
                False,
                seconds_until_next_day(time.time()),
                f"{limits.tokens_per_day} tokens per day",
            )
        return Decision(False, 1.0, f"{limits.concurrent_generations} concurrent generations")

    async def release_generation(self, user_id: str) -> None:
        await self._release(keys=[self._key("running", user_id)])

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        key = self._tokens_key(user_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, int(DAY * 2))
            await pipe.execute()
