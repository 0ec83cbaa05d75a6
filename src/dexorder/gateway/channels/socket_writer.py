"""One writer per WebSocket: what is said to a client never waits for the client.

Every frame for a socket goes through its ``SocketWriter``: ``send`` queues the text and
returns at once, and the writer's own task sends the queue in order. A client that stops
reading (its TCP window shut) holds up only that task: a send that waits longer than
``SendPolicy.timeout``, or frames queued past ``SendPolicy.max_bytes``, cut the client
off: the socket is aborted (no close handshake, which would wait on the same window) and
``send`` says False from then on. The turn goes on; its frames are in the session store, so
the client that reconnects gets them (``resume``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

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
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[str] = collections.deque()
        self._queued_bytes = 0
        # When sending last made progress (a frame sent, or sending began), and the one
        # timer that checks it: a watchdog, so a token costs no timer of its own.
        self._progress_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: The socket is closed or aborted: nothing more is sent.
        self.gone = False
        self._task = supervise(self._run(), name=f"ws-writer:{name}")

    def send(self, text: str) -> bool:
        """Queue ``text``; False when the socket is gone (now, or cut off by this frame)."""
        if self.gone:
            return False
        if self.ws.closed:
            self.gone = True
            return False
        self._queued_bytes += len(text)
        if self._queued_bytes > self._policy.max_bytes:
            self.abort("queue_full")
            return False
        self._queue.append(text)
        if self._idle.is_set():
            self._idle.clear()
            self._progress_at = self._loop.time()
            if self._watchdog is None:
                self._watchdog = self._loop.call_later(self._policy.timeout, self._check)
        self._wake.set()
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
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _stop_sending(self) -> None:
        self.gone = True
        self._queue.clear()
        self._queued_bytes = 0
        self._idle.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check(self) -> None:
        """The watchdog: abort when frames wait and sending made no progress for the
        timeout; look again when that could next be so; stop looking when idle."""
        self._watchdog = None
        if self.gone or self._idle.is_set():
            return
        stalled = self._loop.time() - self._progress_at
        if stalled >= self._policy.timeout:
            self.abort("send_timeout")
            self._task.cancel()  # its send waits on the aborted connection
            return
        self._watchdog = self._loop.call_later(self._policy.timeout - stalled, self._check)

    async def _run(self) -> None:
        loop, queue, ws = self._loop, self._queue, self.ws
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while queue:
                    text = queue.popleft()
                    self._queued_bytes -= len(text)
                    await ws.send_str(text)
                    self._progress_at = loop.time()
            except (ConnectionError, RuntimeError):
                # Closed under us (or aborted by the watchdog): the reader sees it too.
                self._stop_sending()
                return
            self._idle.set()


__all__ = ["SLOW_CLIENTS", "SendPolicy", "SocketWriter"]
