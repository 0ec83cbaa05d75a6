"""Per-user limits: messages per minute, tokens per day, concurrent generations.

With Redis, every check is one atomic Lua script that reads Redis's own clock, so a
limit holds across any number of gateway replicas (per-pod limits multiply with the
replica count, as LiteLLM's users found). Without Redis, one process keeps them in memory.

A generation holds a lease: a slot with an expiry, renewed by the process that holds it
while the generation runs. When a replica dies mid-generation its slots expire within
``lease_seconds`` instead of blocking the user for good.

Today's token count is re-seeded from the durable usage (``DurableTokens``, PostgreSQL)
whenever it is missing, not only when a conversation starts: a Redis that lost its data
(a restart without persistence, a failover to an empty replica) mid-conversation would
otherwise restart every active user's daily budget from zero. The scripts say when the
count is missing instead of treating it as zero; the limiter then seeds it (``SET NX``,
so the first replica's seed wins) and asks again. A seed that cannot be read in
``seed_timeout`` is skipped for this turn (logged at most once a minute), and the count
stays missing so the next turn tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dexorder.core.tiers import RateLimits
from dexorder.gateway.pure.ratelimit import (
    DAY,
    LEASE_SECONDS,
    MINUTE,
    Decision,
    day_bucket,
    refuse_concurrency,
    refuse_messages,
    refuse_tokens,
    sliding_window,
)

logger = logging.getLogger(__name__)


class LimiterUnavailable(Exception):
    """The limit store cannot be reached; the message is refused, not let through."""


DurableTokens = Callable[[str], Awaitable[int]]
"""The user's tokens today (UTC) as the durable usage store has them."""

SEED_TIMEOUT_SECONDS = 2.0
_SEED_WARN_EVERY = 60.0


class _Seeder:
    """Reads a user's durable tokens for today, bounded in time, warning at most once a
    minute when it cannot (a database outage would otherwise warn once per turn)."""

    def __init__(self, durable: DurableTokens | None, timeout: float) -> None:
        self._durable = durable
        self._timeout = timeout
        self._warned_at = -_SEED_WARN_EVERY
        self._skipped = 0

    @property
    def enabled(self) -> bool:
        """Whether a missing count can be seeded; without a store it starts at zero."""
        return self._durable is not None

    async def read(self, user_id: str) -> int | None:
        if self._durable is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                return await self._durable(user_id)
        except Exception as error:  # a best-effort read: any failure only skips the seed
            self._skipped += 1
            now = time.monotonic()
            if now - self._warned_at >= _SEED_WARN_EVERY:
                self._warned_at = now
                logger.warning(
                    "today's token count is missing and could not be seeded from the usage "
                    "store (%d skipped since the last warning): %r",
                    self._skipped,
                    error,
                )
                self._skipped = 0
            return None


class Limiter(Protocol):
    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision:
        """Count one message against the minute's window, or refuse it."""

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision:
        """Take a generation slot (``Decision.lease``) if today's tokens and the slots allow."""

    async def release_generation(self, user_id: str, lease: str | None = None) -> None:
        """Give a slot back; without ``lease``, one this process holds for the user."""

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        """Count tokens a turn used against today's budget."""

    async def admit_turn(self, user_id: str, limits: RateLimits) -> Decision:
        """``admit_message`` and ``admit_generation`` in one atomic step (one round trip).

        The message is counted only when the generation is admitted too, so a user
        refused for concurrency does not also spend their messages on retries."""

    async def end_generation(self, user_id: str, lease: str | None, tokens: int) -> None:
        """``release_generation`` and ``add_tokens`` in one step."""

    async def tokens_today(self, user_id: str) -> int:
        """Tokens counted today (UTC) for the user."""

    async def seed_tokens(self, user_id: str, tokens: int) -> bool:
        """Start today's count at ``tokens`` (from the durable daily usage) unless it has
        one already; True when it was seeded. A limiter that lost its state (a restart
        without Redis, a flushed Redis) thus keeps the day's budget."""

    async def close(self) -> None:
        """Stop renewing leases; those still held expire by themselves."""

    def turn(self, user_id: str, limits: RateLimits) -> TurnSlot:
        """One message's admission: ``async with limiter.turn(user, limits) as slot``."""


class TurnSlot:
    """One message's admission and generation slot, held for the ``async with`` block.

    Entering counts the message and takes a slot in one step (``admit_turn``); it raises
    ``LimiterUnavailable``, and a refusal holds nothing (``allowed`` is False, ``decision``
    says why). ``end`` frees the slot and counts the turn's tokens, once; leaving the block
    frees a slot still held, counting no tokens. Ending never fails: a slot not given back
    expires by itself, and tokens not counted are logged."""

    def __init__(self, limiter: Limiter, user_id: str, limits: RateLimits) -> None:
        self._limiter = limiter
        self._user_id = user_id
        self._limits = limits
        self.decision = Decision(allowed=False)
        self._held = False

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    async def __aenter__(self) -> TurnSlot:
        self.decision = await self._limiter.admit_turn(self._user_id, self._limits)
        self._held = self.decision.allowed
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.end(0)

    async def end(self, tokens: int) -> None:
        """Free the slot and count ``tokens`` against today's budget (once per turn)."""
        if not self._held:
            return
        self._held = False
        try:
            await self._limiter.end_generation(self._user_id, self.decision.lease, tokens)
        except LimiterUnavailable as error:
            # The slot expires by itself; the tokens are missing from today's budget.
            logger.warning("tokens of %s not counted: %s", self._user_id, error)


class _HeldLeases:
    """The leases this process holds, by lease id, and one user's ids to release."""

    def __init__(self) -> None:
        self.by_lease: dict[str, str] = {}
        self.count_by_user: Counter[str] = Counter()

    def add(self, user_id: str, lease: str) -> None:
        if lease not in self.by_lease:
            self.count_by_user[user_id] += 1
        self.by_lease[lease] = user_id

    def take(self, user_id: str, lease: str | None) -> str | None:
        """Forget ``lease`` (or any lease of the user) and return it; None if none is held."""
        if lease is None:
            lease = next((held for held, user in self.by_lease.items() if user == user_id), None)
        if lease is None or self.by_lease.get(lease) != user_id:
            return None
        del self.by_lease[lease]
        self.count_by_user[user_id] -= 1
        if not self.count_by_user[user_id]:
            del self.count_by_user[user_id]
        return lease

    def by_user(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = defaultdict(list)
        for lease, user in self.by_lease.items():
            users[user].append(lease)
        return users


class MemoryLimiter:
    """The same limits in one process, for running without Redis."""

    def __init__(
        self, *, durable: DurableTokens | None = None, seed_timeout: float = SEED_TIMEOUT_SECONDS
    ) -> None:
        self._seeder = _Seeder(durable, seed_timeout)
        # Each user's message times in the last minute, oldest first: a check drops the
        # expired ones from the front, not rescans (and sorts) a minute of messages.
        self._messages: dict[str, deque[float]] = defaultdict(deque)
        self._tokens: dict[tuple[str, int], int] = defaultdict(int)
        self._held = _HeldLeases()

    def _window(self, user_id: str, now: float) -> deque[float]:
        window = self._messages[user_id]
        while window and window[0] <= now - MINUTE:
            window.popleft()
        return window

    @staticmethod
    def _fits(window: deque[float], now: float, limit: int) -> Decision:
        if len(window) < limit:
            return Decision(True)
        return sliding_window(list(window), now, limit)  # refused: when to come back

    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision:
        now = time.time()
        window = self._window(user_id, now)
        decision = self._fits(window, now, limits.messages_per_minute)
        if decision.allowed:
            window.append(now)
        return decision

    async def _seed_if_missing(self, user_id: str) -> bool:
        """Whether today's count is there now (seeded from the durable usage if it was not)."""
        key = (user_id, day_bucket(time.time()))
        if key in self._tokens or not self._seeder.enabled:
            return True
        seed = await self._seeder.read(user_id)
        return seed is not None and (await self.seed_tokens(user_id, seed) or key in self._tokens)

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision:
        await self._seed_if_missing(user_id)
        now = time.time()
        if self._tokens.get((user_id, day_bucket(now)), 0) >= limits.tokens_per_day:
            return refuse_tokens(limits.tokens_per_day, now)
        if self._held.count_by_user[user_id] >= limits.concurrent_generations:
            return refuse_concurrency(limits.concurrent_generations)
        lease = uuid.uuid4().hex
        self._held.add(user_id, lease)
        return Decision(True, lease=lease)

    async def release_generation(self, user_id: str, lease: str | None = None) -> None:
        self._held.take(user_id, lease)

    async def admit_turn(self, user_id: str, limits: RateLimits) -> Decision:
        now = time.time()
        window = self._window(user_id, now)
        decision = self._fits(window, now, limits.messages_per_minute)
        if not decision.allowed:
            return decision
        generation = await self.admit_generation(user_id, limits)
        if generation.allowed:
            window.append(now)
        return generation

    async def end_generation(self, user_id: str, lease: str | None, tokens: int) -> None:
        await self.add_tokens(user_id, tokens)
        await self.release_generation(user_id, lease)

    def turn(self, user_id: str, limits: RateLimits) -> TurnSlot:
        return TurnSlot(self, user_id, limits)

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must not be negative: {tokens}")
        if await self._seed_if_missing(user_id):
            self._tokens[(user_id, day_bucket(time.time()))] += tokens
        # else: left missing, so the next turn seeds it again; the durable usage, which
        # records these tokens too, is what it will be seeded from.

    async def tokens_today(self, user_id: str) -> int:
        return self._tokens.get((user_id, day_bucket(time.time())), 0)

    async def seed_tokens(self, user_id: str, tokens: int) -> bool:
        key = (user_id, day_bucket(time.time()))
        if key in self._tokens:
            return False
        self._tokens[key] = tokens
        return True

    async def close(self) -> None:
        return None


# KEYS[1] the user's message window (zset of ms timestamps); ARGV: window ms, limit, member.
# Returns {allowed, retry_after_ms}.
_MESSAGE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {0, math.max(0, tonumber(oldest[2]) + window - now)}
"""

# KEYS[1] tokens today, KEYS[2] leases (zset: lease id -> expiry ms);
# ARGV: token limit, concurrency limit, lease ms, lease id, '1' to refuse a missing count.
# Returns {allowed, why}: why 1 is the token budget, 2 the concurrency, 3 a missing count.
_GENERATION_SCRIPT = """
local count = redis.call('GET', KEYS[1])
if not count and ARGV[5] == '1' then return {0, 3} end
local used = tonumber(count or '0')
if used >= tonumber(ARGV[1]) then return {0, 1} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return {0, 2} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
-- Every lease lasts as long, so the newest expiry is the set's.
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return {1, 0}
"""

# KEYS[1] message window, KEYS[2] tokens today, KEYS[3] leases; ARGV: window ms, message
# limit, token limit, concurrency limit, lease ms, lease id (also the window's member), '1'
# to refuse a missing count. Returns {allowed, why, retry_after_ms}: why 0 the messages,
# 1 the tokens, 2 the concurrency, 3 a missing count (nothing counted: seed, then ask again).
_TURN_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  return {0, 0, math.max(0, tonumber(oldest[2]) + window - now)}
end
local count = redis.call('GET', KEYS[2])
if not count and ARGV[7] == '1' then return {0, 3, 0} end
local used = tonumber(count or '0')
if used >= tonumber(ARGV[3]) then return {0, 1, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return {0, 2, 0} end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[6])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]))
return {1, 0, 0}
"""

# KEYS[1] tokens today, KEYS[2] leases; ARGV: tokens, count ttl s, lease id or '', '1' to
# leave a missing count missing. Frees the lease; returns 1 when the tokens were counted,
# 0 when the count is missing (the caller seeds it, then adds them).
_ADD_TOKENS_SCRIPT = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] leases; ARGV: lease ms, lease ids. Extends the leases still held; returns how many.
_RENEW_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease_ms, ARGV[i])
end
if renewed > 0 then redis.call('PEXPIRE', KEYS[1], lease_ms) end
return renewed
"""


class RedisLimiter:
    """The same limits, held in Redis for every replica at once."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "dexorder:limits",
        lease_seconds: float = LEASE_SECONDS,
        durable: DurableTokens | None = None,
        seed_timeout: float = SEED_TIMEOUT_SECONDS,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive: {lease_seconds}")
        self._redis = redis
        self._seeder = _Seeder(durable, seed_timeout)
        self._add_tokens = redis.register_script(_ADD_TOKENS_SCRIPT)
        self._prefix = prefix
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._message = redis.register_script(_MESSAGE_SCRIPT)
        self._generation = redis.register_script(_GENERATION_SCRIPT)
        self._renew = redis.register_script(_RENEW_SCRIPT)
        self._turn = redis.register_script(_TURN_SCRIPT)
        self._held = _HeldLeases()
        self._renewer: asyncio.Task[None] | None = None
        # Set when the last lease is released, so the renewer ends at once.
        self._none_held = asyncio.Event()

    def _key(self, kind: str, user_id: str) -> str:
        # The braces make a user's keys one Redis Cluster hash slot, as a script needs.
        return f"{self._prefix}:{{{user_id}}}:{kind}"

    def _tokens_key(self, user_id: str) -> str:
        return self._key(f"tokens:{day_bucket(time.time())}", user_id)

    async def admit_message(self, user_id: str, limits: RateLimits) -> Decision:
        try:
            allowed, retry_ms = await self._message(
                keys=[self._key("messages", user_id)],
                args=[round(MINUTE * 1000), limits.messages_per_minute, uuid.uuid4().hex],
            )
        except RedisError as error:
            raise LimiterUnavailable(f"the rate limiter cannot reach Redis: {error}") from error
        if allowed:
            return Decision(True)
        return refuse_messages(limits.messages_per_minute, int(retry_ms) / 1000)

    async def _seed(self, user_id: str) -> bool:
        """Seed a missing count from the durable usage; False when it could not be read."""
        tokens = await self._seeder.read(user_id)
        if tokens is None:
            return False
        await self.seed_tokens(user_id, tokens)
        return True

    async def admit_generation(self, user_id: str, limits: RateLimits) -> Decision:
        lease = uuid.uuid4().hex
        allowed, why = await self._seeded_if_missing(
            user_id,
            lambda refuse_missing: self._generation(
                keys=[self._tokens_key(user_id), self._key("leases", user_id)],
                args=[
                    limits.tokens_per_day,
                    limits.concurrent_generations,
                    self._lease_ms,
                    lease,
                    int(refuse_missing),
                ],
            ),
        )
        if not allowed:
            if int(why) == 1:
                return refuse_tokens(limits.tokens_per_day, time.time())
            return refuse_concurrency(limits.concurrent_generations)
        self._held.add(user_id, lease)
        self._ensure_renewer()
        return Decision(True, lease=lease)

    async def _seeded_if_missing(self, user_id: str, ask: Callable[[bool], Awaitable[Any]]) -> Any:
        """An admission script's answer. A script told to refuse a missing count
        (``ask(True)``) answers ``why == 3`` when Redis lost today's tokens: the count is
        seeded from PostgreSQL and the script asked once more, counting whatever is there
        then (never a loop)."""
        refuse_missing = self._seeder.enabled
        while True:
            try:
                answer = await ask(refuse_missing)
            except RedisError as error:
                raise LimiterUnavailable(f"the rate limiter cannot reach Redis: {error}") from error
            if int(answer[1]) != 3 or not refuse_missing:
                return answer
            await self._seed(user_id)
            refuse_missing = False

    async def admit_turn(self, user_id: str, limits: RateLimits) -> Decision:
        lease = uuid.uuid4().hex
        allowed, why, retry_ms = await self._seeded_if_missing(
            user_id,
            lambda refuse_missing: self._turn(
                keys=[
                    self._key("messages", user_id),
                    self._tokens_key(user_id),
                    self._key("leases", user_id),
                ],
                args=[
                    round(MINUTE * 1000),
                    limits.messages_per_minute,
                    limits.tokens_per_day,
                    limits.concurrent_generations,
                    self._lease_ms,
                    lease,
                    int(refuse_missing),
                ],
            ),
        )
        if not allowed:
            if int(why) == 0:
                return refuse_messages(limits.messages_per_minute, int(retry_ms) / 1000)
            if int(why) == 1:
                return refuse_tokens(limits.tokens_per_day, time.time())
            return refuse_concurrency(limits.concurrent_generations)
        self._held.add(user_id, lease)
        self._ensure_renewer()
        return Decision(True, lease=lease)

    def _take_held(self, user_id: str, lease: str | None) -> str | None:
        taken = self._held.take(user_id, lease)
        if taken is not None and not self._held.by_lease:
            self._none_held.set()
        return taken

    async def release_generation(self, user_id: str, lease: str | None = None) -> None:
        taken = self._take_held(user_id, lease)
        if taken is None:
            return
        try:
            await self._redis.zrem(self._key("leases", user_id), taken)
        except RedisError as error:
            # Not fatal: the lease is no longer renewed, so it expires by itself.
            logger.warning("could not release a generation slot of %s: %s", user_id, error)

    async def end_generation(self, user_id: str, lease: str | None, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must not be negative: {tokens}")
        await self._count(user_id, tokens, self._take_held(user_id, lease))

    def turn(self, user_id: str, limits: RateLimits) -> TurnSlot:
        return TurnSlot(self, user_id, limits)

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must not be negative: {tokens}")
        await self._count(user_id, tokens, None)

    async def _count(self, user_id: str, tokens: int, lease: str | None) -> None:
        """Add ``tokens`` to today's count and free ``lease``. A missing count is seeded
        first: counting from zero would restart the day's budget. If the seed cannot be
        read, the count stays missing; these tokens reach the durable usage anyway, so
        the next seed has them."""
        keys = [self._tokens_key(user_id), self._key("leases", user_id)]
        try:
            args: list[str | int] = [tokens, int(DAY * 2), lease or "", int(self._seeder.enabled)]
            if int(await self._add_tokens(keys=keys, args=args)) == 0 and await self._seed(user_id):
                await self._add_tokens(keys=keys, args=[tokens, int(DAY * 2), "", 0])
        except RedisError as error:
            # The slot expires by itself; the tokens are lost to today's budget, so say so.
            raise LimiterUnavailable(f"the rate limiter cannot reach Redis: {error}") from error

    async def tokens_today(self, user_id: str) -> int:
        try:
            value = await self._redis.get(self._tokens_key(user_id))
        except RedisError as error:
            raise LimiterUnavailable(f"the rate limiter cannot reach Redis: {error}") from error
        return int(value or 0)

    async def seed_tokens(self, user_id: str, tokens: int) -> bool:
        try:
            seeded = await self._redis.set(
                self._tokens_key(user_id), tokens, nx=True, ex=int(DAY * 2)
            )
        except RedisError as error:
            raise LimiterUnavailable(f"the rate limiter cannot reach Redis: {error}") from error
        return bool(seeded)

    def _ensure_renewer(self) -> None:
        # The renewer runs only while leases are held, so nothing outlives the last release.
        self._none_held.clear()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_held(), name="limiter:leases")

    async def _renew_held(self) -> None:
        interval = self._lease_ms / 1000 / 3
        while self._held.by_lease:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._none_held.wait()
            if not self._held.by_lease:
                return
            for user_id, leases in self._held.by_user().items():
                try:
                    renewed = await self._renew(
                        keys=[self._key("leases", user_id)], args=[self._lease_ms, *leases]
                    )
                except RedisError as error:
                    logger.warning("could not renew generation slots of %s: %s", user_id, error)
                    continue
                if int(renewed) < len(leases):
                    # Renewed too late: another generation may have the slot now. The running
                    # one is not stopped, and its release is harmless.
                    logger.warning("a generation slot of %s expired before renewal", user_id)

    async def close(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
