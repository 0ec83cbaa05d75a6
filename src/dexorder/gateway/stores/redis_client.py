"""The gateway's one Redis client: bounded waits, a pool sized for its blocking readers,
and a circuit breaker.

- Every connect and every read has a timeout (``redis_connect_timeout_seconds``,
  ``redis_socket_timeout_seconds``), and a timeout is not retried: a Redis that stops
  answering (a partition, a paused server) fails a request in that time instead of
  freezing it. The socket timeout must outlast the
  longest blocking read the gateway makes (a resume follower's or the Telegram inbox's
  ``BLOCK`` of about a second).
- The pool holds ``redis_max_connections``: every socket following a reply on another
  replica holds one during its blocking read, besides the limiter, the sessions and the
  inbox. A request that finds the pool empty waits for a connection (up to the socket
  timeout) instead of failing at once.
- After ``BreakerPolicy.failures`` failures in a row (connects, or requests that timed
  out or lost their connection; any reply resets the count), new connections are refused
  at once for ``cooldown_seconds`` (``RedisCircuitOpen``, a ``ConnectionError``,
  so every caller's Redis error handling applies): a Redis that is down costs each
  request nothing, not a connect timeout each. Then attempts are let through again; one
  more failure opens it again at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Connection, Redis, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)


class RedisCircuitOpen(RedisConnectionError):
    """Redis failed too often just now: no connection is tried until the cooldown ends."""


@dataclass(frozen=True)
class BreakerPolicy:
    """``failures`` connection failures in a row open the circuit for ``cooldown_seconds``."""

    failures: int = 3
    # Short: a Redis that is back is used again within a second; a refused connect is
    # cheap anyway, and a black-holed one is tried once a second, not per request.
    cooldown_seconds: float = 1.0


class CircuitBreaker:
    """Counts consecutive connection failures; ``clock`` is monotonic seconds, passed in."""

    def __init__(
        self, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return self._clock() < self._open_until

    def allow(self) -> bool:
        """Whether a connection may be tried now (closed, or the cooldown is over)."""
        return not self.open

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self.policy.failures:
            if not self.open:
                logger.warning(
                    "Redis failed %d times in a row: no connection is tried for %.0f s",
                    self._failures,
                    self.policy.cooldown_seconds,
                )
            self._open_until = self._clock() + self.policy.cooldown_seconds

    def succeeded(self) -> None:
        if self._failures >= self.policy.failures:
            logger.warning("Redis answers again")
        self._failures = 0
        self._open_until = 0.0


class _Guarded:
    """Mixed into a connection class: a connect asks the breaker first, and each reply
    (or its absence: a timeout, a broken connection) tells the breaker how Redis is."""

    breaker: CircuitBreaker

    async def connect(self) -> None:
        if getattr(self, "is_connected", False):
            return
        if not self.breaker.allow():
            raise RedisCircuitOpen("Redis is unavailable (circuit open after repeated failures)")
        try:
            await super().connect()  # type: ignore[misc]
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self.breaker.failed()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        return response


def _guarded(base: type[Connection], breaker: CircuitBreaker) -> type[Connection]:
    return type(f"Guarded{base.__name__}", (_Guarded, base), {"breaker": breaker})


def open_redis(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    breaker: CircuitBreaker | None = None,
) -> Redis:
    """A client for ``url`` with the bounds above; the caller closes it (``aclose``)."""
    breaker = breaker or CircuitBreaker()
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "timeout": socket_timeout,  # waiting for a free connection of the pool
        "health_check_interval": 30,
        # One quick retry for a connection that broke (a pooled one Redis dropped); none
        # for a timeout, which would only multiply the wait for a Redis that is not there.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (RedisConnectionError,)),
    }
    pool = BlockingConnectionPool.from_url(url, **options)
    base = SSLConnection if issubclass(pool.connection_class, SSLConnection) else Connection
    pool.connection_class = _guarded(base, breaker)
    return Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


__all__ = ["BreakerPolicy", "CircuitBreaker", "RedisCircuitOpen", "open_redis"]
