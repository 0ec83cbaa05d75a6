"""The LLM adapter's litellm transport against the scripted OpenAI-compatible server, over real
HTTP. Models are called only through ``ModelRouter``: here one deployment, one walk, litellm's
transport, so what is seen is litellm's part alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import pytest

from dexorder.devenv.fake_llm import (
    FailureScript,
    FakeLLMServer,
    TextScript,
    ToolScript,
    count_prompt_tokens,
)
from dexorder.devenv.process import LOOPBACK, free_port
from dexorder.gateway.llm.adapter import (
    Finish,
    LLMError,
    LLMErrorCode,
    TextDelta,
    ToolCall,
    Usage,
    load_litellm,
)
from dexorder.gateway.llm.routing import ModelRouter, RoutedEvent, RouterPolicy
from dexorder.gateway.pure.routing import LLMTarget

TEXT = "Bitcoin closed higher today, while ether was flat."
LONG_TEXT = " ".join(f"word{i}" for i in range(200))
QUESTION = [{"role": "user", "content": "How did the market do?"}]
RECALL_TOOL = {
    "type": "function",
    "function": {
        "name": "recall",
        "description": "Search the user's memory.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[FakeLLMServer]:
    load_litellm()  # seconds, once: not inside any timed assertion
    fake = FakeLLMServer(
        scripts={
            "text": TextScript(text=TEXT),
            "slow": TextScript(text=LONG_TEXT, tokens_per_second=20),
            "tool": ToolScript(name="recall", arguments={"query": "market"}),
            "fail-429": FailureScript(failure="rate_limit", retry_after=7),
            "fail-500": FailureScript(failure="server_error"),
            "fail-context": FailureScript(failure="context_window"),
            "fail-hang": FailureScript(failure="hang"),
            "fail-break": FailureScript(failure="break_midway", chunks_before_break=4),
        }
    )
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(autouse=True)
def fresh_record(server: FakeLLMServer) -> None:
    server.reset()


async def one_round(
    target: LLMTarget,
    messages: Sequence[dict[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    timeout: float = 60.0,
) -> AsyncGenerator[RoutedEvent, None]:
    """One round on ``target`` alone, through litellm: no fallback, no second walk."""
    router = ModelRouter(
        {"only": [target]},
        RouterPolicy(timeout=timeout, rounds=1, cooldown_seconds=0),
        transport="litellm",
    )
    try:
        route = router.route_to("only", "the test's one deployment")
        async with contextlib.aclosing(router.stream(route, messages, tools=tools)) as events:
            async for event in events:
                yield event
    finally:
        await router.close()


async def collect(
    target: LLMTarget,
    messages: Sequence[dict[str, Any]] = QUESTION,
    **options: Any,
) -> list[RoutedEvent]:
    async with contextlib.aclosing(one_round(target, messages, **options)) as events:
        return [event async for event in events]


def causes(error: BaseException) -> list[BaseException]:
    found = []
    while error.__cause__ is not None:
        error = error.__cause__
        found.append(error)
    return found


def text_of(events: Sequence[RoutedEvent]) -> str:
    return "".join(event.content for event in events if isinstance(event, TextDelta))


async def test_text_streams_in_deltas_then_usage_then_finish(server: FakeLLMServer) -> None:
    events = await collect(server.target("text"))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == len(TEXT.split())
    assert text_of(events) == TEXT
    usage, finish = events[-2:]
    assert usage == Usage(
        prompt_tokens=count_prompt_tokens(server.requests[0].body),
        completion_tokens=len(TEXT.split()),
        total_tokens=count_prompt_tokens(server.requests[0].body) + len(TEXT.split()),
    )
    assert finish == Finish(reason="stop", model="openai/text")
    assert server.requests[0].completed


async def test_request_asks_for_a_stream_with_usage_and_no_retries(
    server: FakeLLMServer,
) -> None:
    await collect(server.target("text"), tools=[RECALL_TOOL])
    body = server.requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "text"
    assert body["messages"] == QUESTION
    assert body["tools"][0]["function"]["name"] == "recall"


async def test_tool_call_round_then_an_answer_with_its_result(server: FakeLLMServer) -> None:
    target = server.target("tool")
    first = await collect(target, tools=[RECALL_TOOL])
    calls = [e for e in first if isinstance(e, ToolCall)]
    assert calls == [ToolCall(id="call_0_0", name="recall", arguments_json='{"query": "market"}')]
    assert calls[0].arguments() == {"query": "market"}
    assert text_of(first) == ""
    assert first[-1] == Finish(reason="tool_calls", model="openai/tool")
    # Tool calls come after the stream, then usage, then the finish.
    assert [type(e) for e in first] == [ToolCall, Usage, Finish]

    followup: list[dict[str, Any]] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].id,
                    "type": "function",
                    "function": {"name": calls[0].name, "arguments": calls[0].arguments_json},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "you hold 2 BTC"},
    ]
    second = await collect(target, followup, tools=[RECALL_TOOL])
    assert text_of(second) == "The tool returned: you hold 2 BTC"
    assert second[-1] == Finish(reason="stop", model="openai/tool")


async def test_closing_the_generator_closes_the_upstream_stream(server: FakeLLMServer) -> None:
    events = one_round(server.target("slow"), QUESTION)
    received = [await anext(events) for _ in range(3)]
    assert all(isinstance(e, TextDelta) for e in received)
    closed_at = time.monotonic()
    await events.aclose()
    record = await server.wait_for_end(within=2.0)
    # Tokens come every 50 ms: the server noticed the hang-up well before the next one.
    assert time.monotonic() - closed_at < 0.5
    assert record.cut_by_client
    assert not record.completed
    assert record.chunks_sent < 10


async def test_cancelling_the_reading_task_closes_the_upstream_stream(
    server: FakeLLMServer,
) -> None:
    first_delta = asyncio.Event()

    async def relay() -> None:
        async with contextlib.aclosing(one_round(server.target("slow"), QUESTION)) as events:
            async for _ in events:
                first_delta.set()

    task = asyncio.create_task(relay())
    await asyncio.wait_for(first_delta.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await server.wait_for_end(within=2.0)
    assert record.cut_by_client
    assert not record.completed


@pytest.mark.parametrize(
    ("model", "code", "status", "retry_after"),
    [
        ("fail-429", LLMErrorCode.RATE_LIMITED, 429, 7.0),
        ("fail-500", LLMErrorCode.UPSTREAM_ERROR, 500, None),
        ("fail-context", LLMErrorCode.CONTEXT_WINDOW_EXCEEDED, 400, None),
    ],
)
async def test_http_errors_are_mapped_without_retries(
    server: FakeLLMServer,
    model: str,
    code: LLMErrorCode,
    status: int,
    retry_after: float | None,
) -> None:
    with pytest.raises(LLMError) as caught:
        await collect(server.target(model))
    error = caught.value
    assert (error.code, error.status, error.retry_after) == (code, status, retry_after)
    assert error.retryable
    assert not error.after_output
    # litellm's own exception: the cause of an error the router raises at once, or quoted in
    # the error it raises after its walk (the first deployment's failure).
    assert any(type(cause).__module__.startswith("litellm") for cause in causes(error)) or (
        "litellm." in str(error)
    )
    assert len(server.requests) == 1, "the SDK must not retry; fallback is the router's job"


async def test_a_hanging_server_times_out_and_the_connection_is_dropped(
    server: FakeLLMServer,
) -> None:
    started = time.monotonic()
    with pytest.raises(LLMError) as caught:
        await collect(server.target("fail-hang"), timeout=0.5)
    assert caught.value.code is LLMErrorCode.TIMEOUT
    assert caught.value.retryable
    assert 0.4 < time.monotonic() - started < 5
    record = await server.wait_for_end(within=2.0)
    assert record.cut_by_client


async def test_a_stream_broken_midway_says_text_was_already_shown(
    server: FakeLLMServer,
) -> None:
    shown: list[str] = []

    async def relay() -> None:
        async with contextlib.aclosing(one_round(server.target("fail-break"), QUESTION)) as it:
            async for event in it:
                if isinstance(event, TextDelta):
                    shown.append(event.content)

    with pytest.raises(LLMError) as caught:
        await relay()
    assert caught.value.code is LLMErrorCode.STREAM_BROKEN
    assert caught.value.after_output
    assert caught.value.retryable
    assert len(shown) == 3  # the role chunk, then three words, then the cut
    assert server.requests[0].broken_by_server


async def test_nothing_listening_is_a_connection_error() -> None:
    load_litellm()
    target = LLMTarget(
        model="openai/none", api_base=f"http://{LOOPBACK}:{free_port()}/v1", api_key="k"
    )
    with pytest.raises(LLMError) as caught:
        await collect(target, timeout=5)
    assert caught.value.code is LLMErrorCode.CONNECTION_ERROR
    assert caught.value.retryable


async def test_tool_arguments_that_are_not_an_object_are_an_error() -> None:
    with pytest.raises(LLMError) as caught:
        ToolCall(id="c", name="recall", arguments_json='{"query": ').arguments()
    assert caught.value.code is LLMErrorCode.INVALID_TOOL_CALL
    with pytest.raises(LLMError, match="not a JSON object"):
        ToolCall(id="c", name="recall", arguments_json="[1]").arguments()
    assert ToolCall(id="c", name="recall", arguments_json="").arguments() == {}


async def test_no_task_is_left_behind(server: FakeLLMServer) -> None:
    before = asyncio.all_tasks()
    await collect(server.target("text"))
    events = one_round(server.target("slow"), QUESTION)
    await anext(events)
    await events.aclose()
    await server.wait_for_end(within=2.0)
    await asyncio.sleep(0.2)  # let any library callbacks finish
    leftover = asyncio.all_tasks() - before
    # The server's own handler tasks end with their requests; nothing else may remain.
    assert leftover == set()
