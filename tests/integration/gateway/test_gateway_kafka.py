"""A gateway configured with Kafka, end to end: each chat turn gives exactly one usage
event, and a broker stopped mid-chat neither stops the chat nor makes the gateway unready;
the events of the outage arrive once the broker is back."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.kafka import KafkaService
from dexorder.gateway.app import EVENT_SINK
from dexorder.gateway.pure.events import UsageEvent
from tests.integration.gateway.conftest import (
    ChatClient,
    gateway_settings,
    open_chat,
    reply_text,
    serve_gateway,
)
from tests.integration.gateway.test_events import consume

pytestmark = pytest.mark.slow


async def chat_turn(client: ChatClient, llm: FakeLLMServer, n: int) -> None:
    llm.queue(TextScript(text=f"Reply {n}."))
    await client.send({"type": "message", "content": f"question {n}"})
    frames = await client.until("done", timeout=60)
    assert reply_text(frames) == f"Reply {n}."


async def ready(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/ready") as answer:
        body: dict[str, Any] = await answer.json()
        return answer.status, body


async def test_one_usage_event_per_turn_through_a_broker_outage(
    kafka_service: KafkaService,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    usage_topic = f"usage-{run}"
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        kafka_bootstrap=kafka_service.bootstrap,
        kafka_usage_topic=usage_topic,
        kafka_conversation_topic=f"conv-{run}",
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as http:
        sink = gateway.app[EVENT_SINK]
        client, _ = await open_chat(http, gateway, issuer, user_id)
        for n in range(3):
            await chat_turn(client, llm, n)
        await asyncio.to_thread(kafka_service.stop_broker)
        try:
            for n in range(3, 6):
                await chat_turn(client, llm, n)  # the chat goes on without the broker
            status, body = await ready(http, gateway.url)
            assert status == 200, body
            assert body["checks"]["events"] is True
            assert body["events_backlog"] > 0, "the outage's events wait in the spool"
        finally:
            await asyncio.to_thread(kafka_service.start)
        deadline = time.monotonic() + 90
        while sink.backlog:
            assert time.monotonic() < deadline, "the spooled events never reached the broker"
            await asyncio.sleep(0.2)
        await client.ws.close()
    usage = await asyncio.to_thread(consume, kafka_service.bootstrap, usage_topic, 6)
    events = [record.event for record in usage]
    assert all(isinstance(event, UsageEvent) for event in events)
    assert len(events) == 6, "exactly one usage event per turn"
    assert len({event.turn_id for event in events}) == 6
    assert {event.user_id for event in events} == {user_id}
