"""A coalescing work queue: each key is processed by one worker at a time.

Events for an agent only mark it dirty; a worker then does the work once for all the
marks that arrived meanwhile (controller-runtime's model). Two events never write the
same agent's status concurrently, so a slow pass cannot overwrite a newer one, and a
burst of child events costs one pass instead of one each. A failed pass is retried with
a growing delay.

Urgent marks (a new spec to apply, drift to undo) are served before status-only ones.
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
        # Two lanes of keys waiting for a worker; ``_waiting`` counts their entries. A key
        # made urgent while it waits in the normal lane is queued again in the urgent one;
        # whichever entry comes second finds it no longer pending and is skipped.
        self._urgent: deque[K] = deque()
        self._normal: deque[K] = deque()
        self._in_urgent: set[K] = set()
        self._marked_urgent: set[K] = set()  # pending keys that asked to be served first
        self._waiting = asyncio.Semaphore(0)
        self._active: set[K] = set()
        self._failures: dict[K, int] = {}
        self._retries: dict[K, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: K, *, apply: bool = False, urgent: bool = False) -> None:
        """Mark ``key``; ``apply`` asks for its children to be applied, not only its status.

        ``urgent`` (implied by ``apply``) serves it before keys that need a status pass only.
        """
        urgent = urgent or apply
        waiting = key in self._pending
        self._pending[key] = self._pending.get(key, False) or apply
        if urgent:
            self._marked_urgent.add(key)
        if key in self._active:
            return  # its worker queues it again when the pass ends
        if urgent and key not in self._in_urgent:
            self._enqueue(key, urgent=True)
        elif not waiting:
            self._enqueue(key, urgent=False)

    def _enqueue(self, key: K, *, urgent: bool) -> None:
        if urgent:
            self._in_urgent.add(key)
            self._urgent.append(key)
        else:
            self._normal.append(key)
        self._waiting.release()

    def _next(self) -> K:
        if self._urgent:
            key = self._urgent.popleft()
            self._in_urgent.discard(key)
            return key
        return self._normal.popleft()

    def forget(self, key: K) -> None:
        """Drop pending work and retries for ``key`` (its object is gone)."""
        self._pending.pop(key, None)
        self._marked_urgent.discard(key)
        self._failures.pop(key, None)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()

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
        for retry in self._retries.values():
            retry.cancel()
        self._retries.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            await self._waiting.acquire()
            key = self._next()
            if key not in self._pending or key in self._active:
                # Forgotten while it waited, or a second entry of a key queued in both lanes.
                continue
            apply = self._pending.pop(key)
            urgent = key in self._marked_urgent
            self._marked_urgent.discard(key)
            self._active.add(key)
            try:
                await self._process(key, apply)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._schedule_retry(key, apply, urgent, error)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
            if key in self._pending:
                self._enqueue(key, urgent=key in self._marked_urgent)

    def _schedule_retry(self, key: K, apply: bool, urgent: bool, error: Exception) -> None:
        attempt = self._failures.get(key, 0) + 1
        self._failures[key] = attempt
        delay = self._retry_delay(error, attempt)
        logger.warning("%s failed (attempt %d), retrying in %.1fs: %s", key, attempt, delay, error)
        previous = self._retries.pop(key, None)
        if previous is not None:
            previous.cancel()

        def retry() -> None:
            self._retries.pop(key, None)
            self.add(key, apply=apply, urgent=urgent)  # a retried first apply stays first

        self._retries[key] = asyncio.get_running_loop().call_later(delay, retry)
