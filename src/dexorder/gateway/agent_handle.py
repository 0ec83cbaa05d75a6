"""One conversation's hold on its user's agent: the lease, the read ahead, the re-provision.

The agent's MCP session is shared with the user's other conversations in this process
(``agent_sessions``); the handle holds one lease on it. What the next turn's prompt needs
from the agent (preferences and history) is read ahead, once the agent is ready and after
each turn's write-back, so the model is called without waiting on the agent. An agent found
gone is dropped for every holder, and the provisioner finds or starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from dexorder.gateway import metrics
from dexorder.gateway.agents.mcp_client import DEFAULT_READ_SECONDS, AgentSession
from dexorder.gateway.agents.provisioning import (
    AgentEndpoint,
    Progress,
    Provisioner,
    ProvisioningError,
)
from dexorder.gateway.agents.sessions import AgentLease, AgentSessions
from dexorder.gateway.harness import read_agent_context
from dexorder.gateway.pure.credentials import external_mcp_credential
from dexorder.gateway.pure.licenses import EffectiveLicense
from dexorder.gateway.turns import AgentContext

logger = logging.getLogger(__name__)

CONTEXT_FRESH_SECONDS = 30.0
"""A context read ahead is used only while younger than this: another chat of the same user
(a tab, Telegram) may have changed the preferences since, and the history of this chat
changes only through its own turns. An older read is done again, as without read ahead."""


def fresh(context: AgentContext | None, now: float) -> bool:
    """Whether a context read (or carried) ahead may still stand for a read made ``now``
    (``time.monotonic()``); None, a failed read, never does."""
    return context is not None and now - context.read_at <= CONTEXT_FRESH_SECONDS


@dataclass(frozen=True)
class AgentAccess:
    """How this process reaches users' agents; built once per gateway process.

    ``connect_seconds``: how long a just-provisioned agent may take to answer its first MCP
    request; ``read_seconds``: how long a read of the agent (preferences, history, tool list)
    may take; ``external_mcp_secret`` derives each user's credential for the MCP server
    their license names (``mcp_server_url``; ``pure/credentials.py``), never the user's
    JWT, and never one user's credential at another's server."""

    provisioner: Provisioner
    sessions: AgentSessions = field(default_factory=AgentSessions)
    host_map: Mapping[str, str] = field(default_factory=dict)
    connect_seconds: float = 10.0
    read_seconds: float = DEFAULT_READ_SECONDS
    external_mcp_secret: str | None = None


class AgentHandle:
    """The agent of one conversation; see the module's text. ``close`` lets go of all."""

    def __init__(
        self,
        access: AgentAccess,
        license: EffectiveLicense,
        *,
        session_id: str,
        on_mcp_session: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self._access = access
        self._license = license
        self._session_id = session_id
        # Taken and let go under the lock, since a turn and an approval may both want the
        # agent at once.
        self._lease: AgentLease | None = None
        self._lock = asyncio.Lock()
        # The next turn's context, read ahead from ``_read_ahead_of``; kept (and so owned)
        # until the next read ahead replaces it or the handle closes.
        self._read_ahead: asyncio.Future[AgentContext | None] | None = None
        self._read_ahead_of: AgentSession | None = None
        self._read_ahead_taken = False
        self._closed = False
        # Told the agent's MCP session id when one opens and None when it is dropped, so a
        # shared session store can keep it with the rest of the session.
        self._on_mcp_session = on_mcp_session

    @property
    def own_server(self) -> bool:
        """The license names the user's own MCP server: nothing to provision or keep awake."""
        return bool(self._license.mcp_server_url)

    @property
    def session(self) -> AgentSession | None:
        """The MCP session held now, shared with the user's other conversations."""
        lease = self._lease
        return lease.session if lease is not None and not lease.dropped else None

    @property
    def context_read_ahead(self) -> AgentContext | None:
        """The next turn's context once read ahead, until a turn takes it (for tests and
        diagnostics; a stale one is still shown, and the turn reads again)."""
        task = self._read_ahead
        if task is None or self._read_ahead_taken or not task.done() or task.cancelled():
            return None
        return task.result()

    async def ensure(self, progress: Progress) -> AgentSession:
        """The agent's session, provisioning (and showing ``progress``) when none is held."""
        async with self._lock:
            if self._closed:
                raise ProvisioningError("Closed", "this chat session has ended")
            lease = self._lease
            if lease is not None and not lease.dropped:
                return lease.session
            if lease is not None:
                # Another conversation of this user found the agent gone and dropped the
                # session: provision (or find the new agent) and join the next session.
                self._lease = None
                await lease.release()
            access = self._access
            if self._license.mcp_server_url:
                user_id, secret = self._license.user_id, access.external_mcp_secret
                credential = None if secret is None else external_mcp_credential(secret, user_id)
                endpoint = AgentEndpoint(user_id, self._license.mcp_server_url, credential)
            else:
                started = time.perf_counter()
                endpoint = await access.provisioner.ensure_agent(self._license, progress)
                metrics.PROVISIONING.observe(time.perf_counter() - started)
            lease = access.sessions.acquire(
                endpoint,
                host_map=access.host_map,
                # Only an agent just started may be slow to answer; one that was running
                # and does not answer is gone, and waiting would only delay its wake.
                connect_grace=access.connect_seconds if endpoint.starting else 0.0,
                read_timeout=access.read_seconds,
                on_session=self._on_mcp_session,
            )
            self._lease = lease
            await lease.report()
            return lease.session

    async def keep_awake(self) -> None:
        """Tell the idle timer the user is active (for an agent the provisioner runs)."""
        if not self.own_server:
            await self._access.provisioner.record_activity(self._license.user_id)

    def busy(self) -> AbstractAsyncContextManager[None]:
        """Hold the agent awake while a turn runs (see ``Provisioner.busy``)."""
        if self.own_server:
            return contextlib.nullcontext()
        return self._access.provisioner.busy(self._license.user_id)

    async def drop(self) -> None:
        """The agent is gone: drop the shared session (every holder's hook is told None,
        once) and let the provisioner find or start the agent again."""
        await self._stop_read_ahead()
        async with self._lock:
            lease, self._lease = self._lease, None
            if lease is not None:
                await lease.drop()
                await lease.release()
        if not self.own_server:
            self._access.provisioner.forget(self._license.user_id)

    def closing(self) -> None:
        """From now on no lease is taken and no read ahead started (``close`` is coming)."""
        self._closed = True

    async def close(self) -> None:
        self.closing()
        await self._stop_read_ahead()
        async with self._lock:
            lease, self._lease = self._lease, None
            if lease is not None:
                await lease.release()

    # --- the read ahead ---------------------------------------------------------------

    async def _read_context(self, agent: AgentSession) -> AgentContext | None:
        """The read ahead: preferences and history (and the tool list, cached once read).

        Never fails: a failed read is the turn's to do again, and its error to report."""
        context, tools = await asyncio.gather(
            read_agent_context(agent, self._session_id),
            agent.list_tools(),
            return_exceptions=True,
        )
        for outcome in (context, tools):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome  # cancelled with the handle (gather returned it)
            if isinstance(outcome, BaseException):
                logger.info(
                    "reading ahead for session %s failed; the turn reads itself: %s",
                    self._session_id,
                    outcome,
                )
                return None
        assert isinstance(context, AgentContext)
        return context

    async def read_ahead_next(self, agent: AgentSession) -> None:
        """Start reading the next turn's context in the background."""
        await self._stop_read_ahead()
        if agent.closed or self._closed:
            return  # dropped meanwhile (the next turn joins a new session), or we are done
        self._read_ahead = asyncio.create_task(
            self._read_context(agent), name=f"read-ahead:{self._session_id}"
        )
        self._read_ahead_of = agent
        self._read_ahead_taken = False

    async def carry(self, agent: AgentSession, context: AgentContext) -> None:
        """Hand ``context`` to the next turn as if it had been read ahead."""
        await self._stop_read_ahead()
        done: asyncio.Future[AgentContext | None] = asyncio.get_running_loop().create_future()
        done.set_result(context)
        self._read_ahead, self._read_ahead_of = done, agent
        self._read_ahead_taken = False

    def take_read_ahead(self, agent: AgentSession) -> asyncio.Future[AgentContext | None] | None:
        """The read ahead for a turn on ``agent``: once, and only while running or fresh."""
        task = self._read_ahead
        if task is None or self._read_ahead_taken or self._read_ahead_of is not agent:
            return None
        self._read_ahead_taken = True
        if task.done():
            context = None if task.cancelled() else task.result()
            if not fresh(context, time.monotonic()):
                return None
        return task

    async def _stop_read_ahead(self) -> None:
        task, self._read_ahead, self._read_ahead_of = self._read_ahead, None, None
        if task is not None and not task.done():
            task.cancel()
            # wait(), not await: only our own cancel may stop us here, not the task's.
            await asyncio.wait([task])


__all__ = ["CONTEXT_FRESH_SECONDS", "AgentAccess", "AgentHandle", "fresh"]
