"""The per-chat-turn path of a real agent: structured results, a quiet log, no waiting on saves."""

from __future__ import annotations

import asyncio

from dexorder.devenv.agent import AgentProcess
from tests.integration.agent.mcp_helpers import call, connect, read_json

TURN = [{"role": "user", "content": "how is ETH doing?"}, {"role": "assistant", "content": "up"}]


async def test_every_tool_still_advertises_an_object_output_schema(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        listed = (await session.list_tools()).tools
    assert listed
    for tool in listed:
        assert tool.outputSchema is not None, tool.name
        assert tool.outputSchema["type"] == "object", tool.name


async def test_the_log_has_no_line_per_request_at_info(agent: AgentProcess) -> None:
    async with connect(agent) as session:
        for _ in range(3):
            await call(session, "append_turns", session_id="quiet-log", turns=TURN)
            await read_json(session, "dexorder://preferences")
    log = (agent.data_dir / "agent.log").read_text(encoding="utf-8")
    assert "Processing request of type" not in log


async def test_turns_and_reads_are_served_while_a_large_dataset_save_is_under_way(
    agent: AgentProcess,
) -> None:
    rows = "\n".join(f"{1_700_000_000 + 60 * t},1,2,0.5,1.5,10" for t in range(100_000))
    csv = "timestamp,open,high,low,close,volume\n" + rows
    appended: list[int] = []
    async with connect(agent) as saver, connect(agent) as chat:
        save = asyncio.create_task(
            call(saver, "save_dataset", name="large-while-chatting", data=csv, format="csv")
        )
        while not save.done() or len(appended) < 3:
            result = await call(chat, "append_turns", session_id="during-save", turns=TURN)
            appended.extend(result["ids"])
            assert (await read_json(chat, "dexorder://preferences"))["language"]
            await asyncio.sleep(0.005)
        assert (await save)["rows"] == 100_000
        history = await read_json(chat, "dexorder://history/during-save")
    # Each acknowledged turn is stored once, in order (the resource holds the last 50).
    assert [turn["id"] for turn in history] == appended[-50:]
