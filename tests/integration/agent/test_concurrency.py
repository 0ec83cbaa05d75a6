"""Twenty MCP client sessions at once against one agent."""

from __future__ import annotations

import asyncio

from dexorder.devenv.agent import AgentProcess
from tests.integration.agent.mcp_helpers import call, connect, read_json

SESSIONS = 20


async def _one_client(agent: AgentProcess, number: int) -> None:
    async with connect(agent) as session:
        kept = await call(
            session, "remember", text=f"fact number{number} for client", tags=[f"c{number}"]
        )
        turns = [
            {"role": "user", "content": f"hello from {number}"},
            {"role": "assistant", "content": f"hi {number}"},
        ]
        await call(session, "append_turns", session_id=f"concurrent-{number}", turns=turns)
        found = await call(session, "recall", query=f"number{number}", k=5)
        assert [memory["id"] for memory in found["memories"]] == [kept["id"]]
        history = await read_json(session, f"dexorder://history/concurrent-{number}")
        assert [turn["content"] for turn in history] == [f"hello from {number}", f"hi {number}"]
        indicator = await call(
            session, "indicators", name="sma", prices=[number, number + 2], period=2
        )
        assert indicator["values"] == [None, number + 1]


async def test_twenty_concurrent_sessions_each_see_their_own_writes(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        before = await read_json(session, "dexorder://profile")
    await asyncio.gather(*(_one_client(agent, number) for number in range(SESSIONS)))
    async with connect(agent) as session:
        after = await read_json(session, "dexorder://profile")
    added = {key: after[key] - before[key] for key in ("memories", "sessions", "turns")}
    assert added == {"memories": SESSIONS, "sessions": SESSIONS, "turns": 2 * SESSIONS}
