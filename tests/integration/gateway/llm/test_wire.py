"""The wire transport against a local server that sends exactly the bytes each case needs.

The scripted LLM server (``devenv.fake_llm``) covers replies, failures and fallbacks for both
transports (test_routing.py); these are the stream's own edge cases: keep-alive comments,
events split over reads, a reply without ``[DONE]``, an error inside the stream, garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from dexorder.gateway.llm import wire as openai_wire
from dexorder.gateway.llm.adapter import LLMError, LLMErrorCode, RoundReader
from dexorder.gateway.llm.wire import WireClient, WireTarget

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MESSAGES = [{"role": "user", "content": "hi"}]


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


async def sse(request: web.Request, *parts: bytes, pause: float = 0.0) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for part in parts:
        await response.write(part)
        if pause:
            await asyncio.sleep(pause)
    await response.write_eof()
    return response


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[WireTarget]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> WireTarget:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return WireTarget(url=f"http://127.0.0.1:{port}/v1/chat/completions", model="m")

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[WireClient]:
    wire = WireClient()
    yield wire
    await wire.close()


async def failure_of(client: WireClient, target: WireTarget) -> LLMError:
    """The error reading ``target``'s reply raises (a reply that does not fail fails the test)."""
    with pytest.raises(LLMError) as raised:
        await read_all(client, target)
    return raised.value


async def read_all(client: WireClient, target: WireTarget) -> tuple[str, RoundReader]:
    reader = RoundReader()
    text = ""
    stream = await client.open(target, MESSAGES, timeout=2.0)
    try:
        async for item in stream:
            text += reader.read(item)
    finally:
        await stream.aclose()
    return text, reader


async def test_comments_blank_lines_and_events_split_over_reads_are_read_as_events(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    whole = chunk("Hello, ") + chunk("world") + chunk(finish="stop") + b"data: [DONE]\n\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        # A keep-alive comment first, then the events cut at arbitrary bytes.
        parts = [b": keep-alive\n\n", whole[:7], whole[7:40], whole[40:]]
        return await sse(request, *parts, pause=0.01)

    text, reader = await read_all(client, await serve(handler))
    assert text == "Hello, world"
    assert reader.finish("m").reason == "stop"


async def test_a_finished_reply_without_done_is_accepted(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk("fine"), chunk(finish="stop"))

    text, _ = await read_all(client, await serve(handler))
    assert text == "fine"


async def test_a_reply_cut_off_before_it_finished_is_a_broken_stream(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk("half of "))

    failure = await failure_of(client, await serve(handler))
    assert failure.code is LLMErrorCode.STREAM_BROKEN


async def test_an_error_event_inside_the_stream_is_an_llm_error(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "code": 503}}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk("so "), f"data: {json.dumps(error)}\n\n".encode())

    failure = await failure_of(client, await serve(handler))
    assert failure.code is LLMErrorCode.UPSTREAM_ERROR
    assert "overloaded" in str(failure)


async def test_a_chunk_that_is_not_json_is_an_upstream_error(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, b"data: {not json\n\n")

    with pytest.raises(LLMError, match="not JSON") as raised:
        await read_all(client, await serve(handler))
    assert raised.value.code is LLMErrorCode.UPSTREAM_ERROR


async def test_an_error_status_with_a_body_that_is_not_json_still_maps(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=429, text="<html>busy</html>", headers={"retry-after-ms": "1500"}
        )

    failure = await failure_of(client, await serve(handler))
    assert failure.code is LLMErrorCode.RATE_LIMITED
    assert failure.retry_after == 1.5


async def test_the_key_is_sent_as_a_bearer_token(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["authorization"] = request.headers.get("Authorization")
        seen["body"] = await request.json()
        return await sse(request, chunk("ok", "stop"), b"data: [DONE]\n\n")

    target = await serve(handler)
    keyed = WireTarget(url=target.url, model="m", api_key="sk-test")
    text, _ = await read_all(client, keyed)
    assert text == "ok"
    assert seen["authorization"] == "Bearer sk-test"
    assert seen["body"]["model"] == "m"
    assert "tools" not in seen["body"]


async def test_openrouter_s_error_with_an_error_finish_is_a_failure_not_an_answer(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    failure = {
        "id": "c",
        "error": {"code": "server_error", "message": "provider went away"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk("half "), f"data: {json.dumps(failure)}\n\n".encode())

    with pytest.raises(LLMError, match="provider went away") as raised:
        await read_all(client, await serve(handler))
    assert raised.value.code is LLMErrorCode.UPSTREAM_ERROR
    assert raised.value.retryable


async def test_a_rate_limit_inside_the_stream_is_a_rate_limit(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    error = {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, f"data: {json.dumps(error)}\n\n".encode())

    failure = await failure_of(client, await serve(handler))
    assert failure.code is LLMErrorCode.RATE_LIMITED


async def test_a_large_chunk_and_an_odd_one_are_read(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    big = "x" * 300_000  # one event over aiohttp's default line limit (128 KiB)
    odd = b'data: {"id": "c", "choices": [null, {"delta": null}]}\n\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk(big), odd, chunk(finish="stop"), b"data: [DONE]\n\n")

    text, _ = await read_all(client, await serve(handler))
    assert text == big


@pytest.mark.parametrize("ended", [True, False], ids=["whole", "never-ended"])
async def test_a_line_longer_than_taken_is_a_broken_stream(
    serve: Callable[[Handler], Awaitable[WireTarget]],
    client: WireClient,
    monkeypatch: pytest.MonkeyPatch,
    ended: bool,
) -> None:
    # The real limit is 8 MiB; a smaller one keeps the test quick, the path is the same.
    monkeypatch.setattr(openai_wire, "_MAX_LINE", 1000)
    line = chunk("y" * 2000)
    if not ended:
        line = line[: line.index(b"\n")]  # no newline: it outgrows the limit as it comes
    parts = [chunk("fine so far "), line[:700], line[700:1400], line[1400:]]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, *parts, pause=0.01)

    with pytest.raises(LLMError, match="line longer than 1000 bytes") as raised:
        await read_all(client, await serve(handler))
    assert raised.value.code is LLMErrorCode.STREAM_BROKEN
    assert raised.value.retryable


def peer_of(request: web.Request) -> object:
    """The client's end of the connection a request came over (its address and port)."""
    assert request.transport is not None
    return request.transport.get_extra_info("peername")


async def test_a_reply_whose_body_ends_just_after_done_leaves_its_connection_pooled(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    # The usual server: [DONE], then the end of the chunked body in a packet of its own.
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(peer_of(request))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("again", "stop") + b"data: [DONE]\n\n")
        await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    target = await serve(handler)
    for _ in range(3):
        text, _ = await read_all(client, target)
        assert text == "again"
    assert len(peers) == 3
    assert len(set(peers)) == 1, "each reply opened a connection of its own"


async def test_a_body_left_open_after_done_is_hung_up_on_within_the_grace(
    serve: Callable[[Handler], Awaitable[WireTarget]], client: WireClient
) -> None:
    peers: list[object] = []
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(peer_of(request))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("held", "stop") + b"data: [DONE]\n\n")
        if len(peers) == 1:
            # Left open until the test ends; the client has hung up by then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 10)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        await response.write_eof()
        return response

    target = await serve(handler)
    started = asyncio.get_running_loop().time()
    text, reader = await read_all(client, target)
    took = asyncio.get_running_loop().time() - started
    assert text == "held"
    assert reader.finish("m").reason == "stop"
    assert took < 2, f"the reply waited {took:.2f}s on a body that did not end"
    await read_all(client, target)
    release.set()
    assert len(peers) == 2
    assert peers[0] != peers[1], "a connection whose body never ended went back to the pool"
