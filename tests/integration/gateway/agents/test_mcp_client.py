"""The MCP adapter against a real agent process: token, tools, and a new session after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp.server.fastmcp import Context, FastMCP
from pydantic import BaseModel

from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.process import free_port
from dexorder.gateway.agents.mcp_client import (
    AgentSession,
    AgentTimeout,
    AgentUnavailable,
    ToolOutcome,
    map_host,
)
from dexorder.gateway.agents.provisioning import AgentEndpoint
from tests.integration.gateway.conftest import serving


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    with AgentProcess("mcp-client-user") as process:
        yield process


async def test_tools_and_resources(agent: AgentProcess) -> None:
    async with AgentSession(AgentEndpoint(agent.user_id, agent.url, agent.token)) as session:
        names = {tool.name for tool in await session.list_tools()}
        assert {"remember", "recall", "append_turns", "backtest"} <= names
        outcome = await session.call_tool("remember", {"text": "likes BTC", "tags": ["coins"]})
        assert not outcome.is_error
        assert "likes BTC" in outcome.content
        assert await session.read_json_resource("dexorder://preferences", None) is not None


async def test_a_restarted_agent_gets_a_new_session(agent: AgentProcess) -> None:
    session = AgentSession(AgentEndpoint(agent.user_id, agent.url, agent.token))
    try:
        await session.list_tools()
        # Same port and data; the new process knows nothing of our session id.
        await asyncio.to_thread(agent.restart)
        outcome = await session.call_tool("recall", {"query": "anything", "k": 3})
        assert not outcome.is_error
        assert session.sessions_opened == 2
    finally:
        await session.close()


async def test_wrong_token_is_agent_unavailable(agent: AgentProcess) -> None:
    session = AgentSession(AgentEndpoint(agent.user_id, agent.url, "not-the-token-at-all"))
    with pytest.raises(AgentUnavailable):
        await session.list_tools()
    await session.close()


async def test_an_agent_that_answers_late_is_waited_for_on_the_first_open(
    tmp_path: Path,
) -> None:
    # Ready in Kubernetes comes before the Service routes to the pod: the first open retries.
    late = AgentProcess("late-user", data_dir=tmp_path / "late")
    impatient = AgentSession(AgentEndpoint(late.user_id, late.url, late.token))
    with pytest.raises(AgentUnavailable):
        await impatient.list_tools()
    await impatient.close()

    patient = AgentSession(AgentEndpoint(late.user_id, late.url, late.token), connect_grace=60)
    starting = asyncio.create_task(asyncio.to_thread(late.start))
    try:
        assert "recall" in {tool.name for tool in await patient.list_tools()}
        assert patient.sessions_opened == 1
    finally:
        await patient.close()
        try:
            await starting
        finally:
            late.stop()


def test_host_map_rewrites_only_mapped_hosts() -> None:
    mapping = {"ua-x-agent.agents.svc:8000": "127.0.0.1:5555"}
    assert map_host("http://ua-x-agent.agents.svc:8000/mcp", mapping) == "http://127.0.0.1:5555/mcp"
    assert map_host("http://other:8000/mcp", mapping) == "http://other:8000/mcp"


async def test_closing_ends_the_session_on_the_agent(agent: AgentProcess) -> None:
    session = AgentSession(AgentEndpoint(agent.user_id, agent.url, agent.token))
    await session.list_tools()
    ended = session.mcp_session_id
    assert ended is not None
    await session.close()
    assert session.closed
    with pytest.raises(AgentUnavailable):
        await session.list_tools()
    # The agent was told (a DELETE): it no longer knows the session id.
    headers = {
        "Authorization": f"Bearer {agent.token}",
        "Accept": "application/json, text/event-stream",
        "mcp-session-id": ended,
    }
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(agent.url, json=request, headers=headers) as response,
    ):
        assert response.status == 404


def sdk_server(*, json_response: bool, stateless: bool) -> FastMCP[Any]:
    server: FastMCP[Any] = FastMCP(
        "other", json_response=json_response, stateless_http=stateless, log_level="WARNING"
    )

    @server.tool()
    async def echo(text: str, ctx: Context[Any, Any, Any]) -> str:
        # A log notification and progress go out in the same event stream, before the result.
        await ctx.info(f"echoing {text}")
        await ctx.report_progress(0.5, 1.0)
        return text.upper()

    @server.tool()
    async def ask(ctx: Context[Any, Any, Any]) -> str:
        # A request from the server to the client, which declared no elicitation.
        answer = await ctx.elicit("Are you sure?", schema=Confirmation)
        return str(answer)

    @server.resource("notes://today")
    def today() -> str:
        return '{"note": "buy low"}'

    return server


class Confirmation(BaseModel):
    sure: bool


async def test_a_server_that_answers_in_event_streams() -> None:
    async with (
        serving(sdk_server(json_response=False, stateless=False)) as url,
        AgentSession(AgentEndpoint("sse-user", url, "")) as session,
    ):
        assert {tool.name for tool in await session.list_tools()} == {"echo", "ask"}
        outcome = await session.call_tool("echo", {"text": "hello"})
        assert outcome == ToolOutcome(content="HELLO", is_error=False)
        assert await session.read_json_resource("notes://today", None) == {"note": "buy low"}
        # The server's request is refused at once: the tool fails instead of hanging.
        refused = await asyncio.wait_for(session.call_tool("ask", {}), timeout=10)
        assert refused.is_error
        assert session.mcp_session_id is not None
        assert session.sessions_opened == 1


async def test_answers_in_event_streams_leave_the_connection_pooled() -> None:
    # The SDK's server ends each event stream just after the answer; a client that let the
    # response go before that end would close the connection and open one per request.
    peers: list[tuple[str, int]] = []
    async with (
        serving(sdk_server(json_response=False, stateless=False), peers=peers) as url,
        AgentSession(AgentEndpoint("sse-user", url, "")) as session,
    ):
        for _ in range(5):
            outcome = await session.call_tool("echo", {"text": "again"})
            assert outcome == ToolOutcome(content="AGAIN", is_error=False)
    # initialize, initialized, five calls (the session's DELETE on close comes last).
    assert len(peers) >= 7
    assert len(set(peers[:7])) == 1, f"requests came over {len(set(peers[:7]))} connections"


async def test_a_server_that_keeps_no_sessions() -> None:
    async with (
        serving(sdk_server(json_response=True, stateless=True)) as url,
        AgentSession(AgentEndpoint("stateless-user", url, "")) as session,
    ):
        outcomes = await asyncio.gather(
            *(session.call_tool("echo", {"text": f"n{i}"}) for i in range(5))
        )
        assert [o.content for o in outcomes] == [f"N{i}" for i in range(5)]
        assert session.mcp_session_id is None
        assert session.is_open


@contextlib.asynccontextmanager
async def answering(status: int, body: str, content_type: str) -> AsyncIterator[str]:
    """A server at the MCP URL that answers every POST the same way."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_post("/mcp", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "body", "content_type", "said"),
    [
        (500, "boom", "text/plain", "HTTP 500: boom"),
        (200, "this is not json", "application/json", "not JSON"),
        (200, '{"jsonrpc": "2.0", "id": 999, "result": {}}', "application/json", "no response"),
        (
            200,
            '{"jsonrpc": "2.0", "id": 1, "error": {"code": -32600, "message": "no thanks"}}',
            "application/json",
            "no thanks",
        ),
    ],
)
async def test_a_broken_server_is_agent_unavailable_with_the_reason(
    status: int, body: str, content_type: str, said: str
) -> None:
    async with answering(status, body, content_type) as url:
        session = AgentSession(AgentEndpoint("broken-user", url, ""))
        try:
            with pytest.raises(AgentUnavailable, match=said):
                await session.list_tools()
        finally:
            await session.close()


async def test_a_read_past_its_timeout_is_agent_timeout_and_the_session_goes_on() -> None:
    server: FastMCP[Any] = FastMCP("busy", json_response=True, log_level="WARNING")

    @server.resource("notes://slow")
    async def slow() -> str:
        await asyncio.sleep(2)
        return "late"

    @server.resource("notes://fast")
    def fast() -> str:
        return "now"

    async with serving(server) as url:
        endpoint = AgentEndpoint("busy-user", url, None)
        async with AgentSession(endpoint, read_timeout=0.5) as session:
            with pytest.raises(AgentTimeout, match=r"did not answer in 0\.5 s"):
                await session.read_resource("notes://slow")
            assert await session.read_resource("notes://fast") == "now"
            assert session.sessions_opened == 1
            assert not session.closed


async def test_an_agent_that_refuses_connections_is_unavailable_not_late() -> None:
    endpoint = AgentEndpoint("gone-user", f"http://127.0.0.1:{free_port()}/mcp", None)
    session = AgentSession(endpoint, read_timeout=0.5)
    try:
        with pytest.raises(AgentUnavailable) as caught:
            await session.list_tools()
    finally:
        await session.close()
    assert not isinstance(caught.value, AgentTimeout)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port where a connect never completes: a listener whose accept queue is full, so the
    kernel drops further SYNs, as no host answers at a deleted pod's old address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))  # the later ones stay half-open, which is the point
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize(
    "short_timeouts",
    [
        pytest.param(True, id="short connect timeout"),
        # With the defaults too: a connect timeout as long as the read timeout made a gone
        # pod look busy (AgentTimeout), so the agent was neither dropped nor woken.
        pytest.param(False, id="defaults"),
    ],
)
async def test_an_agent_whose_connection_never_completes_is_unavailable_not_late(
    short_timeouts: bool,
) -> None:
    with black_hole() as port:
        endpoint = AgentEndpoint("unreachable-user", f"http://127.0.0.1:{port}/mcp", None)
        session = (
            AgentSession(endpoint, connect_timeout=0.3, read_timeout=5)
            if short_timeouts
            else AgentSession(endpoint)
        )
        try:
            with pytest.raises(AgentUnavailable, match="could not be reached") as caught:
                await session.list_tools()
        finally:
            await session.close()
    assert not isinstance(caught.value, AgentTimeout)


async def test_an_answer_past_the_byte_limit_fails_that_call_alone(agent: AgentProcess) -> None:
    endpoint = AgentEndpoint(agent.user_id, agent.url, agent.token)
    async with AgentSession(endpoint, max_answer_bytes=4096) as session:
        # The agent's remember echoes what it keeps: here, twice the limit.
        failed = await session.call_tool("remember", {"text": "x" * 8192})
        assert failed.is_error
        assert "over 4,096 bytes" in failed.content
        # The session is fine: the next call, under the limit, goes through.
        kept = await session.call_tool("remember", {"text": "short"})
        assert not kept.is_error
        assert "short" in kept.content


def slow_server() -> tuple[FastMCP[Any], asyncio.Event, list[str]]:
    """The SDK's server with a tool that works until it is cancelled; records the call
    starting (the event) and each cancellation's reason as the server saw it."""
    server: FastMCP[Any] = FastMCP("slow", log_level="WARNING")
    started = asyncio.Event()
    reasons: list[str] = []

    @server.tool()
    async def crunch(ctx: Context[Any, Any, Any]) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            reasons.append("cancelled")
            raise
        return "finished"

    @server.tool()
    async def quick() -> str:
        return "quick"

    return server, started, reasons


async def polled_until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - plain state, polled
            await asyncio.sleep(0.02)


async def test_a_tool_call_stopped_midway_is_cancelled_on_the_server() -> None:
    server, started, reasons = slow_server()
    async with serving(server) as url, AgentSession(AgentEndpoint("stop-user", url, "")) as session:
        call = asyncio.create_task(session.call_tool("crunch", {}))
        await asyncio.wait_for(started.wait(), 10)
        call.cancel()  # the user pressed stop
        with pytest.raises(asyncio.CancelledError):
            await call
        # notifications/cancelled reached the server: it stopped the tool's work.
        await polled_until(lambda: reasons == ["cancelled"], 10)
        assert (await session.call_tool("quick", {})).content == "quick"
        assert session.sessions_opened == 1


async def test_a_tool_call_past_its_timeout_is_cancelled_on_the_server() -> None:
    server, started, reasons = slow_server()
    async with serving(server) as url:
        endpoint = AgentEndpoint("late-tool-user", url, "")
        async with AgentSession(endpoint, tool_timeout=0.5) as session:
            with pytest.raises(AgentTimeout):
                await session.call_tool("crunch", {})
            assert started.is_set()
            await polled_until(lambda: reasons == ["cancelled"], 10)
