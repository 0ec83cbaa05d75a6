"""The update inbox on a real Redis: persisted at once, processed once, taken over after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from dexorder.gateway.channels.telegram.inbox import (
    Handler,
    InboxOptions,
    MemoryInbox,
    OrderKey,
    RedisInbox,
)
from dexorder.gateway.channels.telegram.order import accepted

OPTIONS = InboxOptions(claim_idle_seconds=0.6, block_ms=100)


@pytest.fixture
async def redis(telegram_redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(telegram_redis_url)
    try:
        yield client
    finally:
        await client.aclose()


class Recorder:
    def __init__(self, hold: float = 0.0) -> None:
        self.seen: list[int] = []
        self.hold = hold
        self.started = asyncio.Event()

    async def __call__(self, update_id: int, body: bytes) -> None:
        self.started.set()
        await asyncio.sleep(self.hold)
        self.seen.append(update_id)


@contextlib.asynccontextmanager
async def running(
    inbox: RedisInbox | MemoryInbox, recorder: Handler, order_key: OrderKey | None = None
) -> AsyncIterator[None]:
    task = asyncio.create_task(inbox.run(recorder, order_key=order_key))
    try:
        yield
    finally:
        inbox.stop()
        await asyncio.wait({task}, timeout=2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the condition is plain state, polled
            await asyncio.sleep(0.02)


async def test_put_persists_in_the_stream_before_any_worker_runs(redis: Redis) -> None:
    inbox = RedisInbox(redis, OPTIONS)
    await inbox.put(1, b'{"update_id": 1}')
    entries: Any = await redis.xrange(inbox.stream)
    assert [fields[b"update_id"] for _, fields in entries] == [b"1"]


async def test_a_repeated_update_id_is_processed_once(redis: Redis) -> None:
    inbox = RedisInbox(redis, OPTIONS)
    recorder = Recorder()
    for update_id in (7, 7, 8, 7):
        await inbox.put(update_id, b"{}")
    async with running(inbox, recorder):
        await until(lambda: len(recorder.seen) >= 2)
        await asyncio.sleep(0.3)  # nothing more arrives
    assert sorted(recorder.seen) == [7, 8]
    assert await redis.xlen(inbox.stream) == 0  # acknowledged and deleted
    pending = await redis.xpending(inbox.stream, inbox.group)
    assert pending["pending"] == 0


async def test_two_replicas_share_the_work_and_each_update_runs_once(redis: Redis) -> None:
    first, second = RedisInbox(redis, OPTIONS), RedisInbox(redis, OPTIONS)
    recorder = Recorder(hold=0.01)
    async with running(first, recorder), running(second, recorder):
        for update_id in range(100):
            await first.put(update_id, b"{}")
            await second.put(update_id, b"{}")  # Telegram retried it at the other replica
        await until(lambda: len(recorder.seen) >= 100)
        await asyncio.sleep(0.3)
    assert sorted(recorder.seen) == list(range(100))


async def test_an_update_a_crashed_worker_left_pending_is_taken_over(redis: Redis) -> None:
    crashed = RedisInbox(redis, OPTIONS, consumer="crashed")
    stuck = Recorder(hold=3600)
    await crashed.put(42, b'{"update_id": 42}')
    async with running(crashed, stuck):
        await asyncio.wait_for(stuck.started.wait(), 5)
    # Cancelled mid-update, as a killed process: no ack, the entry stays pending.
    pending = await redis.xpending(crashed.stream, crashed.group)
    assert pending["pending"] == 1
    survivor, recorder = RedisInbox(redis, OPTIONS, consumer="survivor"), Recorder()
    async with running(survivor, recorder):
        await until(lambda: recorder.seen == [42])
    assert (await redis.xpending(crashed.stream, crashed.group))["pending"] == 0


async def test_a_long_update_is_not_taken_over_while_its_worker_lives(redis: Redis) -> None:
    slow_inbox, other_inbox = RedisInbox(redis, OPTIONS), RedisInbox(redis, OPTIONS)
    slow, other = Recorder(hold=OPTIONS.claim_idle_seconds * 4), Recorder()
    await slow_inbox.put(5, b"{}")
    async with running(slow_inbox, slow):
        await asyncio.wait_for(slow.started.wait(), 5)
        async with running(other_inbox, other):
            await until(lambda: slow.seen == [5])
            await asyncio.sleep(OPTIONS.claim_idle_seconds * 2)
    assert other.seen == []


async def test_a_finished_update_delivered_again_later_is_skipped(redis: Redis) -> None:
    inbox, recorder = RedisInbox(redis, OPTIONS), Recorder()
    async with running(inbox, recorder):
        await inbox.put(9, b"{}")
        await until(lambda: recorder.seen == [9])
        await inbox.put(9, b"{}")
        await asyncio.sleep(0.5)
    assert recorder.seen == [9]


async def test_without_redis_repeated_ids_are_still_dropped() -> None:
    inbox, recorder = MemoryInbox(OPTIONS), Recorder()
    async with running(inbox, recorder):
        for update_id in (1, 2, 1, 3, 2):
            await inbox.put(update_id, b"{}")
        await until(lambda: len(recorder.seen) >= 3)
        await asyncio.sleep(0.2)
    assert sorted(recorder.seen) == [1, 2, 3]


async def test_consumers_of_departed_replicas_are_forgotten(redis: Redis) -> None:
    gone = RedisInbox(redis, OPTIONS, consumer="gone")
    busy = RedisInbox(redis, OPTIONS, consumer="busy")
    await gone.ensure_group()
    await gone.put(1, b"{}")
    read: Any = await redis.xreadgroup(gone.group, "gone", {gone.stream: ">"}, count=1)
    await redis.xack(gone.stream, gone.group, read[0][1][0][0])  # "gone" finished its work
    await busy.put(2, b"{}")
    await redis.xreadgroup(busy.group, "busy", {busy.stream: ">"}, count=1)
    await asyncio.sleep(0.05)
    quick = RedisInbox(redis, InboxOptions(dedupe_ttl_seconds=0.01), consumer="new")
    assert await quick.forget_departed_consumers() == 1  # "busy" still holds an entry
    names = {c["name"] for c in await redis.xinfo_consumers(gone.stream, gone.group)}
    assert names == {b"busy"}


class OrderRecorder:
    """Holds every update of chat 1 until the test lets it be accepted, so a later update
    of the same chat that starts before that is seen."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release = asyncio.Event()

    async def __call__(self, update_id: int, body: bytes) -> None:
        self.started.append(update_id)
        if json.loads(body)["chat"] == 1:
            await self.release.wait()
        accepted()
        await asyncio.sleep(0.2)  # the reply, after acceptance: no longer ordered


def by_chat(body: bytes) -> int:
    return int(json.loads(body)["chat"])


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_a_chats_updates_start_in_the_order_they_came(redis: Redis, kind: str) -> None:
    """A `/new` and the message right after it: the message starts only once `/new` was
    accepted. Another chat's update does not wait."""
    inbox = RedisInbox(redis, OPTIONS) if kind == "redis" else MemoryInbox(OPTIONS)
    recorder = OrderRecorder()
    for update_id, chat in ((1, 1), (2, 1), (3, 2), (4, 1)):
        await inbox.put(update_id, json.dumps({"chat": chat}).encode())
    async with running(inbox, recorder, order_key=by_chat):
        await until(lambda: 3 in recorder.started)
        await asyncio.sleep(0.3)
        # Chat 2's update starts beside chat 1's first (in either order); chat 1's second
        # waits for its first.
        assert sorted(recorder.started) == [1, 3], recorder.started
        recorder.release.set()
        await until(lambda: len(recorder.started) == 4)
        assert recorder.started[2:] == [2, 4]
