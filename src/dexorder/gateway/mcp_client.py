"""The MCP adapter: one streamable-HTTP session to one user's agent.

The agent is opened with its per-agent bearer token; the user's JWT never reaches it.
When the server answers 404 for our session id (the agent restarted and forgot it),
the MCP spec says the client must start a new session. The SDK surfaces that as a
"Session terminated" error and stops there, so this adapter reopens and retries once.

One session may serve many conversations of the user at once (``agent_sessions``): the
SDK tells concurrent requests apart by their JSON-RPC ids, the tool list is fetched once,
and a session lost to a restarted agent is reopened once for every caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
from mcp import ClientSession, McpError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import (
    CallToolRequest,
    CallToolRequestParams,
    CallToolResult,
    ClientRequest,
    TextContent,
    TextResourceContents,
)
from pydantic import AnyUrl

from dexorder.gateway.provisioning.base import AgentEndpoint

logger = logging.getLogger(__name__)

# Idle connections are dropped before the agent's server (uvicorn: 5 s) closes them, so a
# request never goes out on a connection the agent is closing at that moment.
# No cap on connections: a session carries every conversation of its user in this process,
# and each request holds its connection until the reply (a backtest: minutes). httpx's
# default cap (100) would queue the others behind slow tools until the read timeout fails
# them, and a failed call drops the session for all of them. Each conversation runs one
# turn at a time, so the connections stay bounded by the user's conversations. Few idle
# ones are kept, though: httpx checks every pooled connection on each request (a socket
# poll each), and a hundred idle ones made that check the largest cost of a call.
_AGENT_LIMITS = httpx.Limits(
    max_connections=None, max_keepalive_connections=8, keepalive_expiry=2.0
)


class AgentUnavailable(Exception):
    """The user's agent could not be reached, or broke the protocol."""

    code = "agent_unavailable"


class _TransportEnded(Exception):
    """The session's transport ended while a request was waiting for its reply."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    input_schema: dict[str, Any]

    def as_openai_tool(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.input_schema or {"type": "object", "properties": {}},
            },
        }


@dataclass(frozen=True)
class ToolOutcome:
    content: str
    is_error: bool


def map_host(url: str, host_map: Mapping[str, str]) -> str:
    """Rewrite ``host:port`` through ``host_map`` (a test and demo stand-in for cluster DNS)."""
    if not host_map:
        return url
    parts = urlsplit(url)
    target = host_map.get(parts.netloc) or host_map.get(parts.hostname or "")
    return urlunsplit(parts._replace(netloc=target)) if target else url


def _session_lost(error: BaseException) -> bool:
    return isinstance(error, McpError) and "Session terminated" in str(error)


def _text_of(result: CallToolResult) -> str:
    parts: list[str] = []
    for item in result.content:
        if isinstance(item, TextContent):
            parts.append(item.text)
        else:
            parts.append(json.dumps(item.model_dump(mode="json")))
    if not parts and result.structuredContent is not None:
        parts.append(json.dumps(result.structuredContent))
    return "\n".join(parts)


class AgentSession:
    """An MCP client session that survives the agent forgetting it."""

    def __init__(
        self,
        endpoint: AgentEndpoint,
        *,
        host_map: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        connect_grace: float = 0.0,
        read_timeout: float = 30.0,
        tool_timeout: float = 300.0,
        on_session: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._url = map_host(endpoint.url, host_map or {})
        self._timeout = timeout
        self._connect_grace = connect_grace
        # Without these the SDK waits forever for a reply that a broken stream never brings;
        # tools (a backtest) may legitimately take longer than reading a resource.
        self._read_timeout = dt.timedelta(seconds=read_timeout)
        self._tool_timeout = dt.timedelta(seconds=tool_timeout)
        self._session: ClientSession | None = None
        self._closing: asyncio.Event | None = None
        self._holder: asyncio.Task[None] | None = None
        # Concurrent first calls (the harness reads resources in parallel) share one open.
        self._opening = asyncio.Lock()
        # The session a reopen failed to replace: callers that lost the same one fail at
        # once instead of each trying again, one after the other, against a gone agent.
        self._reopen_failed: ClientSession | None = None
        # The last session the agent answered 404 for: requests still waiting on it when a
        # reopen closes it were refused too (not run), so they are sent again.
        self._forgotten: ClientSession | None = None
        # Closed for good: calls fail instead of opening a session nobody would close.
        self._closed = False
        self._tools: list[ToolSpec] | None = None
        self._listing = asyncio.Lock()
        self.sessions_opened = 0
        #: The agent's id for the current MCP session (the ``mcp-session-id`` header).
        self.mcp_session_id: str | None = None
        self._on_session = on_session

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> None:
        # The SDK's transport lives in anyio scopes that must be entered and exited by
        # the same task; a dedicated task holds them, so any caller may open or close.
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[ClientSession] = loop.create_future()
        closing = asyncio.Event()
        task = asyncio.create_task(
            self._hold(opened, closing), name=f"mcp-session:{self.endpoint.user_id}"
        )
        try:
            session = await opened
        except BaseException:
            closing.set()
            with contextlib.suppress(BaseException):
                await task
            raise
        if self._closed:
            # Closed while this open was under way: nobody would close what it opened.
            self.mcp_session_id = None
            closing.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5)
            raise AgentUnavailable("the MCP session was closed")
        self._session, self._closing, self._holder = session, closing, task
        self.sessions_opened += 1
        if self._on_session is not None:
            try:
                await self._on_session(self.mcp_session_id)
            except Exception:
                # Recording the id (in the shared session store) must never break the chat.
                logger.warning("could not record MCP session of %s", self.endpoint.user_id)

    async def _hold(self, opened: asyncio.Future[ClientSession], closing: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.endpoint.token}"} if self.endpoint.token else {}
        try:
            async with (
                httpx.AsyncClient(
                    headers=headers,
                    timeout=httpx.Timeout(self._timeout, read=300),
                    limits=_AGENT_LIMITS,
                ) as http,
                streamable_http_client(self._url, http_client=http) as (read, write, session_id),
                ClientSession(read, write, read_timeout_seconds=self._read_timeout) as session,
            ):
                await session.initialize()
                self.mcp_session_id = session_id()
                opened.set_result(session)
                await closing.wait()
        except Exception as error:
            if not opened.done():
                opened.set_exception(
                    AgentUnavailable(f"cannot open an MCP session with the agent: {error}")
                )
            else:
                logger.debug("MCP session of %s ended: %s", self.endpoint.user_id, error)
        finally:
            if not opened.done():
                opened.set_exception(AgentUnavailable("the MCP session was closed while opening"))

    async def _first_open(self) -> None:
        """Open the first session, retrying for ``connect_grace`` seconds.

        An agent reported Ready may not answer yet: its Service's endpoints lag the pod's
        readiness, and a process may still be binding its port. Later opens do not wait:
        an agent that answered once and stopped answering is really gone.
        """
        deadline = time.monotonic() + self._connect_grace
        delay = 0.05
        while True:
            try:
                await self._open()
            except AgentUnavailable:
                if self._closed or self.sessions_opened or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            else:
                return

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """End the session for good; later calls raise ``AgentUnavailable``."""
        self._closed = True
        await self._shut()

    @property
    def is_open(self) -> bool:
        """An MCP session with the agent is open now (the first call opens it)."""
        return self._session is not None

    async def _shut(self) -> None:
        closing, holder = self._closing, self._holder
        self._session, self._closing, self._holder = None, None, None
        self.mcp_session_id = None
        if closing is not None and holder is not None:
            closing.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(holder, timeout=5)

    async def _reopen(self, lost: ClientSession, why: str) -> None:
        # Every caller that was using ``lost`` comes here; the first reopens, the others
        # take its session (or its failure) under the lock.
        async with self._opening:
            if self._session is not lost and self._session is not None:
                return  # another call reopened it already
            if self._reopen_failed is lost:
                raise AgentUnavailable(f"{why}, and a new MCP session could not be opened")
            if self._closed:
                raise AgentUnavailable("the MCP session was closed")
            logger.info("%s (agent of %s); opening a new session", why, self.endpoint.user_id)
            await self._shut()
            try:
                await self._open()
            except AgentUnavailable:
                self._reopen_failed = lost
                raise
            self._reopen_failed = None

    async def _current(self) -> tuple[ClientSession, asyncio.Task[None]]:
        """The open session and the task holding its transport; opened if need be."""
        if self._closed:
            raise AgentUnavailable("the MCP session was closed")
        session, holder = self._session, self._holder
        if session is not None and holder is not None and not holder.done():
            return session, holder
        if session is not None:
            # The transport ended under the session (the SDK ends it when a request cannot
            # reach the agent): nothing can be sent on it any more, so open another.
            await self._reopen(session, "the MCP connection to the agent ended")
        else:
            async with self._opening:
                if self._session is None and not self._closed:
                    await self._first_open()
        session, holder = self._session, self._holder
        if session is None or holder is None:  # closed while this call waited
            raise AgentUnavailable("the MCP session was closed")
        return session, holder

    @staticmethod
    async def _request(run: Any, session: ClientSession, holder: asyncio.Task[None]) -> Any:
        """One request, failed as soon as the session's transport ends under it.

        The SDK would leave it waiting for its read timeout: the transport's crash cancels
        the loop that should tell pending requests the connection closed."""
        request = asyncio.ensure_future(run(session))
        try:
            await asyncio.wait({request, holder}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
                await asyncio.wait({request})
        if request.cancelled():
            raise _TransportEnded
        return request.result()

    async def _call(self, operation: str, run: Any) -> Any:
        current, holder = await self._current()
        try:
            return await self._request(run, current, holder)
        except McpError as error:
            if not _session_lost(error):
                raise AgentUnavailable(f"{operation}: {error}") from error
            self._forgotten = current
            why = "the agent forgot our MCP session"
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Not sent: the transport had closed already. Safe to send on a new session.
            why = "the MCP connection to the agent had ended"
        except _TransportEnded as error:
            if current is not self._forgotten:
                # Perhaps sent and run: a tool must not run twice, so no retry.
                raise AgentUnavailable(f"{operation}: the connection to the agent ended") from error
            # Closed by another caller's reopen: the agent answers this one 404 too.
            why = "the agent forgot our MCP session"
        except (httpx.HTTPError, OSError) as error:
            raise AgentUnavailable(f"{operation}: the agent did not answer ({error})") from error
        await self._reopen(current, why)
        session, holder = await self._current()
        try:
            return await self._request(run, session, holder)
        except (
            McpError,
            httpx.HTTPError,
            OSError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            _TransportEnded,
        ) as error:
            raise AgentUnavailable(f"{operation}: {error or type(error).__name__}") from error

    async def list_tools(self) -> list[ToolSpec]:
        """The agent's tools, cached for the session's life (asked once however many ask)."""
        if self._tools is None:
            async with self._listing:
                if self._tools is None:
                    result = await self._call("list_tools", lambda s: s.list_tools())
                    self._tools = [
                        ToolSpec(tool.name, tool.description or "", dict(tool.inputSchema or {}))
                        for tool in result.tools
                    ]
        return self._tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutcome:
        """Call a tool; its result as text (what the model is given) and whether it failed.

        Sent as the SDK's ``call_tool`` sends it, without the check of the structured result
        against the tool's output schema that ``ClientSession.call_tool`` adds: the gateway
        uses only the text, and that check has jsonschema validate the schema itself on every
        call (1.4 ms of CPU, more than the rest of the call; see BENCHMARKS.md).
        """
        request = ClientRequest(
            CallToolRequest(params=CallToolRequestParams(name=name, arguments=dict(arguments)))
        )
        result: CallToolResult = await self._call(
            f"call_tool {name}",
            lambda s: s.send_request(
                request, CallToolResult, request_read_timeout_seconds=self._tool_timeout
            ),
        )
        return ToolOutcome(content=_text_of(result), is_error=bool(result.isError))

    async def read_resource(self, uri: str) -> str:
        result = await self._call(f"read_resource {uri}", lambda s: s.read_resource(AnyUrl(uri)))
        texts = [c.text for c in result.contents if isinstance(c, TextResourceContents)]
        return "\n".join(texts)

    async def read_json_resource(self, uri: str, default: Any) -> Any:
        text = await self.read_resource(uri)
        try:
            return json.loads(text) if text else default
        except json.JSONDecodeError:
            return default
