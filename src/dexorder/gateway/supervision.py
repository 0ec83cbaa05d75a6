"""Background tasks whose failure is never unseen: one helper for every task the gateway starts.

``supervise`` starts a task and, if it ends by an exception, logs it once with its traceback
(so asyncio never reports "Task exception was never retrieved") and calls its owner's
``on_failure``, which does what the task's failure means for it: close what depended on
the task, start it again (``restarting``), or report the gateway not ready
(``TaskHealth``). A cancelled task was stopped by its owner and is not reported.

No layer of the gateway is below this module: it imports nothing of the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

OnFailure = Callable[[BaseException], None]
"""Told of a supervised task's exception, from the event loop's callback (not awaited)."""


def supervise(
    work: Coroutine[Any, Any, T], *, name: str, on_failure: OnFailure | None = None
) -> asyncio.Task[T]:
    """Run ``work`` as a task; its exception is logged, then given to ``on_failure``."""
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(lambda done: _report(done, on_failure))
    return task


def _report(task: asyncio.Task[Any], on_failure: OnFailure | None) -> None:
    if task.cancelled():
        return
    error = task.exception()  # retrieved: asyncio will not report it again
    if error is None:
        return
    logger.error("background task %s failed", task.get_name(), exc_info=error)
    if on_failure is not None:
        try:
            on_failure(error)
        except Exception:
            logger.exception("recovering from the failure of %s failed", task.get_name())


class TaskHealth:
    """The tasks a process needs running: ``/ready`` is false while one has failed.

    ``failed(name)`` is an ``on_failure`` for ``supervise``; ``recovered(name)`` clears it
    (a task that was started again and works)."""

    def __init__(self) -> None:
        self._failed: dict[str, str] = {}

    def failed(self, name: str) -> OnFailure:
        def record(error: BaseException) -> None:
            self._failed[name] = repr(error)

        return record

    def recovered(self, name: str) -> None:
        self._failed.pop(name, None)

    @property
    def failures(self) -> dict[str, str]:
        """Each failed task's name and its error."""
        return dict(self._failed)

    async def healthy(self) -> bool:
        return not self._failed


def restarting(
    start: Callable[[], Coroutine[Any, Any, None]],
    *,
    name: str,
    backoff: float = 1.0,
    health: TaskHealth | None = None,
) -> asyncio.Task[None]:
    """Run ``start()`` under supervision, and again after ``backoff`` seconds each time it
    fails (marked failed in ``health`` until it is started again). Cancel the returned task
    to stop it."""

    async def run() -> None:
        while True:
            try:
                # Cancelling ``run`` cancels the attempt it awaits.
                await supervise(start(), name=name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Logged by ``supervise``; here only what its failure means.
                if health is not None:
                    health.failed(name)(error)
            await asyncio.sleep(backoff)
            if health is not None:
                health.recovered(name)

    return supervise(run(), name=f"{name}:supervisor")


__all__ = ["OnFailure", "TaskHealth", "restarting", "supervise"]
