"""Each chat turn through the real gateway is recorded: its events (JSON lines here), its
daily usage in PostgreSQL, and its tokens against the Redis budget."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.events import (
    AssistantReplyEvent,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    event_from_json,
)
from dexorder.gateway.stores.licenses import open_pool
from dexorder.gateway.stores.usage import DailyUsage, UsageStore
from tests.integration.gateway.conftest import (
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
)


@pytest.fixture
async def recording_gateway(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    redis_url: str,
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        events_dir=str(tmp_path / "events"),
        redis_url=redis_url,
    )
    async with serve_gateway(settings) as running:
        yield running


async def test_a_turn_with_a_tool_call_is_recorded_once(
    recording_gateway: RunningGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    migrated_dsn: str,
    tmp_path: Path,
) -> None:
    llm.queue(ToolScript(name="remember", arguments={"text": "likes ETH", "tags": ["pref"]}))
    async with aiohttp.ClientSession() as session:
        client = await connect(session, recording_gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "remember I like ETH"})
        done = (await client.until("done", timeout=90))[-1]
        # Long enough that the cancel comes before the end, however loaded the machine.
        llm.queue(TextScript(text="Noted, " * 50, tokens_per_second=5))
        await client.send({"type": "message", "content": "and cancel this"})
        await client.until("delta", timeout=60)
        await client.send({"type": "cancel"})
        cancelled = (await client.until("done"))[-1]
        assert cancelled["cancelled"] is True
        await client.ws.close()
        async with session.get(recording_gateway.url + "/ready") as response:
            ready = await response.json()
        assert ready["checks"]["events"] is True
        assert ready["events_backlog"] == 0
    # The gateway stops here, so its recorder has written everything.
    await recording_gateway.runner.cleanup()

    today = dt.datetime.now(dt.UTC).date()
    path = tmp_path / "events" / f"events-{today.isoformat()}.jsonl"
    events = [event_from_json(line) for line in path.read_bytes().splitlines()]
    mine = [e for e in events if e.user_id == user_id]
    usage = [e for e in mine if isinstance(e, UsageEvent)]
    assert [u.outcome for u in usage] == [TurnOutcome.COMPLETED, TurnOutcome.CANCELLED]
    first = usage[0]
    assert first.prompt_tokens == done["usage"]["prompt_tokens"]
    assert first.completion_tokens == done["usage"]["completion_tokens"]
    assert (first.tier, first.channel, first.tool_calls) == ("free", "websocket", 1)
    turn = [e for e in mine if e.turn_id == first.turn_id]
    assert [type(e) for e in turn] == [
        UserMessageEvent,
        ToolCallEvent,
        AssistantReplyEvent,
        UsageEvent,
    ]
    call = turn[1]
    assert isinstance(call, ToolCallEvent)
    assert call.name == "remember"
    assert call.result is not None
    assert "likes ETH" in call.result

    pool = await open_pool(migrated_dsn)
    try:
        daily = await UsageStore(pool).on(user_id, today)
    finally:
        await pool.close()
    # The cancelled reply is billed what it sent and streamed (issue 20), as its done says.
    assert daily == DailyUsage(
        today,
        done["usage"]["prompt_tokens"] + cancelled["usage"]["prompt_tokens"],
        done["usage"]["completion_tokens"] + cancelled["usage"]["completion_tokens"],
        2,
    )


async def test_a_user_reads_their_own_usage(
    recording_gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    llm.queue(TextScript(text="Hello."))
    url = recording_gateway.url + "/api/usage"
    token = issuer.mint(user_id)
    async with aiohttp.ClientSession() as session:
        client = await connect(session, recording_gateway, token)
        await client.until("ready")
        await client.send({"type": "message", "content": "hi"})
        done = (await client.until("done", timeout=90))[-1]
        await client.ws.close()
        total = done["usage"]["total_tokens"]

        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url + "?days=0", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 400
        today = dt.datetime.now(dt.UTC).date().isoformat()
        headers = {"Authorization": f"Bearer {token}"}
        # The daily total is written just after the reply, in its own task: on a loaded
        # machine that can take seconds.
        for _ in range(300):
            async with session.get(url + "?days=7", headers=headers) as response:
                assert response.status == 200
                body = await response.json()
            if body["days"]:
                break
            await asyncio.sleep(0.1)
    assert body["user"] == user_id
    assert body["tier"] == "free"
    assert body["limits"]["messages_per_minute"] == 10
    assert body["today"]["day"] == today
    assert body["today"]["tokens_used"] == total
    assert body["today"]["tokens_remaining"] == body["limits"]["tokens_per_day"] - total
    assert body["days"] == [
        {
            "day": today,
            "prompt_tokens": done["usage"]["prompt_tokens"],
            "completion_tokens": done["usage"]["completion_tokens"],
            "messages": 1,
        }
    ]


async def test_todays_durable_usage_counts_against_a_fresh_gateways_budget(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    # The free tier allows 100,000 tokens a day; a gateway that ran earlier today used them.
    pool = await open_pool(migrated_dsn)
    try:
        today = dt.datetime.now(dt.UTC).date()
        await UsageStore(pool).add(user_id, today, prompt_tokens=90_000, completion_tokens=10_000)
    finally:
        await pool.close()
    # No Redis: this gateway's in-memory limiter starts from nothing but PostgreSQL.
    settings = gateway_settings(
        migrated_dsn, issuer, llm, tmp_path, events_dir=str(tmp_path / "events")
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "hi"})
        refused = (await client.until("error", timeout=90))[-1]
        await client.ws.close()
    assert refused["code"] == "rate_limited"
    assert "tokens per day" in refused["message"]
    assert 0 < refused["retry_after"] <= 86_400
