"""One MCP session per user and agent in this gateway process, shared by the user's chats.

A user may hold many chats at once (tabs, devices, Telegram), all talking to one agent. A
session per chat would make the agent keep as many MCP sessions, each with its own
handshake and connections. The pool hands out one ``AgentSession`` per agent endpoint
(user, URL, token), counts the conversations holding it, and closes it when the last one
lets go, after a short linger.

A conversation that finds the agent gone drops the session for everyone sharing it, once;
the others see their lease dropped and take the next session on their next turn. A new
session opened meanwhile for the same endpoint is a different entry, never closed by a
late drop of the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from dexorder.gateway import metrics
from dexorder.gateway.agents.mcp_client import DEFAULT_READ_SECONDS, AgentSession
from dexorder.gateway.agents.mcp_transport import MAX_ANSWER_BYTES
from dexorder.gateway.agents.provisioning.base import AgentEndpoint, ProvisioningError

logger = logging.getLogger(__name__)

# A user's last chat closing and the next opening moments later (a page reload, the
# one-off conversation of a Telegram approval) reuse the session instead of a handshake.
LINGER_SECONDS = 2.0

#: Told the agent's MCP session id when one opens and None when it is dropped.
SessionHook = Callable[[str | None], Awaitable[None]]


class _Shared:
    """One open (or opening) session and the leases on it."""

    def __init__(
        self,
        endpoint: AgentEndpoint,
        *,
        host_map: Mapping[str, str],
        connect_grace: float,
        read_timeout: float,
        max_answer_bytes: int,
    ) -> None:
        self.endpoint = endpoint
        self.session = AgentSession(
            endpoint,
            host_map=host_map,
            connect_grace=connect_grace,
            read_timeout=read_timeout,
            on_session=self.announce,
            max_answer_bytes=max_answer_bytes,
        )
        self.leases: set[AgentLease] = set()
        self.dropped = False
        self.linger: asyncio.Task[None] | None = None

    async def announce(self, mcp_session_id: str | None) -> None:
        """Tell every holder's hook (each records the id for its own chat session)."""
        hooks = [lease.hook for lease in self.leases if lease.hook is not None]
        results = await asyncio.gather(
            *(hook(mcp_session_id) for hook in hooks), return_exceptions=True
        )
        failed = sum(isinstance(result, Exception) for result in results)
        if failed:
            # The record in the session store is informative; the chat goes on without it.
            logger.warning(
                "could not record the MCP session of %s for %d chats",
                self.endpoint.user_id,
                failed,
            )


class AgentLease:
    """One conversation's hold on a shared session."""

    def __init__(self, pool: AgentSessions, shared: _Shared, hook: SessionHook | None) -> None:
        self._pool = pool
        self._shared = shared
        self.hook = hook
        self._released = False

    @property
    def session(self) -> AgentSession:
        return self._shared.session

    @property
    def dropped(self) -> bool:
        """Dropped (by any holder) or closed with the pool: take a new lease."""
        return self._shared.dropped or self._shared.session.closed

    async def report(self) -> None:
        """Tell this holder's hook the id of a session that was open before it joined.

        A session still to open tells every holder, this one included, when it opens."""
        session = self._shared.session
        if self.hook is not None and session.is_open:
            try:
                await self.hook(session.mcp_session_id)
            except Exception:
                logger.warning("could not record MCP session of %s", self._shared.endpoint.user_id)

    async def drop(self) -> None:
        """The agent is gone: close the session for every holder (once, whoever asks)."""
        await self._pool._drop(self._shared)

    async def release(self) -> None:
        """Let go; the last holder's release closes the session (after the linger)."""
        if self._released:
            return
        self._released = True
        await self._pool._release(self._shared, self)


class AgentSessions:
    """The pool of shared sessions; closed with the app."""

    def __init__(
        self, *, linger: float = LINGER_SECONDS, max_answer_bytes: int = MAX_ANSWER_BYTES
    ) -> None:
        self._linger = linger
        #: The most of one answer read from an agent (past it, that call fails).
        self._max_answer_bytes = max_answer_bytes
        self._shared: dict[AgentEndpoint, _Shared] = {}
        self._lingering: set[asyncio.Task[None]] = set()
        self._closed = False

    def acquire(
        self,
        endpoint: AgentEndpoint,
        *,
        host_map: Mapping[str, str],
        connect_grace: float,
        read_timeout: float = DEFAULT_READ_SECONDS,
        on_session: SessionHook | None = None,
    ) -> AgentLease:
        """A lease on the endpoint's session, opened at its first call if none is open.

        Synchronous, so a cancel cannot come between counting the holder and handing out
        the lease; ``report`` then tells the holder's hook about a session already open."""
        if self._closed:
            raise ProvisioningError("ShuttingDown", "the gateway is stopping; reconnect shortly")
        shared = self._shared.get(endpoint)
        if shared is None:
            shared = _Shared(
                endpoint,
                host_map=host_map,
                connect_grace=connect_grace,
                read_timeout=read_timeout,
                max_answer_bytes=self._max_answer_bytes,
            )
            self._shared[endpoint] = shared
            metrics.AGENT_SESSIONS.inc()
        elif shared.linger is not None:
            # Still in the dict, so the linger has not woken yet: it never will.
            shared.linger.cancel()
            shared.linger = None
        lease = AgentLease(self, shared, on_session)
        shared.leases.add(lease)
        return lease

    def sessions_of(self, user_id: str) -> list[AgentSession]:
        """The user's sessions in the pool now (held or lingering)."""
        return [s.session for key, s in self._shared.items() if key.user_id == user_id]

    def holders(self, session: AgentSession) -> int:
        """How many conversations hold ``session`` now."""
        return next((len(s.leases) for s in self._shared.values() if s.session is session), 0)

    def _current(self, shared: _Shared) -> bool:
        return self._shared.get(shared.endpoint) is shared

    async def _release(self, shared: _Shared, lease: AgentLease) -> None:
        shared.leases.discard(lease)
        if shared.leases or not self._current(shared):
            return  # still held, or dropped (and closed) already
        if self._linger > 0 and not self._closed:
            task = asyncio.create_task(
                self._expire(shared), name=f"mcp-linger:{shared.endpoint.user_id}"
            )
            shared.linger = task
            self._lingering.add(task)
            task.add_done_callback(self._lingering.discard)
            return
        self._forget(shared)
        await shared.session.close()

    def _forget(self, shared: _Shared) -> None:
        del self._shared[shared.endpoint]
        metrics.AGENT_SESSIONS.dec()

    async def _expire(self, shared: _Shared) -> None:
        await asyncio.sleep(self._linger)
        # From here to the pop there is no await: an acquire either came before (and
        # cancelled the sleep) or comes after and opens a new entry.
        if shared.leases or not self._current(shared):
            return
        self._forget(shared)
        shared.linger = None
        await shared.session.close()

    async def _drop(self, shared: _Shared) -> None:
        if shared.dropped:
            return
        shared.dropped = True
        if shared.linger is not None:
            shared.linger.cancel()
            shared.linger = None
        if self._current(shared):
            self._forget(shared)
        await shared.session.close()
        await shared.announce(None)

    async def close(self) -> None:
        """Close every session (at shutdown, after the conversations closed)."""
        self._closed = True
        for shared in self._shared.values():
            if shared.linger is not None:  # still asleep: its session is closed below
                shared.linger.cancel()
                shared.linger = None
        for task in list(self._lingering):  # the others are closing their session now
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left, self._shared = list(self._shared.values()), {}
        metrics.AGENT_SESSIONS.dec(len(left))
        await asyncio.gather(*(shared.session.close() for shared in left))
