"""The fake LLM's mid-stream failures over raw HTTP: a stream that stalls, one that breaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer
from dexorder.devenv.fake_llm.scripts import SCRIPT_ADAPTER

TEXT = "one two three four five six"


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    fake = FakeLLMServer(
        scripts={"stall": FailureScript(failure="stall_midway", chunks_before_break=3, text=TEXT)}
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_a_stall_sends_some_chunks_then_nothing_until_the_client_gives_up(
    server: FakeLLMServer,
) -> None:
    body = {"model": "stall", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    received: list[str] = []
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{server.base_url}/chat/completions", json=body)
        assert reply.status == 200

        async def read() -> None:
            async with asyncio.timeout(0.5):
                async for raw in reply.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        chunk = json.loads(line.removeprefix("data: "))
                        received.append(chunk["choices"][0]["delta"].get("content") or "")

        with pytest.raises(TimeoutError):
            await read()
        reply.close()
    record = await server.wait_for_end(within=2.0)
    assert "".join(received) == "one two "  # the role chunk, then two words
    assert record.stalled
    assert record.cut_by_client
    assert not record.broken_by_server
    assert not record.completed
    assert record.chunks_sent == 3
    assert record.summary()["stalled"] is True


async def test_a_stalled_stream_ends_when_the_server_stops() -> None:
    fake = FakeLLMServer(default=FailureScript(failure="stall_midway", chunks_before_break=1))
    await fake.start()
    async with aiohttp.ClientSession() as http:
        reply = await http.post(
            f"{fake.base_url}/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        await reply.content.readline()
        await asyncio.wait_for(fake.stop(), timeout=5)
        reply.close()
    assert fake.requests[0].stalled


def test_the_stall_script_travels_as_json() -> None:
    script = FailureScript(failure="stall_midway", chunks_before_break=2)
    assert SCRIPT_ADAPTER.validate_json(SCRIPT_ADAPTER.dump_json(script)) == script
