"""The MCP adapter: one streamable-HTTP session to one user's agent.

The agent is opened with its per-agent bearer token; the user's JWT never reaches it.
When the server answers 404 for our session id (the agent restarted and forgot it),
the MCP spec says the client must start a new session. The SDK surfaces that as a
"Session terminated" error and stops there, so this adapter reopens and retries once.
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

import httpx
from mcp import ClientSession, McpError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent, TextResourceContents
from pydantic import AnyUrl

from dexorder.gateway.provisioning.base import AgentEndpoint

logger = logging.getLogger(__name__)

# Idle connections are dropped before the agent's server (uvicorn: 5 s) closes them, so a
# request never goes out on a connection the agent is closing at that moment.
_AGENT_LIMITS = httpx.Limits(keepalive_expiry=2.0)


class AgentUnavailable(Exception):
    """The user's agent could not be reached, or broke the protocol."""

    code = "agent_unavailable"


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
        self._tools: list[ToolSpec] | None = None
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
                if self.sessions_opened or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            else:
                return

    async def close(self) -> None:
        closing, holder = self._closing, self._holder
        self._session, self._closing, self._holder = None, None, None
        if closing is not None and holder is not None:
            closing.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(holder, timeout=5)

    async def _reopen(self, lost: ClientSession) -> ClientSession:
        async with self._opening:
            if self._session is not lost and self._session is not None:
                return self._session  # another call reopened it already
            logger.info(
                "agent of %s forgot our MCP session; opening a new one", self.endpoint.user_id
            )
            await self.close()
            await self._open()
            assert self._session is not None
            return self._session

    async def _call(self, operation: str, run: Any) -> Any:
        if self._session is None:
            async with self._opening:
                if self._session is None:
                    await self._first_open()
        current = self._session
        assert current is not None
        try:
            return await run(current)
        except McpError as error:
            if not _session_lost(error):
                raise AgentUnavailable(f"{operation}: {error}") from error
        except (httpx.HTTPError, OSError) as error:
            raise AgentUnavailable(f"{operation}: the agent did not answer ({error})") from error
        session = await self._reopen(current)
        try:
            return await run(session)
        except (McpError, httpx.HTTPError, OSError) as error:
            raise AgentUnavailable(f"{operation}: {error}") from error

    async def list_tools(self) -> list[ToolSpec]:
        """The agent's tools, cached for the session's life."""
        if self._tools is None:
            result = await self._call("list_tools", lambda s: s.list_tools())
            self._tools = [
                ToolSpec(tool.name, tool.description or "", dict(tool.inputSchema or {}))
                for tool in result.tools
            ]
        return self._tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutcome:
        result: CallToolResult = await self._call(
            f"call_tool {name}",
            lambda s: s.call_tool(name, dict(arguments), read_timeout_seconds=self._tool_timeout),
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
