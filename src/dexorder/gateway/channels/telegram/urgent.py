"""Updates that must not queue behind replies: ``/stop`` is handled as it arrives.

The inbox's workers may all be busy writing replies (each holds its worker until its
reply ends), and ``/stop`` is meant for exactly those replies: queued, it would come once
they are over. So the webhook hands it here instead, after the inbox has marked the
update done (a redelivery is skipped, as any processed update's). Not persisted: a
replica that dies at that moment loses the ``/stop``, and with it the reply it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dexorder.gateway.pure.telegram_format import split_command

log = logging.getLogger(__name__)

URGENT_COMMANDS = frozenset({"stop"})


def urgent_command(update: Mapping[str, Any]) -> str | None:
    """The command of an update that is one of ``URGENT_COMMANDS``, else None."""
    message = update.get("message")
    if not isinstance(message, Mapping):
        return None
    text = message.get("text")
    if not isinstance(text, str) or not text.startswith("/"):
        return None
    name, _ = split_command(text)
    return name if name in URGENT_COMMANDS else None


class UrgentLane:
    """Runs urgent updates at once, each in a task of its own, all cancelled on close."""

    def __init__(self, handle: Callable[[int, bytes], Awaitable[None]]) -> None:
        self._handle = handle
        self._tasks: set[asyncio.Task[None]] = set()

    def takes(self, update: Mapping[str, Any]) -> bool:
        return urgent_command(update) is not None

    def run(self, update_id: int, body: bytes) -> None:
        task = asyncio.create_task(self._run(update_id, body), name=f"telegram-urgent:{update_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, update_id: int, body: bytes) -> None:
        try:
            await self._handle(update_id, body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("processing urgent Telegram update %d failed", update_id)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["URGENT_COMMANDS", "UrgentLane", "urgent_command"]
