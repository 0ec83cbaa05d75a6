"""Which replica is generating a session's reply: a lease that lapses when its replica dies.

A replica that takes a message for a session takes the session's generation lease and
renews it while the reply runs (``HeldLease``); at the reply's end it deletes the lease,
if the lease is still its own. A client that reconnects elsewhere follows the reply only
while the lease is live: a replica that died mid-reply stops renewing, and within
``LeasePolicy.ttl_seconds`` nobody follows it any more.

With Redis the lease is one key per session, its value the holder; without Redis, one
process keeps the same in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dexorder.gateway.stores.sessions import SessionStoreUnavailable
from dexorder.gateway.supervision import supervise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeasePolicy:
    """A generation lease lives ``ttl_seconds`` unless renewed; its holder renews it every
    third of that, so two renewals may fail in a row before it lapses."""

    ttl_seconds: float = 10.0
    prefix: str = "dexorder:session:"

    def key(self, session_id: str) -> str:
        """The session's lease key (beside the session's own keys)."""
        return f"{self.prefix}{session_id}:generating"

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_seconds * 1000))

    @property
    def renew_seconds(self) -> float:
        return self.ttl_seconds / 3


class GenerationLeases(Protocol):
    """The sessions' generation leases; every method raises ``SessionStoreUnavailable``
    when the store cannot be reached."""

    @property
    def policy(self) -> LeasePolicy: ...

    async def take(self, session_id: str, holder: str) -> None:
        """Hold the lease for ``holder``, whoever held it (a replica taking a message is
        the one generating from now on)."""
        ...

    async def renew(self, session_id: str, holder: str) -> bool:
        """Extend ``holder``'s lease, taking it again if it lapsed (a slow store, a
        wiped one); False if another holder has it."""
        ...

    async def release(self, session_id: str, holder: str) -> None:
        """Delete the lease if ``holder`` still has it."""
        ...

    async def holder(self, session_id: str) -> str | None:
        """Who holds a live lease on the session, if anyone."""
        ...


class MemoryGenerationLeases:
    """One process's leases, expiring on read."""

    def __init__(self, policy: LeasePolicy) -> None:
        self._policy = policy
        self._held: dict[str, tuple[str, float]] = {}

    @property
    def policy(self) -> LeasePolicy:
        return self._policy

    def _live(self, session_id: str) -> str | None:
        held = self._held.get(session_id)
        if held is None:
            return None
        if held[1] <= time.monotonic():
            del self._held[session_id]
            return None
        return held[0]

    async def take(self, session_id: str, holder: str) -> None:
        self._held[session_id] = (holder, time.monotonic() + self._policy.ttl_seconds)

    async def renew(self, session_id: str, holder: str) -> bool:
        if self._live(session_id) not in (None, holder):
            return False
        await self.take(session_id, holder)
        return True

    async def release(self, session_id: str, holder: str) -> None:
        if self._live(session_id) == holder:
            del self._held[session_id]

    async def holder(self, session_id: str) -> str | None:
        return self._live(session_id)


# KEYS[1] the lease; ARGV: holder, ttl ms. Renews the holder's lease, or takes a lapsed one.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] the lease; ARGV: holder. Compare and delete: another replica's lease is kept.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisGenerationLeases:
    """Leases shared by every replica: Redis expires them."""

    def __init__(self, redis: Redis, policy: LeasePolicy) -> None:
        self._redis = redis
        self._policy = policy
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def policy(self) -> LeasePolicy:
        return self._policy

    async def take(self, session_id: str, holder: str) -> None:
        try:
            await self._redis.set(self._policy.key(session_id), holder, px=self._policy.ttl_ms)
        except RedisError as error:
            raise _unavailable(error) from error

    async def renew(self, session_id: str, holder: str) -> bool:
        try:
            renewed = await self._renew(
                keys=[self._policy.key(session_id)], args=[holder, self._policy.ttl_ms]
            )
        except RedisError as error:
            raise _unavailable(error) from error
        return bool(int(renewed))

    async def release(self, session_id: str, holder: str) -> None:
        try:
            await self._release(keys=[self._policy.key(session_id)], args=[holder])
        except RedisError as error:
            raise _unavailable(error) from error

    async def holder(self, session_id: str) -> str | None:
        try:
            value = await self._redis.get(self._policy.key(session_id))
        except RedisError as error:
            raise _unavailable(error) from error
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(error: RedisError) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(f"the session store is unreachable: {error}")


class HeldLease:
    """One session's lease as this replica holds it: ``hold`` takes it and renews it in a
    supervised task until ``let_go``, which stops the task and deletes the lease.

    A store that fails is logged and tried again at the next renewal: the reply goes on,
    and a follower elsewhere may see it as interrupted meanwhile."""

    def __init__(self, leases: GenerationLeases, session_id: str, holder: str) -> None:
        self._leases = leases
        self.session_id = session_id
        self.holder = holder
        self._renewer: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._renewer is not None

    async def hold(self) -> None:
        if self._renewer is not None and not self._renewer.done():
            return
        self._renewer = supervise(self._renew(), name=f"generation-lease:{self.session_id}")
        try:
            await self._leases.take(self.session_id, self.holder)
        except SessionStoreUnavailable as error:
            logger.warning("session %s: generation lease not taken: %s", self.session_id, error)

    async def let_go(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        try:
            await self._leases.release(self.session_id, self.holder)
        except SessionStoreUnavailable as error:
            # It lapses by itself within the lease's TTL.
            logger.warning("session %s: generation lease kept: %s", self.session_id, error)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._leases.policy.renew_seconds)
            try:
                if not await self._leases.renew(self.session_id, self.holder):
                    logger.warning(
                        "session %s: generation lease taken by another replica", self.session_id
                    )
                    return
            except SessionStoreUnavailable as error:
                logger.warning(
                    "session %s: generation lease not renewed: %s", self.session_id, error
                )


__all__ = [
    "GenerationLeases",
    "HeldLease",
    "LeasePolicy",
    "MemoryGenerationLeases",
    "RedisGenerationLeases",
]
