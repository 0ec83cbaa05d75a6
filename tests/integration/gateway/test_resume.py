"""Resumable WebSocket sessions: a client that drops (no close frame) comes back, on the same
gateway or on another one sharing Redis, and gets what it missed and the rest of the reply."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.resume import detached_conversations
from dexorder.gateway.state import SESSIONS
from dexorder.gateway.stores.sessions import SessionError
from tests.integration.gateway.conftest import (
    ChatClient,
    RunningGateway,
    connect,
    gateway_settings,
    reply_text,
    serve_gateway,
)
from tests.integration.gateway.gateway_process import (
    GatewayProcess,
    gateway_env,
    start_replicas,
)

REPLY = " ".join(f"w{index}" for index in range(60))  # 60 chunks: 3 s at 20 a second
OWN_TASKS = ("conversation:", "turn:", "follow:")


async def drop(client: ChatClient) -> None:
    """Lose the connection the way a phone does: no close frame, the TCP stream just ends."""
    sock = client.ws.get_extra_info("socket")
    assert isinstance(sock, TransportSocket)
    sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        await client.ws.close()


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if "seq" in f]


async def start_slow_reply(
    session: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str,
    llm: FakeLLMServer,
) -> tuple[ChatClient, str, list[dict[str, Any]]]:
    """Open a session, ask for a slow reply, read its first deltas; returns what was seen."""
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    client = await connect(session, gateway, token)
    ready = await client.next()
    assert ready["type"] == "ready"
    assert (ready["resumed"], ready["last_seq"]) == (False, 0)
    await client.send({"type": "message", "content": "talk for a while"})
    seen = await client.until("delta", timeout=60)
    seen += [await client.next() for _ in range(3)]
    assert all(frame["type"] == "delta" for frame in seen[-4:])
    return client, ready["session_id"], seen


async def drop_during_a_slow_reply(
    session: aiohttp.ClientSession,
    gateway: RunningGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> tuple[str, list[dict[str, Any]], int]:
    """Start a slow reply and drop its socket mid-way: the session, what was seen, its last seq."""
    client, session_id, seen = await start_slow_reply(session, gateway, issuer.mint(user_id), llm)
    await drop(client)
    return session_id, seen, max(seqs(seen))


async def polled(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the condition is plain state, polled
            await asyncio.sleep(0.02)


def own_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task.get_name().startswith(OWN_TASKS)}


async def test_every_recorded_frame_carries_its_seq_and_pong_does_not(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    llm.queue(TextScript(text="one two three"))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        ready = await client.next()
        assert "seq" not in ready
        await client.send({"type": "message", "content": "count"})
        frames = await client.until("done")
        numbered = seqs(frames)
        assert len(numbered) == len(frames)  # statuses, deltas and done alike
        assert numbered == list(range(numbered[0], numbered[0] + len(numbered)))
        await client.send({"type": "ping"})
        assert await client.next() == {"type": "pong"}
        await client.ws.close()
    # The agent's MCP session id is kept with the session, for any replica to see.
    state = await gateway.app[SESSIONS].claim(
        ready["session_id"], user_id=user_id, channel="websocket"
    )
    assert state.mcp_session_id


async def test_resume_after_a_drop_gets_the_missed_frames_and_the_rest_of_the_reply(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        client, session_id, seen = await start_slow_reply(
            session, gateway, issuer.mint(user_id), llm
        )
        await drop(client)
        await asyncio.sleep(0.5)  # frames go on being generated while nobody listens
        last = max(seqs(seen))

        again = await connect(
            session,
            gateway,
            issuer.mint(user_id),
            query=f"?session={session_id}&after={last}",
        )
        ready = await again.next()
        assert ready["resumed"] is True
        assert ready["last_seq"] > last
        rest = await again.until("done", timeout=60)
        numbered = seqs(rest)
        # In order, none twice; a replayed run of deltas is one frame, numbered as its last.
        assert numbered == sorted(set(numbered))
        assert numbered[0] > last
        assert reply_text(seen) + reply_text(rest) == REPLY
        assert rest[-1]["cancelled"] is False
        # One generation, never cut: the drop did not stop it.
        record = await llm.wait_for_end(within=5)
        assert not record.cut_by_client
        assert len(llm.requests) == 1
        await again.ws.close()
    assert len(detached_conversations(gateway.app)) == 0


LONG_REPLY = " ".join(f"w{index}" for index in range(5000))  # 5000 deltas, about 30 KB


async def test_a_long_reply_is_resumed_whole_after_a_drop(
    two_gateways: tuple[RunningGateway, RunningGateway],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    first, second = two_gateways
    llm.queue(TextScript(text=LONG_REPLY, tokens_per_second=2000))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, first, issuer.mint(user_id))
        session_id = (await client.next())["session_id"]
        await client.send({"type": "message", "content": "talk at length"})
        seen = await client.until("delta", timeout=60)
        seen += [await client.next() for _ in range(10)]
        await drop(client)
        await llm.wait_for_end(within=60)  # the whole reply generated while nobody listened
        last = max(seqs(seen))

        # On the other gateway, from the shared store: the rest of the reply, whole.
        again = await connect(
            session, second, issuer.mint(user_id), query=f"?session={session_id}&after={last}"
        )
        assert (await again.next())["resumed"] is True
        rest = await again.until("done", timeout=60)
        notices = [f["message"] for f in rest if f["type"] == "status" and f["stage"] == "resumed"]
        assert not [notice for notice in notices if "dropped" in notice]
        assert reply_text(seen) + reply_text(rest) == LONG_REPLY
        # Merged: a few frames, not thousands.
        assert len([f for f in rest if f["type"] == "delta"]) < 20
        await again.ws.close()


async def test_the_start_dropped_from_the_buffer_is_reported(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, resume_buffer_bytes=8192)
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        llm.queue(TextScript(text=LONG_REPLY))
        client = await connect(session, gateway, issuer.mint(user_id))
        session_id = (await client.next())["session_id"]
        await client.send({"type": "message", "content": "talk at length"})
        done = (await client.until("done", timeout=60))[-1]
        await client.ws.close()

        again = await connect(
            session, gateway, issuer.mint(user_id), query=f"?session={session_id}&after=0"
        )
        await again.until("ready")
        notice = await again.next()
        assert (notice["type"], notice["stage"]) == ("status", "resumed")
        assert "start of what you missed" in notice["message"]
        assert "dropped" in notice["message"]
        kept = await again.until("done")
        assert kept[-1]["seq"] == done["seq"]
        text = reply_text(kept)
        assert LONG_REPLY.endswith(text)
        assert 0 < len(text) < len(LONG_REPLY)
        await again.ws.close()


async def test_another_users_session_is_refused_with_4403(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        owner = await connect(session, gateway, issuer.mint(user_id))
        session_id = (await owner.next())["session_id"]
        await owner.ws.close()

        intruder = await connect(
            session, gateway, issuer.mint("someone-else"), query=f"?session={session_id}&after=0"
        )
        error = await intruder.next()
        assert error["type"] == "error"
        assert "another user" in error["message"]
        closing = await intruder.ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert intruder.ws.close_code == 4403


async def test_a_bad_after_is_refused_before_the_upgrade(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(session, gateway, issuer.mint(user_id), query="?session=abcdefgh&after=x")
        assert refused.value.status == 400


async def test_dropped_idle_sessions_are_swept_with_no_task_left_behind(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    before = own_tasks()
    # A TTL of 1 s: the sweeper runs every 0.25 s and the grace shrinks to the TTL.
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, session_ttl_seconds=1)
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        llm.queue(TextScript(text="short answer"))
        client = await connect(session, gateway, issuer.mint(user_id))
        session_id = (await client.next())["session_id"]
        await client.send({"type": "message", "content": "hi"})
        await client.until("done")
        await drop(client)
        registry = detached_conversations(gateway.app)
        await polled(lambda: len(registry) == 1, timeout=5)
        assert own_tasks() - before  # the conversation still runs, detached

        await polled(lambda: not registry and not own_tasks() - before, timeout=10)
        with pytest.raises(SessionError):
            await gateway.app[SESSIONS].replay(session_id, 0)

        again = await connect(
            session, gateway, issuer.mint(user_id), query=f"?session={session_id}&after=0"
        )
        ready = await again.next()
        assert (ready["resumed"], ready["last_seq"]) == (False, 0)
        await again.ws.close()


async def test_resume_on_a_second_gateway_follows_the_reply_generating_on_the_first(
    two_gateways: tuple[RunningGateway, RunningGateway],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    first, second = two_gateways
    async with aiohttp.ClientSession() as session:
        session_id, seen, last = await drop_during_a_slow_reply(
            session, first, issuer, llm, user_id
        )

        llm.queue(TextScript(text="Answered on the second gateway."))
        again = await connect(
            session, second, issuer.mint(user_id), query=f"?session={session_id}&after={last}"
        )
        ready = await again.next()
        assert ready["resumed"] is True
        following = await again.next()
        assert (following["type"], following["stage"]) == ("status", "resumed")
        # A message sent while the first gateway still generates waits for that reply.
        await again.send({"type": "message", "content": "and then?"})
        rest = await again.until("done", timeout=60)
        queued = [f for f in rest if f["type"] == "status" and f["stage"] == "queued"]
        assert queued
        assert "another replica" in queued[0]["message"]
        assert reply_text(seen) + reply_text(rest) == REPLY
        numbered = seqs(rest)
        assert numbered == sorted(set(numbered))  # in order, none twice
        assert numbered[0] > last

        # Then the queued message is answered here, on the second gateway.
        after = await again.until("done", timeout=90)
        assert reply_text(after) == "Answered on the second gateway."
        assert len(llm.requests) == 2
        assert not llm.requests[0].cut_by_client
        await again.ws.close()

    # The first gateway keeps its dropped conversation for the grace period only (the
    # fixture's shutdown closes it sooner); the second never had one.
    assert len(detached_conversations(first.app)) == 1
    assert len(detached_conversations(second.app)) == 0


async def test_a_message_queued_while_following_outlives_that_socket_dropping(
    two_gateways: tuple[RunningGateway, RunningGateway],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    first, second = two_gateways
    async with aiohttp.ClientSession() as session:
        session_id, _, last = await drop_during_a_slow_reply(session, first, issuer, llm, user_id)

        # On the second gateway, following the first's reply, a message is queued...
        follower = await connect(
            session, second, issuer.mint(user_id), query=f"?session={session_id}&after={last}"
        )
        assert (await follower.next())["resumed"] is True
        await follower.send({"type": "message", "content": "and then?"})
        while True:
            frame = await follower.next()
            if frame["type"] == "status" and frame["stage"] == "queued":
                break
            last = max(last, frame.get("seq", last))
        # ...and that socket drops too, before the reply it waited for is over.
        await drop(follower)

        llm.queue(TextScript(text="Answered after all."))
        back = await connect(
            session, first, issuer.mint(user_id), query=f"?session={session_id}&after={last}"
        )
        assert (await back.next())["resumed"] is True
        rest = await back.until("done", timeout=60)
        assert REPLY.endswith(reply_text(rest))
        answered = await back.until("done", timeout=30)
        assert reply_text(answered) == "Answered after all."
        assert llm.requests[-1].body["messages"][-1]["content"] == "and then?"
        await back.ws.close()
    # Taken here, and no longer waiting in the store for a later socket to take again.
    state = await second.app[SESSIONS].claim(session_id, user_id=user_id, channel="websocket")
    assert state.queued == ()


@pytest.mark.slow
async def test_a_second_gateway_process_resumes_a_reply_still_generating_on_the_first(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    redis_url: str,
    user_id: str,
    started: list[GatewayProcess],
) -> None:
    first, second = await start_replicas(
        tmp_path,
        started,
        lambda root: gateway_env(migrated_dsn, issuer, llm, root, REDIS_URL=redis_url),
    )
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {issuer.mint(user_id)}"}
        client = ChatClient(await session.ws_connect(first.ws_url, headers=headers))
        session_id = (await client.next())["session_id"]
        await client.send({"type": "message", "content": "talk for a while"})
        seen = await client.until("delta", timeout=60)
        seen += [await client.next() for _ in range(3)]
        await drop(client)
        last = max(seqs(seen))

        again = ChatClient(
            await session.ws_connect(
                f"{second.ws_url}?session={session_id}&after={last}", headers=headers
            )
        )
        ready = await again.next()
        assert ready["resumed"] is True
        rest = await again.until("done", timeout=60)
        assert reply_text(seen) + reply_text(rest) == REPLY
        assert seqs(rest)[0] > last
        assert len(llm.requests) == 1
        await again.ws.close()
