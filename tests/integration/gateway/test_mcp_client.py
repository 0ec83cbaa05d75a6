"""The MCP adapter against a real agent process: token, tools, and a new session after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.devenv.agent import AgentProcess
from dexorder.gateway.mcp_client import AgentSession, AgentUnavailable, map_host
from dexorder.gateway.provisioning import AgentEndpoint


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
        agent.restart()  # same port and data; the new process knows nothing of our session id
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
