"""Updates of one chat are taken up in the order they were read.

The inbox's workers run side by side, so without this a ``/new`` and the message typed
right after it raced: the message could open its conversation on the old session before
``/new`` had renewed it, or ``/new`` could close the conversation the message had just
opened. Each update read takes a ``Place`` for its chat before any await; its handler
starts once the chat's previous update has been *accepted* (a command applied, a message
queued in its conversation), and says so with ``accepted()``. Replies then still stream
side by side, and ``/stop`` (the urgent lane) never waits here.

Per replica: two replicas that read a chat's updates within the same moment are not
ordered against each other (a Redis consumer group hands entries out with no key).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Hashable

_CURRENT: contextvars.ContextVar[Place | None] = contextvars.ContextVar(
    "telegram_update_place", default=None
)


class ArrivalOrder:
    """The last place taken per key; a key is forgotten once its last place is released."""

    def __init__(self) -> None:
        self._last: dict[Hashable, asyncio.Future[None]] = {}

    def take(self, key: Hashable | None) -> Place:
        """A place after every place taken so far for ``key`` (None: no order, no wait)."""
        if key is None:
            return Place(None, None, None, None)
        before = self._last.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last[key] = mine
        return Place(self, key, before, mine)

    def __len__(self) -> int:
        return len(self._last)

    def _forget(self, key: Hashable, mine: asyncio.Future[None]) -> None:
        if self._last.get(key) is mine:
            del self._last[key]


class Place:
    """One update's place in its chat's order."""

    def __init__(
        self,
        order: ArrivalOrder | None,
        key: Hashable | None,
        before: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> None:
        self._order, self._key, self._before, self._mine = order, key, before, mine
        self._released = False

    async def reached(self) -> None:
        """Until the update before this one in its chat was accepted."""
        if self._before is not None:
            # Shielded: a cancelled wait must not cancel the earlier update's place.
            await asyncio.shield(self._before)

    def release(self) -> None:
        """Let the chat's next update start; idempotent. A place released before it was
        reached (its update cancelled or dropped) passes on only once the place before
        it is released too, so the order holds."""
        mine, before, order, key = self._mine, self._before, self._order, self._key
        if mine is None or self._released:
            return
        self._released = True
        assert order is not None
        assert key is not None
        # The key is forgotten once this settles, if no later update took a place since.
        mine.add_done_callback(lambda _: order._forget(key, mine))
        if before is not None and not before.done():
            before.add_done_callback(lambda _: _settle(mine))
        else:
            mine.set_result(None)

    def bind(self) -> contextvars.Token[Place | None]:
        """Make this the place that ``accepted()`` releases, in the current task."""
        return _CURRENT.set(self)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def accepted() -> None:
    """Called by a handler once its update is accepted: the chat's next update may start.
    Outside an ordered update (the urgent lane, a test calling the handler) it does
    nothing; a handler that never calls it lets the next update start when it returns."""
    place = _CURRENT.get()
    if place is not None:
        place.release()


__all__ = ["ArrivalOrder", "Place", "accepted"]
