"""A reply on one replica, its client on another (issue 20, items 5 and 6): a replica killed
mid-reply is given up on within its generation lease, and a stop pressed on the other
replica stops the reply where it is generated, billing only what was streamed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_llm.scripts import split_tokens
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.events import TurnOutcome
from dexorder.gateway.turns import estimated_tokens
from tests.integration.gateway.conftest import ChatClient, RunningGateway, connect, reply_text
from tests.integration.gateway.gateway_process import (
    GatewayProcess,
    gateway_env,
    start_replicas,
    stop_orphaned_agents,
)
from tests.integration.gateway.test_billing import billed
from tests.integration.gateway.test_resume import drop, seqs

REPLY = " ".join(f"word{index}" for index in range(200))  # 200 chunks: 10 s at 20 a second
LEASE_SECONDS = 2.0


async def reply_under_way(client: ChatClient) -> tuple[str, list[dict[str, Any]]]:
    """Ask for the slow reply and read its first frames; returns the session and them."""
    session_id = str((await client.until("ready"))[-1]["session_id"])
    await client.send({"type": "message", "content": "talk for a while"})
    seen = await client.until("delta", timeout=60)
    seen += [await client.next() for _ in range(3)]
    return session_id, seen


async def test_stop_on_another_replica_closes_the_upstream_within_a_second_and_bills_what_streamed(
    two_gateways: tuple[RunningGateway, RunningGateway],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    migrated_dsn: str,
    tmp_path: Path,
) -> None:
    first, second = two_gateways
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    token = issuer.mint(user_id)
    async with aiohttp.ClientSession() as session:
        client = await connect(session, first, token)
        session_id, seen = await reply_under_way(client)
        await drop(client)  # the reply goes on, detached, on the first replica
        last = max(seqs(seen))

        again = await connect(session, second, token, query=f"?session={session_id}&after={last}")
        assert (await again.next())["resumed"] is True
        followed = await again.until("delta", timeout=30)  # following the first replica
        stopped_at = time.monotonic()
        await again.send({"type": "cancel"})
        request = await llm.wait_for_end(0, within=5)
        rest = await again.until("done", timeout=30)
        await again.ws.close()

    assert request.cut_by_client
    assert not request.completed
    assert request.ended_at is not None
    assert request.ended_at - stopped_at < 1.0
    assert rest[-1]["cancelled"] is True
    streamed = reply_text(seen) + reply_text(followed + rest)
    assert streamed
    assert REPLY.startswith(streamed)
    assert len(streamed) < len(REPLY)

    # The first replica billed its turn: the prompt and what the model streamed until the
    # stop (all of which the client got), not the whole reply.
    usage, daily = await billed(first, migrated_dsn, tmp_path / "a", user_id)
    assert usage.outcome == TurnOutcome.CANCELLED
    sent = "".join(split_tokens(REPLY)[: request.chunks_sent])
    assert estimated_tokens(len(streamed)) <= usage.completion_tokens
    assert usage.completion_tokens <= estimated_tokens(len(sent))
    assert usage.completion_tokens < estimated_tokens(len(REPLY)) // 2
    assert daily == usage.prompt_tokens + usage.completion_tokens


async def test_stop_on_a_second_socket_stops_the_reply_of_the_first_on_the_same_replica(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    """Without Redis too: the session's reply runs on this replica, for another socket."""
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    token = issuer.mint(user_id)
    async with aiohttp.ClientSession() as session:
        writer = await connect(session, gateway, token)
        session_id, seen = await reply_under_way(writer)
        follower = await connect(
            session, gateway, token, query=f"?session={session_id}&after={max(seqs(seen))}"
        )
        await follower.until("delta", timeout=30)  # following the first socket's reply
        stopped_at = time.monotonic()
        await follower.send({"type": "cancel"})
        request = await llm.wait_for_end(0, within=5)
        done = (await writer.until("done", timeout=30))[-1]
        await writer.ws.close()
        await follower.ws.close()
    assert request.cut_by_client
    assert request.ended_at is not None
    assert request.ended_at - stopped_at < 1.0
    assert done["cancelled"] is True


@pytest.mark.slow
async def test_a_reply_whose_replica_was_killed_ends_elsewhere_with_a_notice_within_its_lease(
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
        lambda root: gateway_env(
            migrated_dsn,
            issuer,
            llm,
            root,
            REDIS_URL=redis_url,
            DEXORDER_GENERATION_LEASE_SECONDS=str(LEASE_SECONDS),
        ),
    )
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    headers = {"Authorization": f"Bearer {issuer.mint(user_id)}"}
    try:
        async with aiohttp.ClientSession() as session:
            client = ChatClient(await session.ws_connect(first.ws_url, headers=headers))
            session_id, _ = await reply_under_way(client)
            assert first.process is not None
            await asyncio.to_thread(first.process.kill)  # SIGKILL mid-reply, as a node dies
            await asyncio.to_thread(first.wait_exit, 10)

            # Back at once, while the dead replica's lease still runs: the part recorded,
            # then, once the lease lapsed, an error that says the reply was interrupted.
            resumed_at = time.monotonic()
            again = ChatClient(
                await session.ws_connect(
                    f"{second.ws_url}?session={session_id}&after=0", headers=headers
                )
            )
            frames = await again.until("error", timeout=LEASE_SECONDS + 20)
            waited = time.monotonic() - resumed_at
            await again.ws.close()

            # A later resume finds the reply ended: replayed at once, nothing followed.
            later = ChatClient(
                await session.ws_connect(
                    f"{second.ws_url}?session={session_id}&after=0", headers=headers
                )
            )
            replayed = await later.until("error", timeout=5)
            await later.ws.close()
    finally:
        stop_orphaned_agents(tmp_path / "one")

    error = frames[-1]
    assert error["code"] == "service_unavailable"
    assert "interrupted" in error["message"]
    assert waited < LEASE_SECONDS + 5, waited
    stored = reply_text(frames)
    assert stored
    assert REPLY.startswith(stored)
    assert len(stored) < len(REPLY)
    assert not any(f["type"] == "status" and "following" in f["message"] for f in replayed)
    assert reply_text(replayed) == stored
    assert replayed[-1]["seq"] == error["seq"]
    assert len(llm.requests) == 1  # nothing was asked again
