"""Telegram updates between the webhook and the workers: durable, shared, processed once.

With Redis, ``RedisInbox`` appends each update to a stream before the webhook answers
200, and workers in every replica read it through one consumer group:

- a worker renews its claim on the entry while it works (``XCLAIM ... JUSTID`` resets the
  idle time), so a long reply is not taken over by another replica;
- entries a crashed replica left pending are idle, and ``XAUTOCLAIM`` hands them to a
  live worker after ``claim_idle_seconds``;
- a key per ``update_id`` says who processes it (a lease of ``claim_idle_seconds``,
  renewed with the claim) and, once it is done, that it is done (for the dedupe TTL), so
  Telegram's redelivery of an update, or two entries of it, is processed once; a worker
  that takes over an entry takes the key only when it is free (``SET NX``), so a live
  owner whose renewal came late is never doubled, and a finish that fails is retried
  while the lease is still renewed;
- a handler that meets a transient failure raises ``TryLater``: the entry stays pending
  and is delivered again after ``claim_idle_seconds``, at most ``max_deliveries`` times;
  then ``give_up`` tells the user, and the entry is done;
- Redis may lose everything (a restart without persistence, a failover to an empty
  replica): the webhook's ``XADD`` recreates the stream but not the group, so after any
  Redis error the loop creates the group again (``BUSYGROUP`` means it was there), with a
  capped backoff and one warning per outage, and ``healthy`` (in ``/ready``) is false
  until a read succeeds again.

Without Redis, ``MemoryInbox`` queues in the process and still drops repeated ids; what
is queued dies with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dexorder.gateway.channels.telegram.order import ArrivalOrder, Place
from dexorder.gateway.pure.ratelimit import LEASE_SECONDS

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

Handler = Callable[[int, bytes], Awaitable[None]]
"""Processes one update (its id and JSON body); raises ``TryLater`` to have it again."""

OrderKey = Callable[[bytes], Hashable | None]
"""The key whose updates start in the order they were read (a chat), from an update's
body; None for one that needs no order. Must not raise."""


class TryLater(Exception):
    """Raised by a handler that met a transient failure (a database or Redis outage)
    before it answered: the update is delivered again later, up to the delivery cap."""


class InboxUnavailable(Exception):
    """The update could not be persisted; the webhook answers 503 and Telegram retries."""


class Inbox(Protocol):
    durable: bool

    async def put(self, update_id: int, body: bytes) -> None:
        """Keep the update; returns once it is persisted (or queued, in memory)."""

    async def mark_done(self, update_id: int) -> bool:
        """Record the update as processed, for one handled outside the inbox; False when
        it was seen already (a redelivery). Raises ``InboxUnavailable``."""

    async def run(
        self, handle: Handler, give_up: Handler | None = None, order_key: OrderKey | None = None
    ) -> None:
        """Process updates with ``handle`` until ``stop()`` (or a cancel); ``give_up`` is
        told of an update that still asked to be tried later after ``max_deliveries``.
        Updates with the same ``order_key`` start in the order they were read, each once
        the one before it was accepted (``order.accepted()``) or returned."""

    def stop(self) -> None:
        """Ask ``run`` to return; updates in progress are left for another worker."""

    async def healthy(self) -> bool:
        """For ``/ready``: updates are being read (the webhook's 200 means they will be)."""


@dataclass(frozen=True)
class InboxOptions:
    concurrency: int = 32
    # Longer than a generation slot's lease: by the time an update of a dead replica is
    # taken over, the slot that replica held has expired, so a free-tier user (one
    # concurrent generation) is not refused. Claims are renewed every third of this.
    claim_idle_seconds: float = LEASE_SECONDS + 5.0
    dedupe_ttl_seconds: float = 86_400.0
    stream_max_length: int = 100_000
    block_ms: int = 1000
    # After a Redis error the loop waits this long, doubling up to the cap, then tries
    # again (creating the consumer group anew, in case Redis lost it).
    retry_seconds: float = 0.1
    retry_cap_seconds: float = 5.0
    # While Redis stays down, one warning per this many seconds, not one per attempt.
    warn_every_seconds: float = 60.0
    # Deliveries of an update whose handler keeps raising TryLater before it is given up
    # (each comes claim_idle_seconds after the last).
    max_deliveries: int = 5


def consumer_name() -> str:
    """Unique per process: a restarted replica must not inherit a dead one's entries."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Outage:
    """Consecutive failures of one loop against Redis: the wait before the next attempt
    (doubling from ``retry_seconds`` to ``retry_cap_seconds``) and whether a warning is
    due (the first failure, then one per ``warn_every_seconds``). ``clock`` is monotonic
    seconds, passed in."""

    def __init__(self, options: InboxOptions, clock: Callable[[], float] = time.monotonic):
        self._options = options
        self._clock = clock
        self.failures = 0
        self._warned_at: float | None = None

    @property
    def ongoing(self) -> bool:
        return self.failures > 0

    def failed(self) -> tuple[float, bool]:
        """Count a failure; returns (seconds to wait, whether to warn)."""
        self.failures += 1
        wait = min(
            self._options.retry_seconds * 2 ** min(self.failures - 1, 30),
            self._options.retry_cap_seconds,
        )
        now = self._clock()
        warn = self._warned_at is None or now - self._warned_at >= self._options.warn_every_seconds
        if warn:
            self._warned_at = now
        return wait, warn

    def recovered(self) -> int:
        """Forget the outage; returns how many failures it had."""
        failures, self.failures, self._warned_at = self.failures, 0, None
        return failures


class _Workers:
    """Bounded concurrency with every task owned and cancelled on exit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def free(self) -> int:
        return max(self._limit - len(self._tasks), 0)

    async def wait_free(self) -> None:
        """Until a worker is free. An update read before that would wait here, held from
        the other replicas' free workers until it is reclaimed as abandoned: a ``/stop``
        would come only once the replies it is meant to stop are over."""
        await self._slots.acquire()
        self._slots.release()

    async def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            work.close()
            raise
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._slots.release()

        task.add_done_callback(done)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _run_handler(handle: Handler, update_id: int, body: bytes, place: Place) -> bool:
    """True when the update is done with: handled, or a poison update (logged) that must
    not be retried forever; False when the handler asked for it again (``TryLater``).
    The handler starts once ``place`` is reached, and may release it early."""
    try:
        await place.reached()
        place.bind()
        await handle(update_id, body)
    except asyncio.CancelledError:
        raise
    except TryLater as error:
        log.warning("Telegram update %d will be tried again: %s", update_id, error)
        return False
    except Exception:
        log.exception("processing Telegram update %d failed", update_id)
    return True


async def _give_up(give_up: Handler | None, update_id: int, body: bytes) -> None:
    log.error("Telegram update %d given up after repeated transient failures", update_id)
    if give_up is None:
        return
    try:
        await give_up(update_id, body)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("telling the user that Telegram update %d was given up failed", update_id)


class MemoryInbox:
    """One process, no Redis: an in-memory queue that still processes each id once."""

    durable = False

    def __init__(self, options: InboxOptions | None = None, *, remember: int = 100_000) -> None:
        self.options = options or InboxOptions()
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._remember = remember

    def _first_time(self, update_id: int) -> bool:
        now = time.monotonic()
        while self._seen and (
            len(self._seen) > self._remember
            or next(iter(self._seen.values())) < now - self.options.dedupe_ttl_seconds
        ):
            self._seen.popitem(last=False)
        if update_id in self._seen:
            return False
        self._seen[update_id] = now
        return True

    async def mark_done(self, update_id: int) -> bool:
        return self._first_time(update_id)

    async def put(self, update_id: int, body: bytes) -> None:
        if self._first_time(update_id):
            self._queue.put_nowait((update_id, body))
        else:
            log.info("Telegram update %d repeated; already taken", update_id)

    def stop(self) -> None:
        """Nothing to do: cancelling ``run`` stops it."""

    async def healthy(self) -> bool:
        return True

    async def run(
        self, handle: Handler, give_up: Handler | None = None, order_key: OrderKey | None = None
    ) -> None:
        workers = _Workers(self.options.concurrency)
        retries: set[asyncio.TimerHandle] = set()
        deliveries: dict[int, int] = {}
        order = ArrivalOrder()

        async def process(update_id: int, body: bytes, place: Place) -> None:
            try:
                deliveries[update_id] = deliveries.get(update_id, 0) + 1
                if deliveries[update_id] > self.options.max_deliveries:
                    await _give_up(give_up, update_id, body)
                elif not await _run_handler(handle, update_id, body, place):
                    retry = asyncio.get_running_loop().call_later(
                        self.options.claim_idle_seconds,
                        lambda: self._queue.put_nowait((update_id, body)),
                    )
                    retries.add(retry)
                    return
                deliveries.pop(update_id, None)
            finally:
                place.release()

        try:
            while True:
                update_id, body = await self._queue.get()
                # Taken here, in the order read, before any await of the update's own.
                place = order.take(order_key(body) if order_key is not None else None)
                await workers.spawn(process(update_id, body, place), f"telegram-update:{update_id}")
        finally:
            for retry in retries:
                retry.cancel()
            await workers.cancel_all()


_DONE = b"done"
# Extends or deletes the update's key only while it still names this worker.
_RENEW_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisInbox:
    """A Redis stream and consumer group shared by every replica."""

    durable = True

    def __init__(
        self,
        redis: Redis,
        options: InboxOptions | None = None,
        *,
        stream: str = "dexorder:telegram:updates",
        group: str = "dexorder-gateway",
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.options = options or InboxOptions()
        self.stream = stream
        self.group = group
        self.consumer = consumer or consumer_name()
        self._owner = f"processing:{self.consumer}".encode()
        self._in_flight: set[bytes] = set()
        self._stopping = asyncio.Event()
        # False until the group exists and a read succeeded, and again after any failure.
        self._reading = False

    async def healthy(self) -> bool:
        return self._reading

    def stop(self) -> None:
        # A flag, not only a cancel: a cancel that lands inside the Redis client's blocking
        # read can be absorbed by its retry logic, and the loop would read on forever.
        self._stopping.set()

    def _key(self, update_id: int) -> str:
        return f"{self.stream}:update:{update_id}"

    async def ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        await self.forget_departed_consumers()

    async def forget_departed_consumers(self) -> int:
        """Remove consumers of replicas long gone (nothing pending, silent for the dedupe
        TTL): each process has its own name, so they would pile up in the group."""
        departed = 0
        consumers: Any = await self.redis.xinfo_consumers(self.stream, self.group)
        for consumer in consumers:
            name, pending, idle_ms = consumer["name"], consumer["pending"], consumer["idle"]
            if pending == 0 and idle_ms > self.options.dedupe_ttl_seconds * 1000:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)
                departed += 1
        return departed

    async def mark_done(self, update_id: int) -> bool:
        from redis.exceptions import RedisError

        try:
            done = await self.redis.set(
                self._key(update_id), _DONE, nx=True, ex=int(self.options.dedupe_ttl_seconds)
            )
        except RedisError as error:
            raise InboxUnavailable(f"the update queue is unavailable: {error}") from error
        return bool(done)

    async def put(self, update_id: int, body: bytes) -> None:
        from redis.exceptions import RedisError

        try:
            await self.redis.xadd(
                self.stream,
                {"update_id": str(update_id), "body": body},
                maxlen=self.options.stream_max_length,
                approximate=True,
            )
        except RedisError as error:
            raise InboxUnavailable(f"the update queue is unavailable: {error}") from error

    async def run(
        self, handle: Handler, give_up: Handler | None = None, order_key: OrderKey | None = None
    ) -> None:
        from redis.exceptions import RedisError

        workers = _Workers(self.options.concurrency)
        order = ArrivalOrder()
        outage = Outage(self.options)
        claim_every = max(self.options.claim_idle_seconds / 2, 0.1)
        next_claim = 0.0
        group_known = False
        try:
            while not self._stopping.is_set():
                try:
                    if not group_known:
                        await self.ensure_group()
                        group_known = True
                    if time.monotonic() >= next_claim:
                        next_claim = time.monotonic() + claim_every
                        # Taken over: their order was lost with the worker that had them.
                        for entry_id, fields in await self._claim_abandoned(workers.free):
                            await workers.spawn(
                                self._process(
                                    handle, give_up, entry_id, fields, order.take(None), True
                                ),
                                f"telegram-entry:{entry_id!r}",
                            )
                    await workers.wait_free()
                    entries = await self._read_new(workers.free)
                    self._reading = True
                    if outage.ongoing:
                        log.warning(
                            "reading Telegram updates from Redis again, after %d failed attempts",
                            outage.recovered(),
                        )
                    for entry_id, fields in entries:
                        # Taken here, in the order read, before any await of the entry's own.
                        body = fields.get(b"body")
                        key = order_key(body) if order_key is not None and body else None
                        await workers.spawn(
                            self._process(
                                handle, give_up, entry_id, fields, order.take(key), False
                            ),
                            f"telegram-entry:{entry_id!r}",
                        )
                except RedisError as error:
                    if self._stopping.is_set():
                        break
                    # The group may be gone with Redis's data (NOGROUP): create it again
                    # before the next read; BUSYGROUP then says it was still there.
                    group_known, self._reading = False, False
                    wait, warn = outage.failed()
                    if warn:
                        log.warning(
                            "reading Telegram updates from Redis failed (attempt %d; retrying "
                            "with backoff, next warning in %.0f s if it persists): %s",
                            outage.failures,
                            self.options.warn_every_seconds,
                            error,
                        )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._stopping.wait()
        finally:
            self._reading = False
            await workers.cancel_all()

    async def _read_new(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        block = self.options.block_ms
        if self.options.claim_idle_seconds < block / 1000:
            block = max(int(self.options.claim_idle_seconds * 500), 10)
        answer: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block
        )
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _stream, items in answer or []:
            entries.extend(items)
        return entries

    async def _claim_abandoned(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        if count <= 0:
            return []
        answer: Any = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self.options.claim_idle_seconds * 1000),
            start_id="0-0",
            count=count,
        )
        # An entry of ours whose renewal was late (a loop blocked for a while) comes back
        # too: it is still being processed here, so it is not started again.
        claimed = [
            (entry_id, fields)
            for entry_id, fields in answer[1]
            if fields and entry_id not in self._in_flight
        ]
        if claimed:
            log.info("took over %d Telegram updates another worker left pending", len(claimed))
        return claimed

    @property
    def _lease_ms(self) -> int:
        return max(int(self.options.claim_idle_seconds * 1000), 1)

    async def _begin(self, entry_id: bytes, update_id: int, reclaimed: bool) -> bool:
        """True when this worker should process the update now.

        The update's key is taken only when free: a live owner keeps renewing it, and a
        dead one's lease runs out by the time its entry is idle long enough to reclaim."""
        if await self.redis.set(self._key(update_id), self._owner, nx=True, px=self._lease_ms):
            return True
        state = await self.redis.get(self._key(update_id))
        if state == _DONE or not reclaimed:
            # Done, or a second entry of an update another worker holds: drop this entry.
            log.info("Telegram update %d is processed elsewhere or done; skipped", update_id)
            await self._finish(entry_id, None)
        else:
            # Its owner lives but renewed late: the entry is left to it (it acks it).
            log.info("Telegram update %d is still being processed by its owner", update_id)
        return False

    async def _renew(self, entry_id: bytes, update_id: int) -> None:
        """Keep the entry's idle time low and the update's lease alive while it is
        processed, so no one takes it over."""
        while True:
            await asyncio.sleep(self.options.claim_idle_seconds / 3)
            with contextlib.suppress(Exception):
                await self.redis.xclaim(
                    self.stream, self.group, self.consumer, 0, [entry_id], justid=True
                )
                await self.redis.eval(
                    _RENEW_IF_OWNER, 1, self._key(update_id), self._owner, self._lease_ms
                )

    async def _deliveries(self, entry_id: bytes) -> int:
        pending: Any = await self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 1

    async def _finish(self, entry_id: bytes, update_id: int | None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            if update_id is not None:
                pipe.set(self._key(update_id), _DONE, ex=int(self.options.dedupe_ttl_seconds))
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _finish_surely(self, entry_id: bytes, update_id: int) -> None:
        """``_finish`` for an update that was answered, retried through a Redis outage:
        the caller keeps renewing its lease meanwhile, so no one answers it again."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        outage = Outage(self.options)
        while True:
            try:
                await self._finish(entry_id, update_id)
            except (RedisConnectionError, RedisTimeoutError) as error:
                wait, warn = outage.failed()
                if warn:
                    log.warning(
                        "marking Telegram update %d done failed; retrying: %s", update_id, error
                    )
                await asyncio.sleep(wait)
            else:
                return

    async def _process(
        self,
        handle: Handler,
        give_up: Handler | None,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        place: Place,
        reclaimed: bool,
    ) -> None:
        from redis.exceptions import RedisError

        try:
            update_id = int(fields[b"update_id"])
            body = fields[b"body"]
        except (KeyError, ValueError):
            place.release()
            log.warning("dropping a malformed Telegram stream entry %r", entry_id)
            with contextlib.suppress(RedisError):
                await self._finish(entry_id, None)
            return
        self._in_flight.add(entry_id)
        renewal: asyncio.Task[None] | None = None
        try:
            if not await self._begin(entry_id, update_id, reclaimed):
                return
            renewal = asyncio.create_task(
                self._renew(entry_id, update_id), name=f"renew:{entry_id!r}"
            )
            if reclaimed and await self._deliveries(entry_id) > self.options.max_deliveries:
                await _give_up(give_up, update_id, body)
            elif not await _run_handler(handle, update_id, body, place):
                # Pending still: delivered again once idle for claim_idle_seconds.
                await self.redis.eval(_RELEASE_IF_OWNER, 1, self._key(update_id), self._owner)
                return
            # Cancelled before this (shutdown): no ack, so another replica finishes it.
            await self._finish_surely(entry_id, update_id)
        except RedisError as error:
            # The entry stays pending and is taken over once idle: nothing is lost.
            log.warning("Telegram update entry %r left pending: %s", entry_id, error)
        finally:
            place.release()
            self._in_flight.discard(entry_id)
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal


__all__ = [
    "Handler",
    "Inbox",
    "InboxOptions",
    "InboxUnavailable",
    "MemoryInbox",
    "OrderKey",
    "Outage",
    "RedisInbox",
    "TryLater",
    "consumer_name",
]
