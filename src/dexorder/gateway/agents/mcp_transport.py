"""MCP's streamable HTTP transport, over aiohttp: one POST a JSON-RPC message, answered with
JSON or with a server-sent event stream that carries the response.

What the transport knows is HTTP: the agent's URL, its bearer token, the pooled
connections, how a response or its event stream is read, and the server's own requests
met on the way (answered here: this client takes none but ``ping``). Which MCP session a
message belongs to is the caller's (``mcp_client``), given as headers; so is what to do
when the agent forgot it (``SessionLost``).

Errors: ``AgentUnavailable`` (unreachable, refused, broken), and ``AgentTimeout``, one of
them, for an agent that did not answer in time (busy, maybe, rather than gone); each drives
its own recovery in the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import aiohttp

from dexorder.gateway.http_body import ended_within
from dexorder.gateway.sse import DEFAULT_EVENT, SSEReader, read_events

SESSION_HEADER = "mcp-session-id"
VERSION_HEADER = "mcp-protocol-version"
_ACCEPT = "application/json, text/event-stream"
# Idle connections are dropped before the agent's server (uvicorn: 5 s) closes them, so a
# request never goes out on a connection the agent is closing at that moment.
_KEEPALIVE_SECONDS = 2.0
_METHOD_NOT_FOUND = -32601
# An event of a streamed answer is one line; a tool's result can be large.
_READ_BUFFER = 4 * 1024 * 1024
#: The longest event line taken (a tool's whole result can come in one): what aiohttp's line
#: reader allowed with this read buffer.
_MAX_EVENT_LINE = 2 * _READ_BUFFER

MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""The most of one answer read from an agent, by default: past it the call fails."""


class AgentUnavailable(Exception):
    """The user's agent could not be reached, or broke the protocol."""

    code = "agent_unavailable"


class AnswerTooLarge(AgentUnavailable):
    """The agent's answer to one call is longer than the client reads. The session is
    fine: only this call failed (a tool call shows it as the tool's error)."""


class AgentTimeout(AgentUnavailable):
    """The agent did not answer in time. It may be busy rather than gone, so the session
    (shared by the user's other chats) is kept: the caller fails, the session does not."""


class Disconnected(AgentUnavailable):
    """The agent closed the connection before answering (as a pooled one it is closing)."""


class SessionLost(Exception):
    """The agent answered 404 for our session id: it forgot the session, and ran nothing."""


Answer = tuple[dict[str, Any] | None, str | None]
"""The response to a message (None for a notification), and the session id the server gave
in its headers (None when it gave none)."""


class StreamableHTTP:
    """The HTTP side of one MCP client session; ``close`` ends it for good."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        connect_timeout: float,
        answer_timeout: float,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.url = url
        self._max_answer_bytes = max_answer_bytes
        self._connect_timeout = connect_timeout
        # How long our answer to a server's request (in the middle of a stream) may take.
        self._answer_timeout = answer_timeout
        self._headers: dict[str, str] = {"Accept": _ACCEPT, "Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise AgentUnavailable("the MCP session was closed")
        if self._http is None:
            # No cap on connections: a session carries every conversation of its user in
            # this process, and each request holds its connection until the reply (a
            # backtest: minutes); a cap would queue the others behind slow tools. Each
            # conversation runs one turn at a time, which bounds them.
            self._http = aiohttp.ClientSession(
                # No DNS cache: an agent's name resolves to its pod, and a new pod (woken,
                # restarted) has a new address; a cached old one would be connected to.
                connector=aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=_KEEPALIVE_SECONDS, use_dns_cache=False
                ),
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                read_bufsize=_READ_BUFFER,
            )
        return self._http

    async def post(
        self, message: dict[str, Any], session: Mapping[str, str], timeout: float
    ) -> Answer:
        """Send one JSON-RPC message with the ``session``'s headers (its id and protocol
        version, once it has them); see ``Answer``. Raises ``SessionLost`` when the agent no
        longer knows the session id sent."""
        headers = {**self._headers, **session}
        http = self._client()
        try:
            async with asyncio.timeout(timeout):
                async with http.post(
                    self.url, data=json.dumps(message), headers=headers
                ) as response:
                    session_id = response.headers.get(SESSION_HEADER)
                    if response.status == 404 and SESSION_HEADER in headers:
                        raise SessionLost
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
                        found = await self._response_in_stream(response, message["id"], session)
                        # The server ends the stream after the answer: wait for that end,
                        # or the connection is closed rather than pooled (http_body).
                        await ended_within(response)
                    else:
                        raw = await self._read_capped(response)
                        found = _response_in(raw, message["id"])
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
            raise Disconnected(f"the agent closed the connection ({error!r})") from error
        except (aiohttp.ClientError, OSError, ValueError) as error:
            # ValueError: an event line longer than we take (SSEReader).
            if self._closed:
                raise AgentUnavailable("the MCP session was closed") from error
            raise AgentUnavailable(f"the agent did not answer ({error!r})") from error

    def _too_large(self) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"the agent's answer is over {self._max_answer_bytes:,} bytes, the most read"
        )

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        while block := await response.content.readany():
            body += block
            if len(body) > self._max_answer_bytes:
                raise self._too_large()
        return bytes(body)

    async def _response_in_stream(
        self, response: aiohttp.ClientResponse, request_id: int, session: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """Read events until the one that answers ``request_id``; notifications on the way
        are passed over, and requests from the server are answered."""
        limit = self._max_answer_bytes
        # A line past the limit (a whole answer comes in one) is refused as it is read.
        reader = SSEReader(min(_MAX_EVENT_LINE, limit + 1024), kinds=(DEFAULT_EVENT,))
        read = 0
        async with contextlib.aclosing(read_events(response, reader)) as events:
            async for data in _capped_events(events, self._too_large):
                read += len(data)
                if read > limit:
                    raise self._too_large()
                try:
                    message = json.loads(data)
                except ValueError as error:
                    raise AgentUnavailable(
                        f"the agent sent an event that is not JSON: {error}"
                    ) from error
                if not isinstance(message, dict):
                    continue
                if "method" in message and "id" in message:
                    await self._answer_server_request(message, session)
                elif message.get("id") == request_id and "method" not in message:
                    return message
        return None

    async def _answer_server_request(
        self, request: dict[str, Any], session: Mapping[str, str]
    ) -> None:
        # The client declares no capabilities (no sampling, roots or elicitation), so a
        # well-behaved server asks nothing but ping; anything else is refused, not ignored,
        # so the server's own request does not hang.
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if request.get("method") == "ping":
            answer["result"] = {}
        else:
            answer["error"] = {"code": _METHOD_NOT_FOUND, "message": "not supported by the client"}
        await self.post(answer, session, self._answer_timeout)

    async def end_session(self, session_id: str | None, version: str | None) -> None:
        """Tell the agent the session is over (a DELETE), so it frees it now rather than
        when it expires. Best effort: an agent that is gone has forgotten it anyway."""
        if session_id is None or self._http is None:
            return
        headers = {SESSION_HEADER: session_id}
        if "Authorization" in self._headers:
            headers["Authorization"] = self._headers["Authorization"]
        if version is not None:
            headers[VERSION_HEADER] = version
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(2.0), self._http.delete(self.url, headers=headers):
                pass

    async def close(self, session_id: str | None, version: str | None) -> None:
        """End the session remotely, then close the connections; later posts raise
        ``AgentUnavailable``."""
        if self._closed:
            return
        self._closed = True
        await self.end_session(session_id, version)
        http, self._http = self._http, None
        if http is not None:
            await http.close()


async def _capped_events(
    events: AsyncGenerator[bytes, None], too_large: Callable[[], AnswerTooLarge]
) -> AsyncGenerator[bytes, None]:
    """``events``, with a line longer than the reader takes reported as ``too_large``."""
    try:
        async for data in events:
            yield data
    except ValueError as error:
        raise too_large() from error


def _response_in(body: bytes, request_id: int) -> dict[str, Any] | None:
    try:
        message = json.loads(body)
    except ValueError as error:
        raise AgentUnavailable(f"the agent's answer is not JSON: {error}") from error
    if isinstance(message, dict) and message.get("id") == request_id:
        return message
    return None


__all__ = [
    "MAX_ANSWER_BYTES",
    "SESSION_HEADER",
    "VERSION_HEADER",
    "AgentTimeout",
    "AgentUnavailable",
    "Answer",
    "AnswerTooLarge",
    "Disconnected",
    "SessionLost",
    "StreamableHTTP",
]
