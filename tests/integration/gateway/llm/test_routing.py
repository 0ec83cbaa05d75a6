"""Routing and fallbacks, against three scripted OpenAI-style servers.

Each server answers by the model name a deployment asks for, so one route can chain servers
that fail in different ways: a 429, a 500, a hang (timeout), a context-window overflow, a
stream that breaks or stalls after text was shown. Every test runs over both transports: the
wire path that OpenAI-compatible deployments take by default, and LiteLLM's Router.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, Script, TextScript, ToolScript
from dexorder.gateway import metrics
from dexorder.gateway.llm.adapter import (
    Finish,
    LLMError,
    LLMErrorCode,
    TextDelta,
    ToolCall,
    Usage,
    load_litellm,
)
from dexorder.gateway.llm.routing import (
    CONTINUE_INSTRUCTION,
    Fallback,
    ModelRouter,
    RoutedEvent,
    RouterPolicy,
    Transport,
)
from dexorder.gateway.pure.routing import LLMTarget, RouteChoice, RouteSource

ANSWER = "Bitcoin closed higher today, while ether was flat."
BROKEN = "This reply will break before it is finished, in the middle of a sentence."
QUESTION = [{"role": "user", "content": "How did the market do?"}]
SCRIPTS: dict[str, Script] = {
    "text": TextScript(text=ANSWER),
    "tool": ToolScript(name="recall", arguments={"query": "market"}),
    "fail-429": FailureScript(failure="rate_limit", retry_after=1),
    "fail-500": FailureScript(failure="server_error"),
    "fail-hang": FailureScript(failure="hang"),
    "fail-context": FailureScript(failure="context_window"),
    "fail-break": FailureScript(failure="break_midway", chunks_before_break=4, text=BROKEN),
    "fail-break-early": FailureScript(failure="break_midway", chunks_before_break=1),
    "fail-stall": FailureScript(failure="stall_midway", chunks_before_break=4, text=BROKEN),
}
#: Short enough to keep the hang and stall tests quick, long enough for a loaded machine.
TIMEOUT = 1.0
FAST_POLICY = RouterPolicy(timeout=TIMEOUT, rounds=1, cooldown_seconds=0)


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer]]:
    load_litellm()  # seconds, once: not inside any timed assertion
    started = [FakeLLMServer(scripts=SCRIPTS) for _ in range(3)]
    for server in started:
        await server.start()
    try:
        yield started[0], started[1], started[2]
    finally:
        for server in started:
            await server.stop()


@pytest.fixture(autouse=True)
def fresh_records(servers: tuple[FakeLLMServer, ...]) -> None:
    for server in servers:
        server.reset()


_routers: list[ModelRouter] = []
_transport: list[Transport] = ["auto"]


@pytest.fixture(autouse=True, params=["auto", "litellm"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """Each test once per transport; the routers it made are closed after it."""
    _transport[0] = request.param
    yield request.param
    while _routers:
        await _routers.pop().close()


def make_router(
    groups: dict[str, list[LLMTarget]], policy: RouterPolicy = FAST_POLICY
) -> ModelRouter:
    router = ModelRouter(groups, policy, transport=_transport[0])
    _routers.append(router)
    return router


def route_over(
    targets: Sequence[LLMTarget], policy: RouterPolicy = FAST_POLICY
) -> tuple[ModelRouter, RouteChoice]:
    """A router with one group, ``standard``, trying ``targets`` in order."""
    router = make_router({"standard": list(targets)}, policy)
    choice = RouteChoice(
        group="standard",
        deployment=targets[0].model,
        order=tuple(range(len(targets))),
        reason="test route",
        source=RouteSource.COMPLEXITY,
    )
    return router, choice


async def collect(
    router: ModelRouter,
    choice: RouteChoice,
    messages: Sequence[dict[str, Any]] = QUESTION,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[RoutedEvent]:
    async with contextlib.aclosing(router.stream(choice, messages, tools=tools)) as stream:
        return [event async for event in stream]


async def hang_up_at(
    router: ModelRouter, choice: RouteChoice, wanted: Callable[[RoutedEvent], bool]
) -> RoutedEvent:
    """Read the route until ``wanted`` holds for an event, then close it; that event."""
    async with contextlib.aclosing(router.stream(choice, QUESTION)) as stream:
        async for event in stream:
            if wanted(event):
                return event
    raise AssertionError("the stream ended before the wanted event")


async def assert_hung_up_on(server: FakeLLMServer) -> None:
    """The model server saw the client close its reply before the end."""
    record = await server.wait_for_end(within=2.0)
    assert record.cut_by_client
    assert not record.completed


def text_of(events: Sequence[RoutedEvent]) -> str:
    return "".join(event.content for event in events if isinstance(event, TextDelta))


def fallbacks_in(events: Sequence[RoutedEvent]) -> list[Fallback]:
    return [event for event in events if isinstance(event, Fallback)]


def finish_of(events: Sequence[RoutedEvent]) -> Finish:
    finish = events[-1]
    assert isinstance(finish, Finish)
    return finish


@pytest.mark.parametrize("failure", ["fail-429", "fail-500", "fail-context", "fail-break-early"])
async def test_a_failure_before_any_text_moves_to_the_next_server(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer], failure: str
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target(failure), second.target("text")])
    events = await collect(router, choice)
    assert text_of(events) == ANSWER
    assert finish_of(events).model == "openai/text"
    [fallback] = fallbacks_in(events)
    assert fallback.failed == f"openai/{failure}"
    assert fallback.replacement == "openai/text"
    assert not fallback.continued
    assert len(first.requests) == 1
    assert len(second.requests) == 1
    assert second.requests[0].body["messages"] == QUESTION


async def test_a_hanging_server_times_out_and_the_next_answers(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-hang"), second.target("text")])
    started = time.monotonic()
    events = await collect(router, choice)
    elapsed = time.monotonic() - started
    assert text_of(events) == ANSWER
    assert TIMEOUT <= elapsed < TIMEOUT + 3
    record = await first.wait_for_end()
    assert record.cut_by_client
    assert record.chunks_sent == 0


async def test_three_servers_failing_three_ways_then_the_last_deployment_answers(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, third = servers
    router, choice = route_over(
        [
            first.target("fail-429"),
            second.target("fail-500"),
            third.target("fail-context"),
            first.target("text"),
        ]
    )
    events = await collect(router, choice)
    assert text_of(events) == ANSWER
    assert [r.model for r in first.requests] == ["fail-429", "text"]
    assert [r.model for r in second.requests] == ["fail-500"]
    assert [r.model for r in third.requests] == ["fail-context"]
    assert fallbacks_in(events)[0].replacement == "openai/text"


async def test_a_break_after_text_is_continued_never_repeated(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-break"), second.target("text")])
    events = await collect(router, choice)
    partial = "This reply will "  # the role chunk, then three words, then the break
    deltas = [event for event in events if isinstance(event, TextDelta | Fallback)]
    position = next(i for i, event in enumerate(deltas) if isinstance(event, Fallback))
    assert text_of(deltas[:position]) == partial
    assert text_of(deltas[position:]) == ANSWER
    assert text_of(events) == partial + ANSWER  # each piece once: nothing was sent twice
    fallback = deltas[position]
    assert isinstance(fallback, Fallback)
    assert fallback.continued
    assert fallback.failed == "openai/fail-break"
    assert fallback.code in (LLMErrorCode.STREAM_BROKEN, LLMErrorCode.CONNECTION_ERROR)
    assert fallback.notice() == (
        "The connection to openai/fail-break broke; openai/text continues the reply."
    )
    # The next server saw the partial reply and was asked to continue it.
    continuation = second.requests[0].body["messages"]
    assert continuation[:-2] == QUESTION
    assert continuation[-2] == {"role": "assistant", "content": partial}
    assert continuation[-1] == {"role": "user", "content": CONTINUE_INSTRUCTION}
    assert first.requests[0].broken_by_server


async def test_a_stall_after_text_times_out_and_is_continued(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-stall"), second.target("text")])
    started = time.monotonic()
    events = await collect(router, choice)
    assert time.monotonic() - started < TIMEOUT + 3
    assert text_of(events) == "This reply will " + ANSWER
    [fallback] = fallbacks_in(events)
    assert fallback.continued
    assert fallback.code is LLMErrorCode.TIMEOUT
    record = await first.wait_for_end()
    assert record.stalled
    assert record.cut_by_client


async def test_a_break_with_nothing_left_raises_after_the_shown_text(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, _, _ = servers
    router, choice = route_over([first.target("fail-break")])
    shown: list[str] = []

    async def read() -> None:
        async with contextlib.aclosing(router.stream(choice, QUESTION)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    shown.append(event.content)

    with pytest.raises(LLMError) as raised:
        await read()
    assert "".join(shown) == "This reply will "
    assert raised.value.after_output
    assert raised.value.retryable


async def test_a_continuation_that_finds_no_model_says_text_was_shown(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-break"), second.target("fail-500")])
    shown: list[RoutedEvent] = []

    async def read() -> None:
        async with contextlib.aclosing(router.stream(choice, QUESTION)) as stream:
            async for event in stream:
                shown.append(event)

    with pytest.raises(LLMError) as raised:
        await read()
    assert text_of(shown) == "This reply will "
    assert [fallback.continued for fallback in fallbacks_in(shown)] == [True]
    assert raised.value.after_output
    assert raised.value.code is LLMErrorCode.UPSTREAM_ERROR


async def test_every_deployment_failing_raises_one_error_for_the_route(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-500"), second.target("fail-context")])
    with pytest.raises(LLMError) as raised:
        await collect(router, choice)
    assert not raised.value.after_output
    assert raised.value.code in (
        LLMErrorCode.UPSTREAM_ERROR,
        LLMErrorCode.CONTEXT_WINDOW_EXCEEDED,
    )


async def test_a_failed_walk_is_retried_after_a_backoff(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    policy = RouterPolicy(
        timeout=TIMEOUT,
        rounds=2,
        backoff_seconds=0.2,
        backoff_cap_seconds=0.4,
        cooldown_seconds=0,
    )
    router, choice = route_over([first.target("text"), second.target("text")], policy)
    first.queue(FailureScript(failure="rate_limit", retry_after=30))
    second.queue(FailureScript(failure="server_error"))
    started = time.monotonic()
    events = await collect(router, choice)
    elapsed = time.monotonic() - started
    assert text_of(events) == ANSWER
    # The 429's Retry-After (30 s) lengthens the wait, but only up to the cap.
    assert 0.4 <= elapsed < 3
    assert len(first.requests) == 2
    assert len(second.requests) == 1


async def test_a_failed_deployment_is_tried_last_while_it_cools_down(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    policy = RouterPolicy(timeout=TIMEOUT, rounds=1, cooldown_seconds=30)
    router, choice = route_over([first.target("text"), second.target("text")], policy)
    first.queue(FailureScript(failure="server_error"))
    assert text_of(await collect(router, choice)) == ANSWER
    assert router.chain(choice) == ["standard:1", "standard:0"]
    events = await collect(router, choice)
    assert fallbacks_in(events) == []  # the healthy one answered first: no failure to wait for
    assert [len(first.requests), len(second.requests)] == [1, 2]


async def test_a_cooldown_ends(servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer]) -> None:
    first, second, _ = servers
    policy = RouterPolicy(timeout=TIMEOUT, rounds=1, cooldown_seconds=0.05)
    router, choice = route_over([first.target("text"), second.target("text")], policy)
    router.cool(["standard:0"])
    assert router.chain(choice) == ["standard:1", "standard:0"]
    await asyncio.sleep(0.1)
    assert router.chain(choice) == ["standard:0", "standard:1"]


async def test_a_retry_after_longer_than_the_cooldown_wins(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    policy = RouterPolicy(timeout=TIMEOUT, rounds=1, cooldown_seconds=0.01)
    router, full = route_over([first.target("text"), second.target("text")], policy)
    first.queue(FailureScript(failure="rate_limit", retry_after=30))
    alone = dataclasses.replace(full, order=(0,))
    with pytest.raises(LLMError) as raised:
        await collect(router, alone)
    assert raised.value.code is LLMErrorCode.RATE_LIMITED
    assert raised.value.retry_after == 30
    await asyncio.sleep(0.05)  # past the cooldown, not past the Retry-After
    assert router.chain(full) == ["standard:1", "standard:0"]


async def test_every_deployment_failing_is_one_error_naming_the_route(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-429"), second.target("fail-500")])
    with pytest.raises(LLMError) as raised:
        await collect(router, choice)
    assert str(raised.value).startswith(
        "no model of the route answered (openai/fail-429, openai/fail-500); the first said: "
    )
    assert raised.value.retryable


async def test_a_tool_call_round_after_a_fallback(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router, choice = route_over([first.target("fail-500"), second.target("tool")])
    tools = [
        {
            "type": "function",
            "function": {
                "name": "recall",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]
    events = await collect(router, choice, tools=tools)
    calls = [event for event in events if isinstance(event, ToolCall)]
    assert [(call.name, call.arguments()) for call in calls] == [("recall", {"query": "market"})]
    assert finish_of(events).reason == "tool_calls"
    assert second.requests[0].body["tools"] == tools


async def test_usage_is_reported_once_for_the_round(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, _, _ = servers
    router, choice = route_over([first.target("text")])
    events = await collect(router, choice)
    usages = [event for event in events if isinstance(event, Usage)]
    assert usages == [Usage(prompt_tokens=6, completion_tokens=8, total_tokens=14)]
    assert fallbacks_in(events) == []


async def test_the_preferred_deployment_is_tried_first(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router = make_router({"standard": [first.target("fail-500"), second.target("text")]})
    choice = router.choose(
        "hello", licensed_groups=["fast", "standard"], tier="pro", preferred_model="text"
    )
    assert (choice.deployment, choice.order) == ("openai/text", (1, 0))
    events = await collect(router, choice)
    assert text_of(events) == ANSWER
    assert first.requests == []


async def test_closing_the_stream_closes_the_upstream_connection(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, _, _ = servers
    first.queue(TextScript(text=ANSWER * 20, tokens_per_second=20))
    router, choice = route_over([first.target("text")])
    await hang_up_at(router, choice, lambda e: isinstance(e, TextDelta) and bool(e.content.strip()))
    await assert_hung_up_on(first)


async def test_choices_are_counted_by_group_and_source(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    router = make_router({"fast": [first.target("text")], "deep": [second.target("text")]})

    def count(group: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "dexorder_gateway_route_choices_total", {"group": group, "source": "complexity"}
        )
        return value or 0.0

    before = count("deep")
    choice = router.choose("Backtest my RSI strategy", licensed_groups=["fast", "deep"], tier="x")
    assert choice.group == "deep"
    assert count("deep") == before + 1
    capped = router.choose("Backtest my RSI strategy", licensed_groups=["fast"], tier="free")
    assert capped.group == "fast"
    assert capped.reason.endswith("capped at fast, the strongest group allowed for the free tier")


def test_an_empty_model_list_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one deployment"):
        ModelRouter({"fast": []})


async def test_openai_compatible_deployments_take_the_wire_unless_told_otherwise(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer], transport: Transport
) -> None:
    first, _, _ = servers
    anthropic = LLMTarget(model="anthropic/claude-x", api_key="k")
    router = make_router({"standard": [first.target("text"), anthropic]})
    assert set(router.wire) == ({"standard:0"} if transport == "auto" else set())
    # Both transports send the same request.
    choice = RouteChoice(
        group="standard",
        deployment="openai/text",
        order=(0,),
        reason="test route",
        source=RouteSource.COMPLEXITY,
    )
    events = await collect(router, choice)
    assert text_of(events) == ANSWER
    body = first.requests[-1].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "text"
    assert body["messages"] == QUESTION


async def test_stopping_at_the_fallback_notice_closes_the_stream_that_answered(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, second, _ = servers
    second.queue(TextScript(text=ANSWER * 20, tokens_per_second=20))
    router, choice = route_over([first.target("fail-500"), second.target("text")])
    # The user pressed Stop while being told of the takeover, the first event.
    first_event = await hang_up_at(router, choice, lambda _: True)
    assert isinstance(first_event, Fallback)
    await assert_hung_up_on(second)


async def test_a_deployment_that_answers_on_the_second_walk_is_no_takeover(
    servers: tuple[FakeLLMServer, FakeLLMServer, FakeLLMServer],
) -> None:
    first, _, _ = servers
    policy = RouterPolicy(timeout=TIMEOUT, rounds=2, backoff_seconds=0.05, cooldown_seconds=0)
    router, choice = route_over([first.target("text")], policy)
    first.queue(FailureScript(failure="rate_limit", retry_after=0))
    events = await collect(router, choice)
    assert text_of(events) == ANSWER
    assert fallbacks_in(events) == []  # it did not answer, then it did: nobody took over
    assert len(first.requests) == 2


def test_an_openai_base_url_from_the_environment_keeps_those_deployments_with_litellm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # litellm (through the OpenAI SDK) honours it for a deployment without an api_base.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://proxy.internal:4000/v1")
    implicit = LLMTarget(model="openai/gpt-4.1-mini", api_key="k")
    explicit = LLMTarget(model="openai/scripted", api_base="http://127.0.0.1:9/v1")
    router = make_router({"standard": [implicit, explicit]})
    expected = {"standard:1"} if _transport[0] == "auto" else set()
    assert set(router.wire) == expected
