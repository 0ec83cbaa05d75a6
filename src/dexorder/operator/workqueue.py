"""A coalescing work queue: each key is processed by one worker at a time.

Events for an agent only mark it dirty; a worker then does the work once for all the
marks that arrived meanwhile (controller-runtime's model). Two events never write the
same agent's status concurrently, so a slow pass cannot overwrite a newer one, and a
burst of child events costs one pass instead of one each. A failed pass is retried with
a growing delay.

Urgent marks (a new spec to apply, drift to undo) are served before status-only ones,
and those before resync marks (after a restart, agents whose children are as applied).
In a burst of new agents that puts every agent's children on the API server first, so
the controllers downstream (Deployment, ReplicaSet, scheduler) start on all of them as
early as possible; a status pass that waits meanwhile often finds the agent Ready already
and writes once instead of twice (Provisioning, then Ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from enum import IntEnum
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

Process = Callable[[K, bool], Awaitable[None]]
RetryDelay = Callable[[BaseException, int], float]


def backoff(
    error: BaseException, attempt: int, *, jitter: Callable[[], float] = random.random
) -> float:
    """0.5 s, 1 s, 2 s, ... up to 30 s, each between half and all of that ("equal jitter"):
    agents that failed together (an API server restart) do not all retry together."""
    ceiling = min(0.5 * 2 ** max(attempt - 1, 0), 30.0)
    return float(ceiling * (0.5 + jitter() / 2))


class Lane(IntEnum):
    """Where a key waits; a lower lane is served only when every higher one is empty."""

    URGENT = 0  # a spec to apply, drift to undo
    NORMAL = 1  # a status to derive again
    RESYNC = 2  # a check that is probably a no-op: the resumption after a restart


class WorkQueue(Generic[K]):
    """Marks keys dirty (``apply`` or status only) and runs ``process(key, apply)`` on them."""

    def __init__(
        self, process: Process[K], *, workers: int, retry_delay: RetryDelay = backoff
    ) -> None:
        if workers < 1:
            raise ValueError(f"a work queue needs at least one worker, not {workers}")
        self._process = process
        self._workers = workers
        self._retry_delay = retry_delay
        self._pending: dict[K, bool] = {}
        # A lane of keys per Lane; ``_waiting`` counts their entries. A key asked for in a
        # higher lane than the one it waits in is queued again there; whichever entry comes
        # second finds it no longer pending and is skipped.
        self._lanes: tuple[deque[K], ...] = tuple(deque() for _ in Lane)
        self._queued: dict[K, Lane] = {}  # the highest lane each waiting key is queued in
        self._wanted: dict[K, Lane] = {}  # the highest lane asked for, per pending key
        self._waiting = asyncio.Semaphore(0)
        self._active: set[K] = set()
        self._failures: dict[K, int] = {}
        # Per key: the scheduled retry, and what it will ask for (apply, urgent).
        self._retries: dict[K, tuple[asyncio.TimerHandle, bool, bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(
        self, key: K, *, apply: bool = False, urgent: bool = False, resync: bool = False
    ) -> None:
        """Mark ``key``; ``apply`` asks for its children to be applied, not only its status.

        ``urgent`` (implied by ``apply``) serves it before keys that need a status pass
        only; ``resync`` after every other key (a pass that is likely to find nothing to do).
        """
        lane = Lane.URGENT if urgent or apply else Lane.RESYNC if resync else Lane.NORMAL
        self._pending[key] = self._pending.get(key, False) or apply
        self._wanted[key] = min(lane, self._wanted.get(key, lane))
        if key in self._active:
            return  # its worker queues it again when the pass ends
        queued = self._queued.get(key)
        if queued is None or lane < queued:
            self._enqueue(key, lane)

    def _enqueue(self, key: K, lane: Lane) -> None:
        self._queued[key] = min(lane, self._queued.get(key, lane))
        self._lanes[lane].append(key)
        self._waiting.release()

    def _next(self) -> K:
        for lane in Lane:
            entries = self._lanes[lane]
            if entries:
                key = entries.popleft()
                if self._queued.get(key) == lane:
                    del self._queued[key]
                return key
        raise AssertionError("a worker woke with every lane empty")

    def forget(self, key: K) -> None:
        """Drop pending work and retries for ``key`` (its object is gone)."""
        self._pending.pop(key, None)
        self._wanted.pop(key, None)
        self._failures.pop(key, None)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry[0].cancel()

    @property
    def idle(self) -> bool:
        return not self._pending and not self._active

    @property
    def running(self) -> bool:
        """Started, and no worker has stopped (a worker only stops by a bug or a cancel)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def stop(self) -> None:
        """Stop the workers. Nothing is lost: a pass cut short and a retry not yet due are
        marked again, so a :meth:`start` later (this replica leads again) does them."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        retries, self._retries = self._retries, {}
        for key, (handle, apply, urgent) in retries.items():
            handle.cancel()
            self.add(key, apply=apply, urgent=urgent)

    async def _work(self) -> None:
        while True:
            await self._waiting.acquire()
            key = self._next()
            if key not in self._pending or key in self._active:
                # Forgotten while it waited, or a second entry of a key queued in two lanes.
                continue
            if key in self._queued:
                # Also waiting in a lower lane: that entry is now stale, skip it there.
                del self._queued[key]
            apply = self._pending.pop(key)
            lane = self._wanted.pop(key, Lane.NORMAL)
            self._active.add(key)
            try:
                await self._process(key, apply)
            except asyncio.CancelledError:
                self._active.discard(key)
                self.add(key, apply=apply, urgent=lane == Lane.URGENT)  # cut short: again
                raise
            except Exception as error:
                self._schedule_retry(key, apply, lane, error)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
            if key in self._pending:
                self._enqueue(key, self._wanted.get(key, Lane.NORMAL))

    def _schedule_retry(self, key: K, apply: bool, lane: Lane, error: Exception) -> None:
        attempt = self._failures.get(key, 0) + 1
        self._failures[key] = attempt
        delay = self._retry_delay(error, attempt)
        logger.warning("%s failed (attempt %d), retrying in %.1fs: %s", key, attempt, delay, error)
        previous = self._retries.pop(key, None)
        if previous is not None:
            previous[0].cancel()
        # A retried first apply stays first; a failed resync is retried as status work.
        urgent = lane == Lane.URGENT

        def retry() -> None:
            self._retries.pop(key, None)
            self.add(key, apply=apply, urgent=urgent)

        handle = asyncio.get_running_loop().call_later(delay, retry)
        self._retries[key] = (handle, apply, urgent)
