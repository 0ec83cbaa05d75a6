"""The scripted OpenAI-compatible server, read over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from dexorder.devenv.fake_llm import (
    DEMO_PRICES,
    OFFLINE_LABEL,
    FailureScript,
    FakeLLMProcess,
    FakeLLMServer,
    FakeLLMThread,
    OfflineScript,
    TextScript,
    ToolScript,
)

TEXT = "The quick brown fox jumps over the lazy dog."
RECALL_TOOL = {
    "type": "function",
    "function": {
        "name": "recall",
        "description": "Search the user's memory.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "k": {"type": "integer", "default": 5}},
            "required": ["query"],
        },
    },
}
INDICATORS_TOOL = {
    "type": "function",
    "function": {
        "name": "indicators",
        "parameters": {
            "type": "object",
            "properties": {
                "indicator": {"type": "string", "enum": ["sma", "ema", "rsi"]},
                "prices": {"type": "array", "items": {"type": "number"}},
                "period": {"type": "integer", "minimum": 2, "maximum": 3},
            },
            "required": ["indicator", "prices", "period"],
        },
    },
}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    fake = FakeLLMServer(
        scripts={
            "text": TextScript(text=TEXT),
            "tool": ToolScript(name="recall", arguments={"query": "btc"}),
            "fail-429": FailureScript(failure="rate_limit", retry_after=7),
            "fail-500": FailureScript(failure="server_error"),
            "fail-context": FailureScript(failure="context_window"),
            "fail-hang": FailureScript(failure="hang"),
            "fail-break": FailureScript(failure="break_midway", chunks_before_break=3),
        }
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(model: str, content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def read_sse(response: aiohttp.ClientResponse) -> list[Any]:
    """Each `data:` payload, JSON-decoded except the final `[DONE]`."""
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def stream(
    http: aiohttp.ClientSession, server: FakeLLMServer, body: dict[str, Any]
) -> list[Any]:
    async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return await read_sse(response)


def contents(events: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event["choices"]
    )


async def test_text_streams_word_by_word_with_usage_last(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    body = chat_body("text", stream=True, stream_options={"include_usage": True})
    events = await stream(http, server, body)
    assert contents(events) == TEXT
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [e for e in events[1:-3] if e["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == 9
    assert server.requests[0].completed
    assert not server.requests[0].cut_by_client


async def test_no_usage_chunk_unless_asked(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    events = await stream(http, server, chat_body("text", stream=True))
    assert all("usage" not in e for e in events if isinstance(e, dict))


async def test_non_streaming_reply_is_one_json_completion(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{server.base_url}/chat/completions", json=chat_body("text")) as reply:
        completion = await reply.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 9


async def test_models_endpoint_lists_the_scripts(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.base_url}/models") as reply:
        listing = await reply.json()
    names = {model["id"] for model in listing["data"]}
    assert {"text", "tool", "fail-429", "offline"} <= names


async def test_tool_round_then_an_answer_quoting_the_result(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    first = await stream(http, server, chat_body("tool", "what about btc?", stream=True))
    calls = [
        call
        for e in first
        if isinstance(e, dict)
        for choice in e["choices"]
        for call in choice["delta"].get("tool_calls") or []
    ]
    assert calls[0]["id"] == "call_0_0"
    assert calls[0]["function"]["name"] == "recall"
    assert len(calls) > 2, "arguments should arrive in several fragments"
    arguments = "".join(c["function"].get("arguments") or "" for c in calls)
    assert json.loads(arguments) == {"query": "btc"}
    assert first[-2]["choices"][0]["finish_reason"] == "tool_calls"

    followup = chat_body("tool", "what about btc?", stream=True)
    followup["messages"] += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0_0",
                    "type": "function",
                    "function": {"name": "recall", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0_0", "content": "btc was 42k on Monday"},
    ]
    second = await stream(http, server, followup)
    assert contents(second) == "The tool returned: btc was 42k on Monday"


async def test_queued_scripts_win_in_order(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    server.queue(TextScript(text="first"), TextScript(text="second"))
    answers = [contents(await stream(http, server, chat_body("text", stream=True))) for _ in "123"]
    assert answers == ["first", "second", TEXT]


async def test_replies_are_deterministic(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    body = chat_body("tool", stream=True, stream_options={"include_usage": True})
    raw = []
    for _ in range(2):
        server.reset()
        async with http.post(f"{server.base_url}/chat/completions", json=body) as reply:
            raw.append(await reply.read())
    assert raw[0] == raw[1]


async def test_rate_limit_is_429_with_retry_after(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{server.base_url}/chat/completions", json=chat_body("fail-429", stream=True)
    ) as reply:
        assert reply.status == 429
        assert reply.headers["Retry-After"] == "7"
        assert (await reply.json())["error"]["code"] == "rate_limit_exceeded"


async def test_server_error_is_500(server: FakeLLMServer, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{server.base_url}/chat/completions", json=chat_body("fail-500")
    ) as reply:
        assert reply.status == 500
        assert (await reply.json())["error"]["type"] == "server_error"


async def test_context_window_is_openais_400(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{server.base_url}/chat/completions", json=chat_body("fail-context")
    ) as reply:
        assert reply.status == 400
        error = (await reply.json())["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length" in error["message"]


async def test_hang_never_answers_and_records_the_hang_up(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            f"{server.base_url}/chat/completions",
            json=chat_body("fail-hang", stream=True),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    record = await server.wait_for_end()
    assert record.cut_by_client
    assert record.chunks_sent == 0


async def test_broken_stream_ends_without_done(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{server.base_url}/chat/completions", json=chat_body("fail-break", stream=True)
    ) as reply:
        assert reply.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_sse(reply)
    record = await server.wait_for_end()
    assert record.broken_by_server
    assert not record.completed
    assert record.chunks_sent == 3


async def test_client_hang_up_mid_stream_is_recorded_at_once(
    http: aiohttp.ClientSession,
) -> None:
    slow = FakeLLMServer(default=TextScript(text=TEXT * 10), tokens_per_second=2)
    await slow.start()
    try:
        reply = await http.post(
            f"{slow.base_url}/chat/completions", json=chat_body("any", stream=True)
        )
        await reply.content.readline()
        reply.close()  # drops the connection, as a cancelled LLM call does
        started = time.monotonic()
        record = await slow.wait_for_end(within=2.0)
        # The server sleeps 0.5 s between tokens; handler cancellation notices long before.
        assert time.monotonic() - started < 0.4
        assert record.cut_by_client
        assert not record.completed
        assert record.chunks_sent < 4
    finally:
        await slow.stop()


async def test_token_rate_paces_the_stream(http: aiohttp.ClientSession) -> None:
    paced = FakeLLMServer(default=TextScript(text=TEXT), tokens_per_second=50)
    await paced.start()
    try:
        started = time.monotonic()
        events = await stream(http, paced, chat_body("any", stream=True))
        elapsed = time.monotonic() - started
    finally:
        await paced.stop()
    assert contents(events) == TEXT
    assert 8 * 0.02 <= elapsed < 2.0  # nine words: eight gaps of 20 ms


async def test_offline_model_calls_recall_then_answers_with_it(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    body = chat_body("offline", "what did I say about ETH?", tools=[INDICATORS_TOOL, RECALL_TOOL])
    async with http.post(f"{server.base_url}/chat/completions", json=body) as reply:
        message = (await reply.json())["choices"][0]["message"]
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "recall"
    assert json.loads(call["function"]["arguments"]) == {"query": "what did I say about ETH?"}

    body["messages"] += [
        message,
        {"role": "tool", "tool_call_id": call["id"], "content": "ETH: buy below 2000"},
    ]
    async with http.post(f"{server.base_url}/chat/completions", json=body) as reply:
        answer = (await reply.json())["choices"][0]["message"]["content"]
    assert answer.startswith(OFFLINE_LABEL)
    assert "`recall` returned: ETH: buy below 2000" in answer


async def test_offline_model_picks_indicators_for_indicator_questions(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    body = chat_body("offline", "compute the RSI", tools=[RECALL_TOOL, INDICATORS_TOOL])
    async with http.post(f"{server.base_url}/chat/completions", json=body) as reply:
        call = (await reply.json())["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "indicators"
    assert json.loads(call["function"]["arguments"]) == {
        "indicator": "sma",
        "period": 3,
        "prices": DEMO_PRICES,
    }


async def test_offline_model_without_tools_says_it_is_offline(
    server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    events = await stream(http, server, chat_body("offline", "hi there", stream=True))
    assert contents(events).startswith(f'{OFFLINE_LABEL} You said: "hi there"')


async def test_bad_body_is_400(server: FakeLLMServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.base_url}/chat/completions", data=b"{nope") as reply:
        assert reply.status == 400
    async with http.post(f"{server.base_url}/chat/completions", json={"model": "x"}) as reply:
        assert reply.status == 400


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture
def process() -> Iterator[FakeLLMProcess]:
    with FakeLLMProcess(default="text") as fake:
        yield fake


def test_subprocess_form_serves_and_is_scripted_over_http(process: FakeLLMProcess) -> None:
    url = f"{process.base_url}/chat/completions"
    default = post_json(url, chat_body("anything"))
    assert default["choices"][0]["message"]["content"].startswith("Hello from the scripted")
    process.client.set_script("echo", TextScript(text="set over HTTP"))
    assert post_json(url, chat_body("echo"))["choices"][0]["message"]["content"] == "set over HTTP"
    process.client.queue(OfflineScript())
    offline = post_json(url, chat_body("echo", "ping"))["choices"][0]["message"]["content"]
    assert offline.startswith(OFFLINE_LABEL)
    recorded = process.client.requests()
    assert [r["script"] for r in recorded] == ["text", "text", "offline"]
    assert all(r["completed"] for r in recorded)
    process.client.reset()
    assert process.client.requests() == []


def test_subprocess_stops_and_leaves_nothing() -> None:
    fake = FakeLLMProcess()
    fake.start()
    pid = fake.pid
    assert pid is not None
    data_dir = fake.data_dir
    fake.stop()
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_thread_form_serves_synchronous_callers() -> None:
    with FakeLLMThread(default=TextScript(text="from a thread")) as fake:
        url = fake.describe()["url"]
        reply = post_json(f"{url}/chat/completions", chat_body("m"))
        assert reply["choices"][0]["message"]["content"] == "from a thread"
        assert fake.server is not None
        assert len(fake.server.requests) == 1
    assert fake.server is None
