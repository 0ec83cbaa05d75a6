"""A tool's result is capped: the user, the usage events and the model see the same cut."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.events import ToolCallEvent, event_from_json
from tests.integration.gateway.conftest import (
    RunningGateway,
    gateway_settings,
    open_chat,
    serve_gateway,
)

CAP = 1024
LONG_NOTE = "likes ETH " * 400  # 4,000 bytes, echoed by the agent's remember tool


@pytest.fixture
async def capped_gateway(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, tool_result_max_bytes=CAP)
    async with serve_gateway(settings) as running:
        yield running


async def test_a_long_tool_result_is_cut_alike_in_frames_events_and_the_prompt(
    capped_gateway: RunningGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    tmp_path: Path,
) -> None:
    llm.queue(ToolScript(name="remember", arguments={"text": LONG_NOTE, "tags": ["pref"]}))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, capped_gateway, issuer, user_id)
        await client.send({"type": "message", "content": "remember this"})
        frames = await client.until("done", timeout=90)
        await client.ws.close()
    shown = next(f for f in frames if f["type"] == "tool_result")["content"]
    kept, _, notice = shown.rpartition("\n")
    assert len(kept.encode()) <= CAP
    assert notice.startswith("[truncated: ")
    # The model was given the same cut result.
    prompt = llm.requests[-1].body["messages"]
    assert [m["content"] for m in prompt if m["role"] == "tool"] == [shown]
    # And the usage events recorded it.
    path = tmp_path / "events" / f"events-{dt.datetime.now(dt.UTC).date().isoformat()}.jsonl"
    async with asyncio.timeout(10):
        while True:
            events = [event_from_json(line) for line in path.read_bytes().splitlines()]
            calls = [e for e in events if isinstance(e, ToolCallEvent) and e.user_id == user_id]
            if calls:
                break
            await asyncio.sleep(0.1)
    assert calls[0].result == shown
