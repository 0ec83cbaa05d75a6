"""The MCP adapter: one streamable-HTTP session to one user's agent.

The client speaks MCP's streamable HTTP transport directly, over aiohttp: each JSON-RPC
request is one POST, answered with JSON or with a server-sent event stream that carries the
response. The SDK's client (anyio memory streams, a task group and httpx under every call)
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
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
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

from dexorder.gateway.http_body import ended_within
from dexorder.gateway.llm import EncodedTools
from dexorder.gateway.provisioning.base import AgentEndpoint
from dexorder.gateway.sse import DEFAULT_EVENT, SSEReader, read_events

logger = logging.getLogger(__name__)

CLIENT_INFO = {"name": "dexorder-gateway", "version": "0.1.0"}

_SESSION_HEADER = "mcp-session-id"
_VERSION_HEADER = "mcp-protocol-version"
_ACCEPT = "application/json, text/event-stream"
# Idle connections are dropped before the agent's server (uvicorn: 5 s) closes them, so a
# request never goes out on a connection the agent is closing at that moment.
_KEEPALIVE_SECONDS = 2.0
_METHOD_NOT_FOUND = -32601
# An event of a streamed answer is one line; a tool's result can be large. aiohttp refuses
# lines over twice this.
_READ_BUFFER = 4 * 1024 * 1024
#: The longest event line taken (a tool's whole result can come in one): what aiohttp's line
#: reader allowed with this read buffer.
_MAX_EVENT_LINE = 2 * _READ_BUFFER

#: How long a read (a resource, the tool list) may take by default (DEXORDER_AGENT_READ_SECONDS).
DEFAULT_READ_SECONDS = 30.0

_Result = TypeVar("_Result", ListToolsResult, CallToolResult, ReadResourceResult)


class AgentUnavailable(Exception):
    """The user's agent could not be reached, or broke the protocol."""

    code = "agent_unavailable"


class AgentTimeout(AgentUnavailable):
    """The agent did not answer in time. It may be busy rather than gone, so the session
    (shared by the user's other chats) is kept: the caller fails, the session does not."""


class _Disconnected(AgentUnavailable):
    """The agent closed the connection before answering (as a pooled one it is closing)."""


class _SessionLost(Exception):
    """The agent answered 404 for our session id: it forgot the session, and ran nothing."""


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
        timeout: float = 30.0,
        connect_grace: float = 0.0,
        read_timeout: float = DEFAULT_READ_SECONDS,
        tool_timeout: float = 300.0,
        on_session: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._url = map_host(endpoint.url, host_map or {})
        self._connect_timeout = timeout
        self._connect_grace = connect_grace
        # A broken agent may never answer; tools (a backtest) may legitimately take longer
        # than reading a resource.
        self._read_timeout = read_timeout
        self._tool_timeout = tool_timeout
        self._http: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {"Accept": _ACCEPT, "Content-Type": "application/json"}
        if endpoint.token:
            self._headers["Authorization"] = f"Bearer {endpoint.token}"
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
        self._openai_tools: EncodedTools | None = None
        self._listing = asyncio.Lock()
        self.sessions_opened = 0
        #: The agent's id for the current MCP session (the ``mcp-session-id`` header);
        #: None before the first open, and for a server that keeps no sessions.
        self.mcp_session_id: str | None = None
        self._on_session = on_session

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

    # --- the transport: one POST a message ---------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise AgentUnavailable("the MCP session was closed")
        if self._http is None:
            # No cap on connections: a session carries every conversation of its user in
            # this process, and each request holds its connection until the reply (a
            # backtest: minutes); a cap would queue the others behind slow tools. Each
            # conversation runs one turn at a time, which bounds them.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_SECONDS),
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                read_bufsize=_READ_BUFFER,
            )
        return self._http

    def _session_headers(self) -> dict[str, str]:
        headers = dict(self._headers)
        if self.mcp_session_id is not None:
            headers[_SESSION_HEADER] = self.mcp_session_id
        return headers

    async def _post(
        self, message: dict[str, Any], headers: Mapping[str, str], timeout: float
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Send one JSON-RPC message; the response to it (None for a notification) and the
        session id the server gave in its headers."""
        http = self._client()
        try:
            async with asyncio.timeout(timeout):
                async with http.post(
                    self._url, data=json.dumps(message), headers=headers
                ) as response:
                    session_id = response.headers.get(_SESSION_HEADER)
                    if response.status == 404 and _SESSION_HEADER in headers:
                        raise _SessionLost
                    if response.status >= 400:
                        body = (await response.text(errors="replace"))[:200]
                        raise AgentUnavailable(
                            f"the agent answered HTTP {response.status}: {body}".rstrip(": ")
                        )
                    if "method" not in message or "id" not in message:
                        # A notification, or our answer to the server: 202, no body.
                        await response.read()
                        return None, session_id
                    if response.content_type == "text/event-stream":
                        found = await self._response_in_stream(response, message["id"], headers)
                        # The server ends the stream after the answer: wait for that end,
                        # or the connection is closed rather than pooled (http_body).
                        await ended_within(response)
                    else:
                        found = self._response_in(await response.read(), message["id"])
                    if found is None:
                        raise AgentUnavailable("the agent's answer held no response")
                    return found, session_id
        except aiohttp.ConnectionTimeoutError as error:
            # Also a TimeoutError, but no connection was made: unreachable, not busy.
            raise AgentUnavailable(f"the agent could not be reached ({error!r})") from error
        except TimeoutError as error:
            raise AgentTimeout(f"the agent did not answer in {timeout:g} s") from error
        except aiohttp.ServerDisconnectedError as error:
            if self._closed:
                raise AgentUnavailable("the MCP session was closed") from error
            raise _Disconnected(f"the agent closed the connection ({error!r})") from error
        except (aiohttp.ClientError, OSError, ValueError) as error:
            # ValueError: an event line longer than the read buffer.
            if self._closed:
                raise AgentUnavailable("the MCP session was closed") from error
            raise AgentUnavailable(f"the agent did not answer ({error!r})") from error

    @staticmethod
    def _response_in(body: bytes, request_id: int) -> dict[str, Any] | None:
        try:
            message = json.loads(body)
        except ValueError as error:
            raise AgentUnavailable(f"the agent's answer is not JSON: {error}") from error
        if isinstance(message, dict) and message.get("id") == request_id:
            return message
        return None

    async def _response_in_stream(
        self, response: aiohttp.ClientResponse, request_id: int, headers: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """Read events until the one that answers ``request_id``; notifications on the way
        are passed over, and requests from the server are answered."""
        reader = SSEReader(_MAX_EVENT_LINE, kinds=(DEFAULT_EVENT,))
        async with contextlib.aclosing(read_events(response, reader)) as events:
            async for data in events:
                try:
                    message = json.loads(data)
                except ValueError as error:
                    raise AgentUnavailable(
                        f"the agent sent an event that is not JSON: {error}"
                    ) from error
                if not isinstance(message, dict):
                    continue
                if "method" in message and "id" in message:
                    await self._answer_server_request(message, headers)
                elif message.get("id") == request_id and "method" not in message:
                    return message
        return None

    async def _answer_server_request(
        self, request: dict[str, Any], headers: Mapping[str, str]
    ) -> None:
        # The client declares no capabilities (no sampling, roots or elicitation), so a
        # well-behaved server asks nothing but ping; anything else is refused, not ignored,
        # so the server's own request does not hang.
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if request.get("method") == "ping":
            answer["result"] = {}
        else:
            answer["error"] = {"code": _METHOD_NOT_FOUND, "message": "not supported by the client"}
        await self._post(answer, headers, self._read_timeout)

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
        answer, session_id = await self._post(request, self._headers, self._read_timeout)
        version = str(self._result_of(answer, "initialize").get("protocolVersion", ""))
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise AgentUnavailable(f"the agent speaks MCP {version!r}, which we do not")
        headers = dict(self._headers)
        headers[_VERSION_HEADER] = version
        if session_id is not None:
            headers[_SESSION_HEADER] = session_id
        notice = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await self._post(notice, headers, self._read_timeout)
        return session_id, version

    async def _open(self) -> None:
        try:
            session_id, version = await self._handshake()
        except (AgentUnavailable, _SessionLost, _RpcError) as error:
            raise AgentUnavailable(f"cannot open an MCP session with the agent: {error}") from error
        if self._closed:
            # Closed while this open was under way: nobody would close what it opened.
            await self._end_remotely(session_id, version)
            raise AgentUnavailable("the MCP session was closed")
        self._headers[_VERSION_HEADER] = version
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
        session_id, self.mcp_session_id = self.mcp_session_id, None
        self._open_now = False
        await self._end_remotely(session_id, self._headers.get(_VERSION_HEADER))
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def _end_remotely(self, session_id: str | None, version: str | None) -> None:
        """Tell the agent the session is over (a DELETE), so it frees it now rather than
        when it expires. Best effort: an agent that is gone has forgotten it anyway."""
        if session_id is None or self._http is None:
            return
        headers = {_SESSION_HEADER: session_id}
        if "Authorization" in self._headers:
            headers["Authorization"] = self._headers["Authorization"]
        if version is not None:
            headers[_VERSION_HEADER] = version
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(2.0), self._http.delete(self._url, headers=headers):
                pass

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
        message = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            answer, _ = await self._post(message, self._session_headers(), timeout)
        except _Disconnected:
            # A pooled connection the agent closed as the request went out (it restarted):
            # a read runs again on a new connection. A tool call does not: it may have run.
            if method == "tools/call":
                raise
            message["id"] = next(self._ids)
            answer, _ = await self._post(message, self._session_headers(), timeout)
        return self._result_of(answer, method)

    async def _call(
        self, operation: str, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        try:
            generation = await self._current()
            try:
                return await self._request(method, params, timeout)
            except _SessionLost:
                pass
            await self._reopen(generation, "the agent forgot our MCP session")
            try:
                return await self._request(method, params, timeout)
            except _SessionLost as error:
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

    async def openai_tools(self) -> EncodedTools:
        """The agent's tools in OpenAI's form, encoded once for the session's life."""
        if self._openai_tools is None:
            tools = await self.list_tools()
            self._openai_tools = EncodedTools(tool.as_openai_tool() for tool in tools)
        return self._openai_tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolOutcome:
        """Call a tool; its result as text (what the model is given) and whether it failed.

        The structured result is not checked against the tool's output schema (the SDK's
        ``ClientSession.call_tool`` does): the gateway uses only the text, and that check had
        jsonschema validate the schema itself on every call (1.4 ms of CPU)."""
        operation = f"call_tool {name}"
        answer = await self._call(
            operation,
            "tools/call",
            {"name": name, "arguments": dict(arguments)},
            self._tool_timeout,
        )
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
