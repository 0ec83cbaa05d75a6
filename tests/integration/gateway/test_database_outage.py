"""PostgreSQL going away and coming back: /ready says so, chat says so, the gateway stays up."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.postgres import (
    PostgresService,
    dsn,
    find_bindir,
    server_account,
    server_argv,
)
from dexorder.devenv.process import ManagedProcess, wait_until
from dexorder.gateway.migrations import apply_migrations
from dexorder.gateway.state import CHAT_SERVICES, LIVE_SOCKETS
from tests.integration.gateway.conftest import (
    RunningGateway,
    connect,
    gateway_settings,
    reply_text,
    serve_gateway,
)

WS_TRY_AGAIN_LATER = 1013


class StoppablePostgres(PostgresService):
    """A private PostgreSQL that can go down and come back on the same port and data."""

    def go_down(self) -> None:
        self._stop_processes()

    def come_back(self) -> None:
        cluster, sockets = self.data_dir / "cluster", self.data_dir / "sockets"
        self._process = ManagedProcess(
            "postgres",
            server_account().command(server_argv(find_bindir(), cluster, sockets, self.port)),
            log_path=self.data_dir / "postgres.log",
            cwd=self.data_dir,
        ).start()
        wait_until(self._answers, timeout=30, what="postgres back", process=self._process)

    def _answers(self) -> bool:
        with psycopg.connect(dsn(self.port, "postgres"), connect_timeout=2):
            return True


@pytest.fixture
def own_postgres() -> Iterator[StoppablePostgres]:
    with StoppablePostgres() as service:
        yield service


@pytest.fixture
async def outage_gateway(
    own_postgres: StoppablePostgres, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    await apply_migrations(own_postgres.dsn)
    settings = gateway_settings(own_postgres.dsn, issuer, llm, tmp_path)
    async with serve_gateway(settings) as running:
        yield running


async def readiness(session: aiohttp.ClientSession, gateway: RunningGateway) -> tuple[int, Any]:
    async with session.get(gateway.url + "/ready") as response:
        return response.status, await response.json()


async def test_ready_and_chat_follow_the_database_down_and_back(
    outage_gateway: RunningGateway,
    own_postgres: StoppablePostgres,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await readiness(session, outage_gateway))[0] == 200

        await asyncio.to_thread(own_postgres.go_down)
        status, body = await readiness(session, outage_gateway)
        assert status == 503
        assert body["checks"] == {"database": False, "provisioner": True, "events": True}

        client = await connect(session, outage_gateway, issuer.mint(user_id))
        error = await client.next(timeout=30)
        assert error["type"] == "error"
        assert error["code"] == "service_unavailable"
        closed = await client.ws.receive(timeout=10)
        assert closed.type == aiohttp.WSMsgType.CLOSE
        assert client.ws.close_code == WS_TRY_AGAIN_LATER
        async with session.get(outage_gateway.url + "/health") as response:
            assert response.status == 200  # alive, only not ready

        await asyncio.to_thread(own_postgres.come_back)
        # The pool reconnects in the background, backing off while the database was away
        # (1 s, doubling), so readiness returns within about the outage's length.
        deadline = time.monotonic() + 60
        while (status := (await readiness(session, outage_gateway))[0]) != 200:
            assert time.monotonic() < deadline, "still not ready a minute after the database"
            await asyncio.sleep(0.5)
        assert (await readiness(session, outage_gateway))[1]["checks"]["database"] is True

        llm.queue(TextScript(text="Back in business."))
        client = await connect(session, outage_gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "hello again"})
        frames = await client.until("done", timeout=60)
        assert "".join(f["content"] for f in frames if f["type"] == "delta") == (
            "Back in business."
        )
        await client.ws.close()


@pytest.fixture
async def caching_gateway(
    own_postgres: StoppablePostgres, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    await apply_migrations(own_postgres.dsn)
    settings = gateway_settings(own_postgres.dsn, issuer, llm, tmp_path, license_cache_seconds=600)
    async with serve_gateway(settings) as running:
        yield running


async def test_a_chat_started_while_the_database_is_down_answers_every_message(
    caching_gateway: RunningGateway,
    own_postgres: StoppablePostgres,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The license is cached, so the chat opens; what needs the database then fails as an
    ``error`` frame (or works without it), never as a worker that died unseen."""
    gateway = caching_gateway
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.ws.close()  # the license is cached now

        await asyncio.to_thread(own_postgres.go_down)
        llm.queue(TextScript(text="Answered all the same."))
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.until("ready")
        await client.send({"type": "message", "content": "are you there?"})
        # What needs the database (the reviews waiting for approval) may fail as an error
        # frame; the message is answered all the same.
        frames = await client.until("done", timeout=40)
        assert reply_text(frames) == "Answered all the same."
        assert all(f["code"] == "service_unavailable" for f in frames if f["type"] == "error")
        await client.ws.close()

    # Every lease the conversation took is given back once its socket closed.
    sessions = gateway.app[CHAT_SERVICES].agents.sessions
    deadline = time.monotonic() + 10
    while sessions.sessions_of(user_id) and any(
        sessions.holders(s) for s in sessions.sessions_of(user_id)
    ):
        assert time.monotonic() < deadline, "the agent session lease leaked"
        await asyncio.sleep(0.1)
    assert not gateway.app[LIVE_SOCKETS]
    gc.collect()
    await asyncio.sleep(0)
    unseen = [r for r in caplog.records if "exception was never retrieved" in r.getMessage()]
    assert not unseen, unseen
