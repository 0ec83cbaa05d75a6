"""The shared-session pool's bookkeeping: who shares, who closes, what a drop reaches.

No agent is involved: a session opens at its first call, and none is made here (the
integration tests in tests/integration/gateway/agents/test_sessions.py make them)."""

from __future__ import annotations

import asyncio

import pytest

from dexorder.gateway import metrics
from dexorder.gateway.agents.mcp_client import AgentSession
from dexorder.gateway.agents.provisioning import AgentEndpoint, ProvisioningError
from dexorder.gateway.agents.sessions import AgentLease, AgentSessions, SessionHook

ENDPOINT = AgentEndpoint("ann", "http://127.0.0.1:1/mcp", "token-1")


def closed(session: AgentSession) -> bool:
    # A call, not the attribute: mypy would keep an asserted value across the awaits.
    return session.closed


def acquire(
    pool: AgentSessions, endpoint: AgentEndpoint = ENDPOINT, on_session: SessionHook | None = None
) -> AgentLease:
    return pool.acquire(endpoint, host_map={}, connect_grace=0.0, on_session=on_session)


async def test_one_session_per_endpoint_closed_by_the_last_release() -> None:
    pool = AgentSessions(linger=0)
    first, second = acquire(pool), acquire(pool)
    other_token = acquire(pool, AgentEndpoint("ann", ENDPOINT.url, "token-2"))
    assert first.session is second.session
    assert other_token.session is not first.session
    assert pool.holders(first.session) == 2

    await first.release()
    await first.release()  # twice is once
    assert not closed(second.session)
    assert pool.holders(second.session) == 1
    await second.release()
    assert closed(second.session)
    assert pool.sessions_of("ann") == [other_token.session]
    await pool.close()
    assert closed(other_token.session)


async def test_a_drop_closes_for_everyone_once_and_spares_the_next_session() -> None:
    pool = AgentSessions(linger=0)
    told: list[tuple[str, str | None]] = []

    def hook(name: str) -> SessionHook:
        async def record(mcp_session_id: str | None) -> None:
            told.append((name, mcp_session_id))

        return record

    first, second = acquire(pool, on_session=hook("a")), acquire(pool, on_session=hook("b"))
    await first.drop()
    assert first.dropped
    assert second.dropped
    assert sorted(told) == [("a", None), ("b", None)]

    # A conversation that comes meanwhile gets a new session for the same endpoint...
    newcomer = acquire(pool, on_session=hook("c"))
    assert newcomer.session is not first.session
    # ...which the other holder's late drop of the old one leaves alone.
    await second.drop()
    assert len(told) == 2
    assert not newcomer.dropped
    await first.release()
    await second.release()
    assert not closed(newcomer.session)
    await newcomer.release()
    assert closed(newcomer.session)
    await pool.close()


async def test_a_session_lingers_for_the_next_holder_then_closes() -> None:
    pool = AgentSessions(linger=0.2)
    first = acquire(pool)
    session = first.session
    await first.release()
    assert not closed(session)
    again = acquire(pool)
    assert again.session is session  # rejoined during the linger
    await again.release()
    for _ in range(50):
        if closed(session):
            break
        await asyncio.sleep(0.02)
    assert closed(session)
    assert pool.sessions_of("ann") == []
    assert acquire(pool).session is not session
    await pool.close()


async def test_closing_the_pool_closes_lingering_sessions_and_refuses_new_leases() -> None:
    pool = AgentSessions(linger=60)
    lease = acquire(pool)
    await lease.release()
    await pool.close()
    assert closed(lease.session)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("mcp-linger:")]
    with pytest.raises(ProvisioningError):
        acquire(pool)


def open_sessions() -> float:
    return metrics.REGISTRY.get_sample_value("dexorder_gateway_agent_sessions") or 0.0


async def test_the_gauge_counts_the_sessions_in_the_pool_whichever_way_they_leave() -> None:
    before = open_sessions()
    pool = AgentSessions(linger=0)
    first, second = acquire(pool), acquire(pool)  # one session, two holders
    dropped = acquire(pool, AgentEndpoint("bob", ENDPOINT.url, "token-b"))
    assert open_sessions() == before + 2
    await first.release()
    assert open_sessions() == before + 2  # still held
    await second.release()
    assert open_sessions() == before + 1  # the last release closed it
    await dropped.drop()
    assert open_sessions() == before
    await dropped.release()  # after its drop: nothing more to count
    assert open_sessions() == before

    lingering = AgentSessions(linger=0.05)
    lease = acquire(lingering)
    await lease.release()
    assert open_sessions() == before + 1  # lingering is open
    for _ in range(50):
        if open_sessions() == before:
            break
        await asyncio.sleep(0.02)
    assert open_sessions() == before  # expired

    closing = AgentSessions(linger=60)
    await acquire(closing).release()
    acquire(closing, AgentEndpoint("cy", ENDPOINT.url, "token-c"))
    assert open_sessions() == before + 2
    await closing.close()
    assert open_sessions() == before
    await pool.close()
    await lingering.close()
