"""Every turn is billed what it used, whatever its outcome: a stop before ``done`` or a model
that breaks mid-reply still costs its prompt and the text streamed."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import aiohttp
import psycopg

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure.events import TurnOutcome, UsageEvent, event_from_json
from tests.integration.gateway.conftest import RunningGateway, open_chat

REPLY = " ".join(f"word{index}" for index in range(200))


def usage_events(events_dir: Path, user_id: str) -> list[UsageEvent]:
    path = events_dir / f"events-{dt.datetime.now(dt.UTC).date().isoformat()}.jsonl"
    if not path.exists():
        return []
    events = [event_from_json(line) for line in path.read_bytes().splitlines()]
    return [e for e in events if isinstance(e, UsageEvent) and e.user_id == user_id]


async def daily_tokens(dsn: str, user_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily "
            "WHERE user_id = %s",
            (user_id,),
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def billed(
    gateway: RunningGateway, migrated_dsn: str, tmp_path: Path, user_id: str
) -> tuple[UsageEvent, int]:
    """The turn's usage event and the user's daily total, once both are recorded."""
    deadline = time.monotonic() + 30
    while True:
        events = usage_events(tmp_path / "events", user_id)
        total = await daily_tokens(migrated_dsn, user_id)
        if events and total:
            return events[-1], total
        assert time.monotonic() < deadline, f"not recorded: {events} {total}"
        await asyncio.sleep(0.2)


async def test_a_reply_stopped_before_done_is_billed_its_prompt_and_streamed_text(
    gateway: RunningGateway,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    tmp_path: Path,
) -> None:
    llm.queue(TextScript(text=REPLY, tokens_per_second=20))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, gateway, issuer, user_id)
        await client.send({"type": "message", "content": "talk for a while"})
        await client.until("delta")
        await client.next()
        await client.send({"type": "cancel"})
        done = (await client.until("done"))[-1]
        await client.ws.close()
    assert done["cancelled"] is True
    usage, daily = await billed(gateway, migrated_dsn, tmp_path, user_id)
    assert usage.outcome == TurnOutcome.CANCELLED
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert daily == usage.prompt_tokens + usage.completion_tokens
    assert done["usage"]["total_tokens"] == daily


async def test_a_reply_the_model_broke_mid_way_is_billed_what_it_streamed(
    gateway: RunningGateway,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    tmp_path: Path,
) -> None:
    # Every deployment breaks: no fallback can finish it.
    for _ in range(8):
        llm.queue(FailureScript(failure="break_midway", chunks_before_break=4))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, gateway, issuer, user_id)
        await client.send({"type": "message", "content": "say something"})
        frames = await client.until("error")
        await client.ws.close()
    assert any(f["type"] == "delta" for f in frames)
    usage, daily = await billed(gateway, migrated_dsn, tmp_path, user_id)
    assert usage.outcome == TurnOutcome.FAILED
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert daily == usage.prompt_tokens + usage.completion_tokens


async def test_a_failed_turn_stays_in_the_history_with_its_error(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    for _ in range(8):
        llm.queue(FailureScript(failure="break_midway", chunks_before_break=2))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, gateway, issuer, user_id)
        await client.send({"type": "message", "content": "the message that failed"})
        await client.until("error")
        llm.reset()  # the failures the routes did not use
        llm.queue(TextScript(text="Answered."))
        await client.send({"type": "message", "content": "and now?"})
        await client.until("done")
        await client.ws.close()
    # The next turn's prompt carries the failed one: the user's message, and that it failed.
    prompt = llm.requests[-1].body["messages"]
    contents = [str(message.get("content")) for message in prompt]
    assert "the message that failed" in contents
    assert any("[failed:" in content for content in contents)
