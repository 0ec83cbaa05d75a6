"""Bench: rate-limiter overhead per message (memory, Redis) and event-sink throughput."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from dexorder.core.tiers import RateLimits
from dexorder.devenv.kafka import KafkaService
from dexorder.devenv.redis import RedisService
from dexorder.gateway.events import JsonlSink, KafkaSink
from dexorder.gateway.pure.events import EventStream, UsageEvent
from dexorder.gateway.spool import Spool
from dexorder.gateway.stores.limits import Limiter, MemoryLimiter, RedisLimiter

LIMITS = RateLimits(messages_per_minute=10**9, tokens_per_day=10**12, concurrent_generations=10**6)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def per_message(limiter: Limiter, n: int) -> tuple[list[float], list[float]]:
    """Latency of admit_message alone, and of the whole per-message cycle."""
    admit, cycle = [], []
    for i in range(n):
        user = f"u{i % 50}"
        t0 = time.perf_counter()
        await limiter.admit_message(user, LIMITS)
        t1 = time.perf_counter()
        d = await limiter.admit_generation(user, LIMITS)
        await limiter.release_generation(user, d.lease)
        await limiter.add_tokens(user, 100)
        t2 = time.perf_counter()
        admit.append((t1 - t0) * 1000)
        cycle.append((t2 - t0) * 1000)
    return admit, cycle


async def per_turn(limiter: Limiter, n: int) -> list[float]:
    """The combined calls: admit_turn then end_generation (two round trips in all)."""
    cycle = []
    for i in range(n):
        user = f"t{i % 50}"
        t0 = time.perf_counter()
        d = await limiter.admit_turn(user, LIMITS)
        await limiter.end_generation(user, d.lease, 100)
        cycle.append((time.perf_counter() - t0) * 1000)
    return cycle


async def concurrent_rate(limiter: Limiter, tasks: int, per_task: int) -> float:
    async def one(k: int) -> None:
        for _ in range(per_task):
            await limiter.admit_message(f"c{k % 50}", LIMITS)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(tasks)))
    return tasks * per_task / (time.perf_counter() - t0)


def usage_event(i: int) -> UsageEvent:
    return UsageEvent(
        occurred_at=dt.datetime.now(dt.UTC),
        user_id=f"user-{i % 100}",
        session_id="s",
        turn_id=f"t{i}",
        channel="websocket",
        tier="pro",
        model="gpt-4o",
        prompt_tokens=100,
        completion_tokens=50,
        cost_usd=0.001,
        latency_ms=120.0,
    )


async def sink_rates(sink: JsonlSink | KafkaSink, n: int, batch: int) -> tuple[float, float]:
    events = [usage_event(i) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        await sink.publish(events[i : i + batch])
    t1 = time.perf_counter()
    while sink.backlog:  # noqa: ASYNC110 - the sink exposes a count, not an event
        await asyncio.sleep(0.01)
    t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t0)


async def main() -> None:
    out = []
    n = int(os.environ.get("N", "5000"))
    # --- limiter ---
    memory = MemoryLimiter()
    await per_message(memory, 500)
    admit, cycle = await per_message(memory, n)
    out.append(
        (
            "memory",
            admit,
            cycle,
            await per_turn(memory, n),
            await concurrent_rate(memory, 50, n // 50),
        )
    )
    with RedisService() as redis_service:
        redis = Redis.from_url(redis_service.url)
        limiter = RedisLimiter(redis, prefix=f"bench:{uuid.uuid4().hex[:6]}")
        await per_message(limiter, 500)
        admit, cycle = await per_message(limiter, n)
        out.append(
            (
                "redis",
                admit,
                cycle,
                await per_turn(limiter, n),
                await concurrent_rate(limiter, 50, n // 50),
            )
        )
        await limiter.close()
        await redis.aclose()
    print(
        "limiter,admit_message_p50_ms,p99,four_call_cycle_p50_ms,p99,turn_cycle_p50_ms,p99,concurrent_admits_per_s"
    )
    for name, admit, cycle, turn, rate in out:
        print(
            f"{name},{statistics.median(admit):.4f},{pct(admit, 0.99):.4f},"
            f"{statistics.median(cycle):.4f},{pct(cycle, 0.99):.4f},"
            f"{statistics.median(turn):.4f},{pct(turn, 0.99):.4f},{rate:.0f}"
        )
    # --- sinks ---
    events_n = int(os.environ.get("EVENTS", "20000"))
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = JsonlSink(Path(tmp) / "jsonl")
        for batch in (1, 4):
            accepted, _ = await sink_rates(jsonl, events_n, batch)
            print(f"jsonl,batch={batch},accepted_per_s={accepted:.0f}")
        await jsonl.close()
        with KafkaService() as kafka:
            for batch in (1, 4):
                topic = f"bench-{uuid.uuid4().hex[:6]}"
                sink = KafkaSink(
                    kafka.bootstrap,
                    {EventStream.USAGE: topic, EventStream.CONVERSATION: topic},
                    Spool(Path(tmp) / f"spool{batch}", max_bytes=1 << 30),
                )
                await sink.start()
                await sink_rates(sink, 2000, batch)  # warm-up: topic creation, PID
                accepted, delivered = await sink_rates(sink, events_n, batch)
                await sink.close()
                print(
                    f"kafka,batch={batch},accepted_per_s={accepted:.0f},delivered_per_s={delivered:.0f}"
                )


asyncio.run(main())
