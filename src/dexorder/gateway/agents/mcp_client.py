"""The MCP adapter: one streamable-HTTP session to one user's agent.

The session (this module: the handshake, the session's generation, reopening it, the
requests and their results) runs over the transport (``mcp_transport``: one POST a
JSON-RPC message, answered with JSON or an event stream), as the MCP SDK separates
``client/session.py`` from ``client/streamable_http.py``. Both are ours, not the SDK's: its
client (anyio memory streams, a task group and httpx under every call)
cost the gateway about 2 ms of CPU per call, a third of its event loop at 100 chats, while
the model's tokens waited behind it; its types still parse every result.

The agent is opened with its per-agent bearer token; the user's JWT never reaches it.
When the server answers 404 for our session id (the agent restarted and forgot it), the
MCP spec says the client must start a new session: this adapter reopens and sends the
request once more, which is safe because the server refused it unrun.

One session may serve many conversations of the user at once (``agent_sessions``): requests
are told apart by their JSON-RPC ids, the tool list is fetched once, and a session lost to a
restarted agent is reopened once for every caller.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS
from mcp.types import (
    LATEST_PROTOCOL_VERSION,
    CallToolResult,
    ListToolsResult,
    ReadResourceResult,
    TextContent,
    TextResourceContents,
)
from pydantic import ValidationError

from dexorder.gateway.agents.mcp_transport import (
    MAX_ANSWER_BYTES,
    SESSION_HEADER,
    VERSION_HEADER,
    AgentTimeout,
    AgentUnavailable,
    AnswerTooLarge,
    Disconnected,
    SessionLost,
    StreamableHTTP,
)
from dexorder.gateway.agents.provisioning.base import AgentEndpoint
from dexorder.gateway.supervision import supervise

logger = logging.getLogger(__name__)

CLIENT_INFO = {"name": "dexorder-gateway", "version": "0.1.0"}

#: How long a read (a resource, the tool list) may take by default (DEXORDER_AGENT_READ_SECONDS).
DEFAULT_READ_SECONDS = 30.0
CONNECT_SECONDS = 5.0
#: How long telling the agent a tool call is cancelled may take (best effort).
CANCEL_NOTICE_SECONDS = 2.0
"""How long a connection to the agent may take. An agent accepts in milliseconds; no answer
in this long means nothing listens at that address any more (its pod is gone, and with it
the address), which is ``AgentUnavailable``, not a busy agent's ``AgentTimeout``."""

_Result = TypeVar("_Result", ListToolsResult, CallToolResult, ReadResourceResult)


class _RpcError(Exception):
    """The agent answered a request with a JSON-RPC error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (JSON-RPC error {code})")
        self.code = code


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
        connect_timeout: float = CONNECT_SECONDS,
        connect_grace: float = 0.0,
        read_timeout: float = DEFAULT_READ_SECONDS,
        tool_timeout: float = 300.0,
        on_session: Callable[[str | None], Awaitable[None]] | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self._connect_grace = connect_grace
        # A broken agent may never answer; tools (a backtest) may legitimately take longer
        # than reading a resource.
        self._read_timeout = read_timeout
        self._tool_timeout = tool_timeout
        self._transport = StreamableHTTP(
            map_host(endpoint.url, host_map or {}),
            endpoint.token,
            connect_timeout=connect_timeout,
            answer_timeout=read_timeout,
            max_answer_bytes=max_answer_bytes,
        )
        #: The protocol version the agent chose at the first open (sent on every message).
        self._version: str | None = None
        self._ids = itertools.count(1)
        # Which session a caller sent on: bumped by every open, so that callers that lost
        # the same session agree on who reopens it.
        self._generation = 0
        self._open_now = False
        # Concurrent first calls (the harness reads resources in parallel) share one open.
        self._opening = asyncio.Lock()
        # The session a reopen failed to replace: callers that lost the same one fail at
        # once instead of each trying again, one after the other, against a gone agent.
        self._reopen_failed: int | None = None
        # Closed for good: calls fail instead of opening a session nobody would close.
        self._closed = False
        self._tools: list[ToolSpec] | None = None
        self._listing = asyncio.Lock()
        self.sessions_opened = 0
        #: The agent's id for the current MCP session (the ``mcp-session-id`` header);
        #: None before the first open, and for a server that keeps no sessions.
        self.mcp_session_id: str | None = None
        self._on_session = on_session
        # ``notifications/cancelled`` still being sent (awaited by ``close``).
        self._notices: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        await self._first_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _session_headers(self) -> dict[str, str]:
        """The headers that say which session a message belongs to, once it has them."""
        headers: dict[str, str] = {}
        if self._version is not None:
            headers[VERSION_HEADER] = self._version
        if self.mcp_session_id is not None:
            headers[SESSION_HEADER] = self.mcp_session_id
        return headers

    # --- sessions ----------------------------------------------------------------------------

    async def _handshake(self) -> tuple[str | None, str]:
        """Initialize a session; its id (None from a server that keeps none) and version."""
        request = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "initialize",
            "params": {
                "protocolVersion": LATEST_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": CLIENT_INFO,
            },
        }
        # No session id yet (a reopen dropped the lost one); the version, after a first open.
        before = {VERSION_HEADER: self._version} if self._version is not None else {}
        answer, session_id = await self._transport.post(request, before, self._read_timeout)
        version = str(self._result_of(answer, "initialize").get("protocolVersion", ""))
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise AgentUnavailable(f"the agent speaks MCP {version!r}, which we do not")
        headers = {VERSION_HEADER: version}
        if session_id is not None:
            headers[SESSION_HEADER] = session_id
        notice = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await self._transport.post(notice, headers, self._read_timeout)
        return session_id, version

    async def _open(self) -> None:
        try:
            session_id, version = await self._handshake()
        except (AgentUnavailable, SessionLost, _RpcError) as error:
            raise AgentUnavailable(f"cannot open an MCP session with the agent: {error}") from error
        if self._closed:
            # Closed while this open was under way: nobody would close what it opened.
            await self._transport.end_session(session_id, version)
            raise AgentUnavailable("the MCP session was closed")
        self._version = version
        self.mcp_session_id = session_id
        self._generation += 1
        self._open_now = True
        self.sessions_opened += 1
        if self._on_session is not None:
            try:
                await self._on_session(self.mcp_session_id)
            except Exception:
                # Recording the id (in the shared session store) must never break the chat.
                logger.warning("could not record MCP session of %s", self.endpoint.user_id)

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

    @property
    def is_open(self) -> bool:
        """An MCP session with the agent is open now (the first call opens it)."""
        return self._open_now and not self._closed

    async def close(self) -> None:
        """End the session for good; later calls raise ``AgentUnavailable``."""
        if self._closed:
            return
        self._closed = True
        if self._notices:  # each bounded by CANCEL_NOTICE_SECONDS
            await asyncio.wait(self._notices)
        session_id, self.mcp_session_id = self.mcp_session_id, None
        self._open_now = False
        await self._transport.close(session_id, self._version)

    async def _reopen(self, lost: int, why: str) -> None:
        # Every caller that was using session ``lost`` comes here; the first reopens, the
        # others take its session (or its failure) under the lock.
        async with self._opening:
            if self._generation != lost and self._open_now:
                return  # another call reopened it already
            if self._reopen_failed == lost:
                raise AgentUnavailable(f"{why}, and a new MCP session could not be opened")
            if self._closed:
                raise AgentUnavailable("the MCP session was closed")
            logger.info("%s (agent of %s); opening a new session", why, self.endpoint.user_id)
            self._open_now = False
            self.mcp_session_id = None
            try:
                await self._open()
            except AgentUnavailable:
                self._reopen_failed = lost
                raise
            self._reopen_failed = None

    async def _current(self) -> int:
        """The generation of the open session; opened first if need be."""
        if self._closed:
            raise AgentUnavailable("the MCP session was closed")
        if not self._open_now:
            async with self._opening:
                if not self._open_now and not self._closed:
                    await self._first_open()
        if self._closed:  # closed while this call waited
            raise AgentUnavailable("the MCP session was closed")
        return self._generation

    # --- requests ----------------------------------------------------------------------------

    @staticmethod
    def _result_of(answer: dict[str, Any] | None, operation: str) -> dict[str, Any]:
        if answer is None:
            raise AgentUnavailable(f"{operation}: no answer")
        error = answer.get("error")
        if isinstance(error, dict):
            raise _RpcError(int(error.get("code", 0)), str(error.get("message", "")))
        result = answer.get("result")
        if not isinstance(result, dict):
            raise AgentUnavailable(f"{operation}: the agent's answer has no result")
        return result

    async def _request(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        headers = self._session_headers()
        try:
            answer, _ = await self._transport.post(message, headers, timeout)
        except Disconnected:
            # A pooled connection the agent closed as the request went out (it restarted):
            # a read runs again on a new connection. A tool call does not: it may have run.
            if method == "tools/call":
                raise
            message["id"] = next(self._ids)
            answer, _ = await self._transport.post(message, self._session_headers(), timeout)
        except asyncio.CancelledError:
            if method == "tools/call":
                self._cancel_on_agent(request_id, headers, "the turn was stopped")
            raise
        except AgentTimeout:
            if method == "tools/call":
                reason = f"the gateway stopped waiting after {timeout:g} s"
                self._cancel_on_agent(request_id, headers, reason)
            raise
        return self._result_of(answer, method)

    def _cancel_on_agent(self, request_id: int, headers: dict[str, str], reason: str) -> None:
        """Tell the agent a tool call's answer is no longer wanted (MCP's
        ``notifications/cancelled``), so it can stop the work: a backtest may run for
        minutes. Sent in the background: the turn that stopped does not wait for it."""
        if self._closed:
            return
        notice = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": reason},
        }
        task = supervise(self._notify(notice, headers), name=f"mcp-cancel:{request_id}")
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _notify(self, notice: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            await self._transport.post(notice, headers, CANCEL_NOTICE_SECONDS)
        except (AgentUnavailable, SessionLost) as error:
            # Best effort: an agent that is gone, or forgot the session, runs nothing of it.
            logger.info("cancelling a tool call on %s's agent: %s", self.endpoint.user_id, error)

    async def _call(
        self, operation: str, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        try:
            generation = await self._current()
            try:
                return await self._request(method, params, timeout)
            except SessionLost:
                pass
            await self._reopen(generation, "the agent forgot our MCP session")
            try:
                return await self._request(method, params, timeout)
            except SessionLost as error:
                raise AgentUnavailable("the agent forgot the new MCP session too") from error
        except _RpcError as error:
            raise AgentUnavailable(f"{operation}: {error}") from error
        except AgentUnavailable as error:  # AgentTimeout stays AgentTimeout
            raise type(error)(f"{operation}: {error}") from error

    async def list_tools(self) -> list[ToolSpec]:
        """The agent's tools, cached for the session's life (asked once however many ask)."""
        if self._closed:
            raise AgentUnavailable("list_tools: the MCP session was closed")
        if self._tools is None:
            async with self._listing:
                if self._tools is None:
                    answer = await self._call("list_tools", "tools/list", {}, self._read_timeout)
                    result = self._parse(ListToolsResult, answer, "list_tools")
                    self._tools = [
                        ToolSpec(tool.name, tool.description or "", dict(tool.inputSchema or {}))
                        for tool in result.tools
                    ]
        return self._tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutcome:
        """Call a tool; its result as text (what the model is given) and whether it failed.

        The structured result is not checked against the tool's output schema (the SDK's
        ``ClientSession.call_tool`` does): the gateway uses only the text, and that check had
        jsonschema validate the schema itself on every call (1.4 ms of CPU)."""
        operation = f"call_tool {name}"
        try:
            answer = await self._call(
                operation,
                "tools/call",
                {"name": name, "arguments": dict(arguments)},
                self._tool_timeout,
            )
        except AnswerTooLarge as error:
            # This call failed, the session did not: the model is told, and can ask for less.
            return ToolOutcome(content=f"{name} failed: {error}", is_error=True)
        result = self._parse(CallToolResult, answer, operation)
        return ToolOutcome(content=_text_of(result), is_error=bool(result.isError))

    async def read_resource(self, uri: str) -> str:
        operation = f"read_resource {uri}"
        answer = await self._call(operation, "resources/read", {"uri": uri}, self._read_timeout)
        result = self._parse(ReadResourceResult, answer, operation)
        texts = [c.text for c in result.contents if isinstance(c, TextResourceContents)]
        return "\n".join(texts)

    async def read_json_resource(self, uri: str, default: Any) -> Any:
        text = await self.read_resource(uri)
        try:
            return json.loads(text) if text else default
        except json.JSONDecodeError:
            return default

    @staticmethod
    def _parse(model: type[_Result], answer: dict[str, Any], operation: str) -> _Result:
        try:
            return model.model_validate(answer)
        except ValidationError as error:
            raise AgentUnavailable(f"{operation}: the agent's result is malformed") from error


__all__ = [
    "CLIENT_INFO",
    "DEFAULT_READ_SECONDS",
    "AgentSession",
    "AgentTimeout",
    "AgentUnavailable",
    "ToolOutcome",
    "ToolSpec",
    "map_host",
]
