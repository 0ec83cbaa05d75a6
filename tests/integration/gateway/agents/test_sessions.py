"""The shared-session pool against a real agent process: conversations share one MCP
session, a restarted agent gets one new session for all of them, and a gone agent fails
their calls at once instead of at the read timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from dexorder.devenv.agent import AgentProcess
from dexorder.gateway.agents.mcp_client import AgentUnavailable
from dexorder.gateway.agents.provisioning import AgentEndpoint
from dexorder.gateway.agents.sessions import AgentSessions, SessionHook


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    with AgentProcess("shared-session-user") as process:
        yield process


def recorder(told: list[str | None]) -> SessionHook:
    async def record(mcp_session_id: str | None) -> None:
        told.append(mcp_session_id)

    return record


async def test_conversations_share_one_session_across_an_agent_restart(
    agent: AgentProcess,
) -> None:
    pool = AgentSessions(linger=0)
    endpoint = AgentEndpoint(agent.user_id, agent.url, agent.token)
    first_told: list[str | None] = []
    second_told: list[str | None] = []
    first = pool.acquire(endpoint, host_map={}, connect_grace=0.0, on_session=recorder(first_told))
    second = pool.acquire(
        endpoint, host_map={}, connect_grace=0.0, on_session=recorder(second_told)
    )
    session = first.session
    try:
        assert second.session is session
        # Many calls at once from both holders: one session, one handshake.
        outcomes = await asyncio.gather(
            *(
                lease.session.read_json_resource("dexorder://preferences", None)
                for lease in [first, second] * 10
            ),
            *(
                lease.session.call_tool("recall", {"query": "x", "k": 1})
                for lease in [first, second] * 5
            ),
        )
        assert all(outcome is not None for outcome in outcomes)
        assert session.sessions_opened == 1
        assert first_told == second_told == [session.mcp_session_id]
        await second.report()  # a holder that joins an open session is told its id
        assert second_told == [session.mcp_session_id] * 2

        # The restarted agent forgot the session: every caller's 404 leads to one reopen.
        before = session.mcp_session_id
        await asyncio.to_thread(agent.restart)
        recalls = await asyncio.gather(
            *(
                lease.session.call_tool("recall", {"query": "y", "k": 1})
                for lease in [first, second] * 5
            )
        )
        assert not any(outcome.is_error for outcome in recalls)
        assert session.sessions_opened == 2
        assert session.mcp_session_id not in (None, before)
        assert first_told[-1] == second_told[-1] == session.mcp_session_id

        await first.release()
        assert not session.closed
        assert (await session.list_tools())[0].name
        await second.release()
        assert pool.sessions_of(agent.user_id) == []
        assert getattr(session, "closed")  # noqa: B009 - mypy holds the earlier `not closed`
    finally:
        await pool.close()


async def test_a_gone_agent_fails_calls_at_once_and_the_session_comes_back_with_it(
    agent: AgentProcess,
) -> None:
    pool = AgentSessions(linger=0)
    lease = pool.acquire(
        AgentEndpoint(agent.user_id, agent.url, agent.token), host_map={}, connect_grace=0.0
    )
    session = lease.session
    try:
        await session.list_tools()
        await asyncio.to_thread(agent.kill)
        # The first call ends the transport (its request cannot reach the agent), the next
        # finds it ended and cannot open another: both well before the 30 s read timeout.
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(AgentUnavailable):
                await session.read_json_resource("dexorder://preferences", None)
            assert time.monotonic() - started < 10
        assert not session.closed  # failing is not closing: that is the holders' call

        await asyncio.to_thread(agent.start)  # same port, token and data
        assert await session.read_json_resource("dexorder://preferences", None) is not None
        assert session.sessions_opened == 2
    finally:
        await lease.release()
        await pool.close()
