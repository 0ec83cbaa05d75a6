"""The socket writer on real loopback connections: a backlog keeps its order, and a client
that stops reading is cut off with no task left behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web

from dexorder.devenv.process import free_port
from dexorder.gateway.channels.socket_writer import SendPolicy, SocketWriter
from tests.integration.gateway.raw_socket import RawChat

# Far more than the kernel's buffers on both ends of a loopback connection hold.
FRAME = "x" * 10_000
FRAMES = 400


@dataclass
class Served:
    """A server whose every WebSocket gets a writer, handed to the test in ``writers``."""

    port: int
    writers: asyncio.Queue[SocketWriter]
    policy: SendPolicy


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    policy: SendPolicy = getattr(request, "param", SendPolicy(timeout=30, max_bytes=64 << 20))
    writers: asyncio.Queue[SocketWriter] = asyncio.Queue()

    async def chat(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        out = SocketWriter(ws, request.transport, policy, name="test")
        await writers.put(out)
        try:
            async for _ in ws:
                pass
        finally:
            await out.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws/chat", chat)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served(port, writers, policy)
    finally:
        await runner.cleanup()


async def connect(served: Served) -> tuple[RawChat, SocketWriter]:
    client = await asyncio.to_thread(RawChat, served.port, "unused")
    return client, await asyncio.wait_for(served.writers.get(), 10)


async def eventually(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - set by timers and tasks, not an event
            await asyncio.sleep(0.01)


def writer_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("ws-writer:")]


async def test_frames_behind_a_send_that_waits_keep_their_order(served: Served) -> None:
    """A client that reads late: the frames queued while its window was shut go out in
    order once it reads, and sending goes on after them."""
    client, out = await connect(served)
    try:
        for index in range(FRAMES):
            assert out.send(f'{{"n":{index},"pad":"{FRAME}"}}')
        for index in range(FRAMES):
            frame = await asyncio.to_thread(client.read_frame)
            assert frame["n"] == index
        assert await out.flush(10)
        assert out.send('{"n":"after"}')
        assert (await asyncio.to_thread(client.read_frame))["n"] == "after"
        assert not out.gone
    finally:
        client.close()


@pytest.mark.parametrize("served", [SendPolicy(timeout=0.5, max_bytes=64 << 20)], indirect=True)
async def test_a_client_that_stops_reading_is_aborted_and_no_task_is_left(served: Served) -> None:
    client, out = await connect(served)
    try:
        for index in range(FRAMES):
            out.send(f'{{"n":{index},"pad":"{FRAME}"}}')
        assert not out.gone
        await eventually(lambda: out.gone, 10)  # the watchdog's timer
        assert not out.send('{"n":"late"}')
        assert await asyncio.to_thread(client.cut_off, 10)
        await eventually(lambda: not writer_tasks(), 5)  # the cancelled backlog ends
    finally:
        client.close()


@pytest.mark.parametrize("served", [SendPolicy(timeout=30, max_bytes=200_000)], indirect=True)
async def test_frames_queued_past_the_byte_budget_cut_the_client_off(served: Served) -> None:
    client, out = await connect(served)
    try:
        sent = 0
        while out.send(f'{{"n":{sent},"pad":"{FRAME}"}}'):
            sent += 1
            assert sent < FRAMES, "never cut off"
        assert out.gone
        assert await asyncio.to_thread(client.cut_off, 10)
    finally:
        client.close()


async def test_close_stops_a_waiting_backlog(served: Served) -> None:
    client, out = await connect(served)
    try:
        for index in range(FRAMES):
            out.send(f'{{"n":{index},"pad":"{FRAME}"}}')
        assert len(writer_tasks()) == 1
        await out.close()
        assert writer_tasks() == []
        assert out.gone
        assert not out.send('{"n":"late"}')
        assert await out.flush(1) is False
    finally:
        client.close()
