"""WebSocket chat end to end on the local provisioner: JWT -> license -> agent -> LLM -> frames."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from tests.integration.gateway.conftest import RunningGateway, connect


async def test_first_chat_provisions_streams_and_writes_history(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    llm.queue(TextScript(text="Hello there, trader."))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        ready = await client.next()
        assert ready["type"] == "ready"
        assert ready["user"] == user_id
        assert ready["tier"] == "free"
        await client.send({"type": "message", "content": "hi"})  # the agent is made for it
        frames = await client.until("done")
        statuses = [f["stage"] for f in client.frames if f["type"] == "status"]
        assert "provisioning" in statuses
        assert "ready" in statuses
        text = "".join(f["content"] for f in frames if f["type"] == "delta")
        assert text == "Hello there, trader."
        done = frames[-1]
        assert done["cancelled"] is False
        assert done["usage"]["completion_tokens"] > 0
        assert done["route"]["group"] == "fast"  # free tier: fast only
        session_id = ready["session_id"]
        await client.ws.close()

        # A second connection to the same session reads the history back from the agent.
        llm.queue(TextScript(text="Again."))
        again = await connect(
            session, gateway, issuer.mint(user_id), query=f"?session={session_id}"
        )
        await again.until("ready")
        await again.send({"type": "message", "content": "second"})
        await again.until("done")
        last = llm.requests[-1]
        contents = [m.get("content") for m in last.body["messages"]]
        assert "hi" in contents
        assert "Hello there, trader." in contents
        await again.ws.close()


async def test_tool_round_trip_is_visible(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    llm.queue(ToolScript(name="remember", arguments={"text": "likes ETH", "tags": ["pref"]}))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id), header=False)
        await client.until("ready")
        await client.send({"type": "message", "content": "remember I like ETH"})
        frames = await client.until("done", timeout=90)
        kinds = [f["type"] for f in frames]
        call = next(f for f in frames if f["type"] == "tool_call")
        result = next(f for f in frames if f["type"] == "tool_result")
        assert call["name"] == "remember"
        assert result["id"] == call["id"]
        assert result["is_error"] is False
        assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("done")
        # The second round answers from the tool's result, which came from the real agent.
        assert "likes ETH" in result["content"]
        assert "likes ETH" in "".join(f["content"] for f in frames if f["type"] == "delta")


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_stopping_mid_stream_closes_the_upstream_stream(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str, how: str
) -> None:
    llm.queue(TextScript(text="word " * 400, tokens_per_second=20))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "talk a lot"})
        await client.until("delta", timeout=60)
        if how == "cancel":
            await client.send({"type": "cancel"})
            done = (await client.until("done"))[-1]
            assert done["cancelled"] is True
        else:
            await client.ws.close()
        record = await llm.wait_for_end(within=5)
        assert record.cut_by_client
        if how == "cancel":
            # The agent's history keeps the text shown before the cancel, marked as cut.
            shown = "".join(f["content"] for f in client.frames if f["type"] == "delta")
            llm.queue(TextScript(text="Ok."))
            await client.send({"type": "message", "content": "next"})
            await client.until("done")
            replies = [
                m["content"] for m in llm.requests[-1].body["messages"] if m["role"] == "assistant"
            ]
            assert replies[-1].endswith(" [cancelled]")
            assert shown
            assert replies[-1].startswith(shown)


async def test_bad_frames_get_errors_and_the_connection_stays(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.ws.send_str("{not json")
        error = (await client.until("error"))[-1]
        assert error["code"] == "bad_request"
        await client.send({"type": "teleport"})
        assert (await client.until("error"))[-1]["code"] == "bad_request"
        await client.send({"type": "ping"})
        assert (await client.until("pong"))[-1] == {"type": "pong"}
        await client.ws.send_str('{"type":"message","content":"' + "x" * 70_000 + '"}')
        # The agent is being provisioned meanwhile: its status frames may still come first.
        closed = await client.ws.receive(timeout=10)
        while closed.type == aiohttp.WSMsgType.TEXT:
            assert json.loads(closed.data)["type"] == "status"
            closed = await client.ws.receive(timeout=10)
        assert closed.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        )
        assert client.ws.close_code == 1009


async def test_bad_tokens_are_refused_before_and_after_upgrade(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        expired = issuer.mint(user_id, expires_in=-120)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(gateway.ws_url, headers={"Authorization": f"Bearer {expired}"})
        assert refused.value.status == 401
        ws = await session.ws_connect(gateway.ws_url)
        await ws.send_str('{"type":"auth","token":"' + expired + '"}')
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4401


async def test_rate_limit_refuses_the_message_over_the_limit(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    # The free tier allows 10 messages a minute.
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        outcomes = []
        for index in range(11):
            llm.queue(TextScript(text=f"reply {index}"))
            await client.send({"type": "message", "content": f"m{index}"})
            while True:
                frame = await client.next(timeout=60)
                if frame["type"] in ("done", "error"):
                    outcomes.append(frame)
                    break
        assert [f["type"] for f in outcomes[:10]] == ["done"] * 10, outcomes
        assert outcomes[10]["code"] == "rate_limited"
        assert outcomes[10]["retry_after"] > 0


async def test_health_ready_metrics(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/health") as response:
            assert response.status == 200
        async with session.get(gateway.url + "/ready") as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["checks"] == {"database": True, "provisioner": True, "events": True}
            assert body["events_backlog"] == 0
        async with session.get(gateway.metrics_url) as response:
            assert "dexorder_gateway_connections" in await response.text()
        # Not on the public port, which the chart's Ingress routes.
        async with session.get(gateway.url + "/metrics") as response:
            assert response.status == 404


async def test_no_task_is_left_behind(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    before = {t.get_name() for t in asyncio.all_tasks()}
    llm.queue(TextScript(text="bye"))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "hi"})
        await client.until("done")
        await client.ws.close()

    def leftovers() -> list[str]:
        new = {t.get_name() for t in asyncio.all_tasks()} - before
        return [name for name in new if name.startswith(("conversation:", "turn:"))]

    for _ in range(50):
        if not leftovers():
            break
        await asyncio.sleep(0.1)
    assert not leftovers()
