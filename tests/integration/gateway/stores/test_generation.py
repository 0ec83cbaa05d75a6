"""Generation leases, in memory and in a real Redis: one holder, renewed while held, lapsed
when not, and let go only by their holder."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
from redis.asyncio import Redis

from dexorder.devenv.process import free_port
from dexorder.gateway.stores.generation import (
    GenerationLeases,
    HeldLease,
    LeasePolicy,
    MemoryGenerationLeases,
    RedisGenerationLeases,
)
from dexorder.gateway.stores.sessions import SessionStoreUnavailable


class MakeLeases(Protocol):
    def __call__(self, ttl: float = 10.0) -> GenerationLeases: ...


@pytest.fixture(params=["memory", "redis"])
async def make_leases(request: pytest.FixtureRequest) -> AsyncIterator[MakeLeases]:
    clients: list[Redis] = []

    def make(ttl: float = 10.0) -> GenerationLeases:
        policy = LeasePolicy(ttl_seconds=ttl)
        if request.param == "memory":
            return MemoryGenerationLeases(policy)
        client: Redis = Redis.from_url(request.getfixturevalue("redis_url"))
        clients.append(client)
        return RedisGenerationLeases(client, policy)

    yield make
    for client in clients:
        await client.aclose()


def session_id() -> str:
    return uuid.uuid4().hex


def test_the_policy_names_a_key_beside_the_sessions_and_renews_three_times_a_ttl() -> None:
    policy = LeasePolicy(ttl_seconds=9.0)
    assert policy.key("abc") == "dexorder:session:abc:generating"
    assert (policy.ttl_ms, policy.renew_seconds) == (9000, 3.0)


async def test_a_lease_is_held_by_its_last_taker_and_let_go_only_by_it(
    make_leases: MakeLeases,
) -> None:
    leases = make_leases()
    sid = session_id()
    assert await leases.holder(sid) is None
    await leases.take(sid, "a")
    await leases.take(sid, "b")  # the replica taking a message generates from now on
    assert await leases.holder(sid) == "b"
    assert await leases.renew(sid, "a") is False
    await leases.release(sid, "a")  # a's reply ended late: b's lease is kept
    assert await leases.holder(sid) == "b"
    await leases.release(sid, "b")
    assert await leases.holder(sid) is None


async def test_a_lease_not_renewed_lapses_and_its_holder_takes_it_again(
    make_leases: MakeLeases,
) -> None:
    leases = make_leases(ttl=0.3)
    sid = session_id()
    await leases.take(sid, "a")
    await asyncio.sleep(0.2)
    assert await leases.renew(sid, "a") is True
    await asyncio.sleep(0.2)
    assert await leases.holder(sid) == "a"  # 0.4 s after it was taken: renewed
    await asyncio.sleep(0.4)
    assert await leases.holder(sid) is None
    # A lapse (a slow or wiped store) while the reply goes on: renewing takes it back.
    assert await leases.renew(sid, "a") is True
    assert await leases.holder(sid) == "a"


async def test_a_held_lease_is_renewed_until_let_go_with_no_task_left(
    make_leases: MakeLeases,
) -> None:
    leases = make_leases(ttl=0.3)
    sid = session_id()
    held = HeldLease(leases, sid, "a")
    before = asyncio.all_tasks()
    await held.hold()
    await held.hold()  # held already: one renewer
    assert len(asyncio.all_tasks() - before) == 1
    await asyncio.sleep(1.0)  # three TTLs
    assert await leases.holder(sid) == "a"
    await held.let_go()
    assert await leases.holder(sid) is None
    assert asyncio.all_tasks() - before == set()
    await held.let_go()  # nothing held: nothing to do


async def test_a_lease_in_an_unreachable_redis_is_reported_and_held_on() -> None:
    client: Redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    try:
        leases = RedisGenerationLeases(client, LeasePolicy(ttl_seconds=0.3))
        sid = session_id()
        for call in (
            leases.take(sid, "a"),
            leases.renew(sid, "a"),
            leases.release(sid, "a"),
            leases.holder(sid),
        ):
            with pytest.raises(SessionStoreUnavailable, match="unreachable"):
                await call
        # The reply goes on without its lease: logged, renewal tried again, nothing raised.
        held = HeldLease(leases, sid, "a")
        await held.hold()
        await asyncio.sleep(0.25)
        await held.let_go()
        assert not held.held
    finally:
        await client.aclose()
