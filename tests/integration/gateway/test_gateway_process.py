"""The gateway as a process: SIGTERM drains it, and a second process carries on for the user."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from tests.integration.gateway.conftest import ChatClient
from tests.integration.gateway.gateway_process import GatewayProcess, gateway_env

SERVICE_RESTART = 1012


async def open_chat(
    session: aiohttp.ClientSession, url: str, token: str, query: str = ""
) -> ChatClient:
    ws = await session.ws_connect(url + query, headers={"Authorization": f"Bearer {token}"})
    client = ChatClient(ws)
    await client.until("ready")
    return client


async def test_sigterm_lets_the_reply_finish_refuses_newcomers_then_closes_1012(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
    started: list[GatewayProcess],
) -> None:
    env = gateway_env(migrated_dsn, issuer, llm, tmp_path, DEXORDER_DRAIN_SECONDS="20")
    gateway = GatewayProcess(env, tmp_path / "gw")
    started.append(await asyncio.to_thread(gateway.start))
    reply = " ".join(f"w{index}" for index in range(40))
    llm.queue(TextScript(text=reply, tokens_per_second=20))  # about 2 s of streaming
    async with aiohttp.ClientSession() as session:
        client = await open_chat(session, gateway.ws_url, issuer.mint(user_id))
        await client.send({"type": "message", "content": "talk for a while"})
        await client.until("delta", timeout=60)

        gateway.terminate()
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientError):
            async with session.ws_connect(
                gateway.ws_url, headers={"Authorization": f"Bearer {issuer.mint(user_id)}"}
            ):
                pass

        frames = await client.until("done", timeout=30)
        assert frames[-1]["cancelled"] is False
        text = "".join(f["content"] for f in client.frames if f["type"] == "delta")
        assert text == reply
        closing = await client.ws.receive(timeout=30)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert client.ws.close_code == SERVICE_RESTART
    assert await asyncio.to_thread(gateway.wait_exit, 30) == 0
    record = await llm.wait_for_end(within=5)
    assert not record.cut_by_client


async def test_a_second_gateway_process_reads_what_the_first_one_wrote(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
    started: list[GatewayProcess],
) -> None:
    # Both processes share what replicas share: the database and the user's agent data.
    env = gateway_env(migrated_dsn, issuer, llm, tmp_path)
    first = GatewayProcess(env, tmp_path / "first", name="gateway-1")
    started.append(await asyncio.to_thread(first.start))
    async with aiohttp.ClientSession() as session:
        llm.queue(TextScript(text="BTC is up."))
        client = await open_chat(session, first.ws_url, issuer.mint(user_id))
        session_id = client.frames[0]["session_id"]
        await client.send({"type": "message", "content": "how is BTC?"})
        await client.until("done", timeout=60)
        await client.ws.close()
    await asyncio.to_thread(first.stop)

    second = GatewayProcess(env, tmp_path / "second", name="gateway-2")
    started.append(await asyncio.to_thread(second.start))
    async with aiohttp.ClientSession() as session:
        llm.queue(TextScript(text="Still up."))
        client = await open_chat(
            session, second.ws_url, issuer.mint(user_id), query=f"?session={session_id}"
        )
        assert client.frames[0]["session_id"] == session_id
        await client.send({"type": "message", "content": "and now?"})
        await client.until("done", timeout=60)
        await client.ws.close()
    contents = [m.get("content") for m in llm.requests[-1].body["messages"]]
    assert contents[-3:] == ["how is BTC?", "BTC is up.", "and now?"]
