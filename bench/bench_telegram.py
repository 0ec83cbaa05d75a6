"""Benchmark of the Telegram channel, on real PostgreSQL and Redis, one gateway replica in its
own process (``replica.py``) and the local Bot API server and scripted LLM in this one.

1. Webhook updates accepted and persisted per second by one replica: N concurrent
   clients POST distinct updates (workers consume them at the same time).
2. Latency from the webhook POST to the first draft with text, and to the final message,
   for a linked user whose agent is warm.

    .venv/bin/python -m bench.bench_telegram [--updates 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg
from redis.asyncio import Redis
from tests.integration.gateway.gateway_process import gateway_env
from tests.integration.gateway.telegram.conftest import WEBHOOK_SECRET, issue_code
from tests.integration.gateway.telegram.test_replicas import Replica

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import SECRET_HEADER, FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.redis import RedisService
from dexorder.gateway.migrations import apply_migrations

ISSUER_URL = "https://id.test.dexorder"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def flood(url: str, updates: int, concurrency: int) -> float:
    """POST ``updates`` distinct updates with ``concurrency`` clients; returns updates/s."""
    next_id = iter(range(10_000_000, 10_000_000 + updates))
    headers = {SECRET_HEADER: WEBHOOK_SECRET, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    failures = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for update_id in next_id:
            # An update the bot ignores: this measures intake, not replies.
            body = json.dumps({"update_id": update_id, "my_chat_member": None})
            async with session.post(url, data=body, headers=headers) as answer:
                if answer.status != 200:
                    failures += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} webhook requests failed")
    return updates / elapsed


async def run(updates: int, concurrency: int, turns: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with (
        contextlib.ExitStack() as stack,
        PostgresService() as postgres,
        RedisService() as redis_service,
    ):
        await apply_migrations(postgres.dsn)
        redis_url = redis_service.url
        llm = FakeLLMServer()
        await llm.start()
        try:
            async with (
                FakeTelegram() as fake,
                LocalJwksIssuer(issuer=ISSUER_URL, audience="dexorder-gateway") as issuer,
            ):
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tg-bench-")))
                env = gateway_env(
                    postgres.dsn,
                    issuer,
                    llm,
                    root,
                    REDIS_URL=redis_url,
                    TELEGRAM_BOT_TOKEN=fake.token,
                    DEXORDER_TELEGRAM_WEBHOOK_SECRET=WEBHOOK_SECRET,
                    DEXORDER_TELEGRAM_API_URL=fake.url,
                )
                replica = Replica(env, root, "bench-replica")
                await replica.start()
                try:
                    rate = await flood(replica.webhook, updates, concurrency)
                    results["webhook_updates_per_second"] = rate
                    client = Redis.from_url(redis_url)
                    try:
                        stream = "dexorder:telegram:updates"
                        for _ in range(600):
                            pending = await client.xlen(stream)
                            if pending == 0:
                                break
                            await asyncio.sleep(0.1)
                        results["stream_left_after_drain"] = float(await client.xlen(stream))
                    finally:
                        await client.aclose()
                    results.update(await latency(replica, fake, issuer, llm, postgres.dsn, turns))
                finally:
                    await asyncio.to_thread(replica.process.stop, 30)
        finally:
            await llm.stop()
    return results


async def latency(
    replica: Replica,
    fake: FakeTelegram,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    dsn: str,
    turns: int,
) -> dict[str, float]:
    chat_id = user = 4242
    # Enterprise: 120 messages a minute, so the limiter never refuses a measured turn.
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await connection.execute(
            "INSERT INTO user_licenses (user_id, license_type) VALUES ('bench-user', "
            "'enterprise') ON CONFLICT (user_id) DO UPDATE SET license_type = 'enterprise'"
        )
    code = await issue_code(replica.url, issuer.mint("bench-user"))
    link = fake.message_update(f"/link {code}", chat_id=chat_id, user_id=user)
    await fake.deliver(link, url=replica.webhook, secret=WEBHOOK_SECRET)
    await fake.wait_for(lambda: bool(fake.calls_of("sendMessage", chat_id)))
    first_draft: list[float] = []
    final: list[float] = []
    with_draft = 0
    for turn in range(turns + 1):  # the first turn provisions the agent: not measured
        llm.queue(TextScript(text="Markets are calm today, nothing to do.", tokens_per_second=200))
        sent_before = len(fake.calls_of("sendMessage", chat_id))
        drafts_before = len(fake.calls_of("sendMessageDraft", chat_id))
        message = fake.message_update(f"question {turn}", chat_id=chat_id, user_id=user)
        started = time.monotonic()
        await fake.deliver(message, url=replica.webhook, secret=WEBHOOK_SECRET)
        await fake.wait_for(
            lambda sent_before=sent_before: (
                len(fake.calls_of("sendMessage", chat_id))  # type: ignore[misc]
                > sent_before
            ),
            timeout=120,
        )
        final_at = fake.calls_of("sendMessage", chat_id)[sent_before].at
        # A reply that is complete before the first draft is due goes out as the final
        # message alone: then that is when the user first sees text.
        draft_at = next(
            (
                call.at
                for call in fake.calls_of("sendMessageDraft", chat_id)[drafts_before:]
                if "Markets" in call.text
            ),
            final_at,
        )
        if turn:
            with_draft += draft_at < final_at
            first_draft.append((draft_at - started) * 1000)
            final.append((final_at - started) * 1000)
    return {
        "first_draft_ms_p50": statistics.median(first_draft),
        "first_draft_ms_p99": percentile(first_draft, 0.99),
        "final_message_ms_p50": statistics.median(final),
        "final_message_ms_p99": percentile(final, 0.99),
        "turns_with_a_draft_before_the_final": float(with_draft),
        "turns_measured": float(len(final)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--turns", type=int, default=30)
    args = parser.parse_args()
    results = asyncio.run(run(args.updates, args.concurrency, args.turns))
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
