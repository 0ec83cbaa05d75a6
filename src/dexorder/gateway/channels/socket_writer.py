"""One writer per WebSocket: what is said to a client never waits for the client.

Every frame for a socket goes through its ``SocketWriter``, whose ``send`` never waits. A
frame goes out at once when nothing is ahead of it and the connection takes it without
waiting (nearly always: aiohttp waits only for a transport past its high-water mark);
otherwise the frame that would wait, and every frame after it, are sent in order by a task
the writer starts for that backlog, which ends once the backlog is sent. A client that
stops reading (its TCP window shut) holds up only that task: sending that makes no
progress for ``SendPolicy.timeout``, or frames queued past ``SendPolicy.max_bytes``, cut
the client off: the socket is aborted (no close handshake, which would wait on the same
window) and ``send`` says False from then on. The turn goes on; its frames are in the
session store, so the client that reconnects gets them (``resume``).

Sending at once, not through a task woken per frame, is what keeps a streamed token's
cost near what it was before the writer (``BENCHMARKS.md``, the relay path): a real
model's token arrives on its own, so each would otherwise be a wake-up of its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from dexorder.gateway import metrics
from dexorder.gateway.supervision import supervise

logger = logging.getLogger(__name__)

SLOW_CLIENTS = Counter(
    "dexorder_gateway_slow_clients_cut_off",
    "WebSockets aborted because their client did not read, by why.",
    ["why"],
    registry=metrics.REGISTRY,
)


@dataclass(frozen=True)
class SendPolicy:
    """How long a client may keep its frames waiting: sending may make no progress for
    ``timeout`` seconds (a full TCP window), and ``max_bytes`` of frames (counted in
    characters, so as not to encode each token twice) may queue behind it; past either the
    socket is aborted."""

    timeout: float = 10.0
    max_bytes: int = 1 << 20


_Send = Coroutine[Any, Any, None]


class SocketWriter:
    """The one sender of a socket's frames; see the module's text. ``close`` stops it."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        policy: SendPolicy,
        *,
        name: str,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self._policy = policy
        self._name = name
        self._loop = asyncio.get_running_loop()
        # Frames behind the one that waits; only while ``_backlog`` runs.
        self._queue: collections.deque[str] = collections.deque()
        self._queued_bytes = 0
        #: The task sending a backlog, while there is one.
        self._backlog: asyncio.Task[None] | None = None
        # When sending last made progress (a frame sent, or a backlog began), and the one
        # timer that checks it while a backlog waits: a watchdog, so no frame costs a timer.
        self._progress_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: The socket is closed or aborted: nothing more is sent.
        self.gone = False

    def send(self, text: str) -> bool:
        """Send or queue ``text``; False when the socket is gone (now, or cut off by this
        frame)."""
        if self.gone:
            return False
        if self.ws.closed:
            self.gone = True
            return False
        if self._backlog is None:
            return self._send_now(text)
        self._queued_bytes += len(text)
        if self._queued_bytes > self._policy.max_bytes:
            self.abort("queue_full")
            return False
        self._queue.append(text)
        return True

    def _send_now(self, text: str) -> bool:
        """Run the send of ``text`` up to its first wait, here; a send that must wait (for
        the transport to drain) is finished by a backlog task, and what follows queues."""
        sending: _Send = self.ws.send_str(text)
        try:
            waiting = sending.send(None)
        except StopIteration:
            return True
        except (ConnectionError, RuntimeError):
            self._stop_sending()  # closed under us: the reader sees it too
            return False
        except BaseException:
            sending.close()
            raise
        self._idle.clear()
        self._progress_at = self._loop.time()
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._policy.timeout, self._check)
        self._backlog = supervise(
            self._send_backlog(sending, waiting), name=f"ws-writer:{self._name}"
        )
        return True

    def abort(self, why: str) -> None:
        """Cut the client off: drop what is queued and abort the connection."""
        if self.gone:
            return
        self._stop_sending()
        SLOW_CLIENTS.labels(why=why).inc()
        logger.warning("client cut off (%s): it does not read its frames", why)
        if self._transport is not None:
            self._transport.abort()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is sent; False if it is not within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return not self.gone

    async def close(self) -> None:
        """Stop sending (what is still queued is dropped)."""
        self._stop_sending()
        backlog, self._backlog = self._backlog, None
        if backlog is not None:
            backlog.cancel()
            await asyncio.gather(backlog, return_exceptions=True)

    def _stop_sending(self) -> None:
        self.gone = True
        self._queue.clear()
        self._queued_bytes = 0
        self._idle.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check(self) -> None:
        """The watchdog: abort when a backlog waits and sending made no progress for the
        timeout; look again when that could next be so; stop looking when idle."""
        self._watchdog = None
        if self.gone or self._backlog is None:
            return
        stalled = self._loop.time() - self._progress_at
        if stalled >= self._policy.timeout:
            self.abort("send_timeout")
            self._backlog.cancel()  # its send waits on the aborted connection
            return
        self._watchdog = self._loop.call_later(self._policy.timeout - stalled, self._check)

    async def _send_backlog(self, sending: _Send, waiting: Any) -> None:
        """Finish ``sending`` (begun by ``_send_now``, which it left waiting on
        ``waiting``), then send the queue in order; the writer sends at once again after."""
        loop, queue, ws = self._loop, self._queue, self.ws
        try:
            await _finish(sending, waiting)
            self._progress_at = loop.time()
            while queue:
                text = queue.popleft()
                self._queued_bytes -= len(text)
                await ws.send_str(text)
                self._progress_at = loop.time()
        except (ConnectionError, RuntimeError):
            # Closed under us (or aborted by the watchdog): the reader sees it too.
            self._stop_sending()
        finally:
            if self._backlog is asyncio.current_task():
                self._backlog = None
                self._idle.set()


async def _finish(coroutine: _Send, waiting: Any) -> None:
    """Run ``coroutine`` to its end from a wait it yielded (``waiting``: a future, or None
    for a bare yield to the loop), as the task that awaited it would have: each future is
    awaited without taking its outcome, which the coroutine takes when resumed."""
    try:
        while True:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait((waiting,))
            try:
                waiting = coroutine.send(None)
            except StopIteration:
                return
    except BaseException:
        # Cancelled (the writer closed or aborted): the send ends with its connection.
        coroutine.close()
        raise


__all__ = ["SLOW_CLIENTS", "SendPolicy", "SocketWriter"]
