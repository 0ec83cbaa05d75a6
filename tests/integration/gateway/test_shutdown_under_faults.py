"""SIGTERM whatever the clients and Kafka do (issue 20, item 13 and test 3): a real gateway
process with healthy sockets, clients that never read, clients black-holed behind a proxy,
clients that drop mid-reply, and its Kafka broker stopped. It exits on its own inside the
chart's grace period, healthy sockets get 1012, and every turn's usage is in PostgreSQL
and in the event spool, which is still on disk once the process is gone: the event sink
of the next process on it delivers the usage once the broker is back. A second test puts
every wait of the shutdown at its longest, PostgreSQL not answering too."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fixtures_helm import Helm
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.kafka import KafkaService
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.gateway.events import KafkaSink
from dexorder.gateway.pure.events import EventStream, TurnOutcome, UsageEvent, event_from_json
from dexorder.gateway.spool import Spool
from tests.integration.chart.manifests import container, documents, env, of_kind
from tests.integration.gateway.blackhole_proxy import BlackHoleProxy
from tests.integration.gateway.gateway_process import (
    GatewayProcess,
    gateway_env,
    stop_orphaned_agents,
)
from tests.integration.gateway.raw_socket import RawChat
from tests.integration.gateway.test_events import consume

pytestmark = pytest.mark.slow

SERVICE_RESTART = 1012

# The mix of clients.
HEALTHY, NEVER_READ, BLACK_HOLED, DROPPED = 40, 5, 5, 10
#: Healthy sockets whose second reply is streaming when SIGTERM comes (it may finish).
STILL_TALKING = 10
#: Of the dropped ones, those that drop after SIGTERM, during the drain.
DROPPED_LATE = 5
#: The sockets share a few users, as one user's tabs do: one local agent process per user.
USERS = 4

# Small drain settings, put through the chart's own budget.
DRAIN_SECONDS, WS_CLOSE_SECONDS, PRE_STOP_SECONDS = 3, 2, 5

SHORT_REPLY = " ".join(f"w{index}" for index in range(12))  # about 1.2 s at 10 tokens/s
# 4 MB, more than a loopback connection's buffers take from a reader that never reads
# (about 3 MB), in words of 8 KiB: few tokens for the gateway to relay.
LONG_REPLY = " ".join(f"{index:04d}" + "x" * 8187 for index in range(500))
# Still streaming when the drain ends: stopped then, and billed what streamed.
ENDLESS_REPLY = " ".join(f"d{index}" for index in range(2000))


def grace_after_sigterm(helm: Helm) -> float:
    """The chart's terminationGracePeriodSeconds for the test's drain settings, less the
    preStop pause: Kubernetes counts the grace period from the preStop hook, and sends
    SIGTERM when the hook ends."""
    rendered = helm.template(
        "dx",
        f"--set=gateway.drainSeconds={DRAIN_SECONDS}",
        f"--set=gateway.wsCloseSeconds={WS_CLOSE_SECONDS}",
        f"--set=gateway.preStopSeconds={PRE_STOP_SECONDS}",
        namespace="dexorder",
    ).stdout
    manifests = documents(rendered)
    workload = next(
        manifest
        for manifest in of_kind(manifests, "StatefulSet") + of_kind(manifests, "Deployment")
        if manifest["metadata"]["name"].endswith("gateway")
    )
    pod = workload["spec"]["template"]["spec"]
    gateway = container(workload, "gateway")
    variables = env(gateway)
    # The process under test is configured as the chart configures the pod.
    assert variables["DEXORDER_DRAIN_SECONDS"] == str(DRAIN_SECONDS)
    assert variables["DEXORDER_WS_CLOSE_SECONDS"] == str(WS_CLOSE_SECONDS)
    assert str(PRE_STOP_SECONDS) in " ".join(gateway["lifecycle"]["preStop"]["exec"]["command"])
    return float(pod["terminationGracePeriodSeconds"] - PRE_STOP_SECONDS)


def roomy_tiers(path: Path) -> Path:
    """The tier catalog with the free tier's limits raised, so that many sockets of few
    users may all generate at once."""
    catalog = yaml.safe_load(TIER_CATALOG.read_text())
    free = catalog["tiers"]["free"]
    free["rate_limits"] = {
        "messages_per_minute": 1000,
        "tokens_per_day": 100_000_000,
        "concurrent_generations": 100,
    }
    free["max_sockets_per_user"] = 100
    path.write_text(yaml.safe_dump(catalog))
    return path


class Healthy:
    """A client that reads every frame as it comes (so it answers the gateway's pings), on
    a task of its own until its socket closes."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self.closing: asyncio.Task[aiohttp.WSMessage] = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str, token: str) -> Healthy:
        ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
        client = cls(ws)
        await client.until("ready", 1)
        return client

    @property
    def session_id(self) -> str:
        return str(self.frames[0]["session_id"])

    async def _read(self) -> aiohttp.WSMessage:
        while (message := await self.ws.receive()).type == aiohttp.WSMsgType.TEXT:
            self.frames.append(json.loads(message.data))
            self._arrived.set()
        self._arrived.set()
        return message

    async def until(self, kind: str, count: int, within: float = 90) -> None:
        """Wait until ``count`` frames of type ``kind`` have come."""
        async with asyncio.timeout(within):
            while sum(frame["type"] == kind for frame in self.frames) < count:
                assert not self.closing.done(), self.frames
                self._arrived.clear()
                await self._arrived.wait()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))


async def requests_reach(llm: FakeLLMServer, count: int, within: float = 60) -> None:
    async with asyncio.timeout(within):
        while len(llm.requests) < count:  # noqa: ASYNC110 - another process's doing
            await asyncio.sleep(0.05)


async def raw_chat(port: int, token: str, receive_buffer: int = 4096) -> tuple[RawChat, str]:
    """A raw socket past its ``ready``, and its session id."""
    raw = await asyncio.to_thread(RawChat, port, token, receive_buffer=receive_buffer)
    ready = await asyncio.to_thread(raw.read_frame)
    assert ready["type"] == "ready", ready
    return raw, str(ready["session_id"])


def spooled_usage(spool_dir: Path, topic: str) -> list[UsageEvent]:
    """The usage events in the spool on disk, read as the next process would read them."""
    spool = Spool(spool_dir, max_bytes=1 << 30)
    records = spool.open()
    spool.close()
    usage = [event_from_json(r.outgoing.value) for r in records if r.outgoing.topic == topic]
    assert all(isinstance(event, UsageEvent) for event in usage)
    return [event for event in usage if isinstance(event, UsageEvent)]


async def daily_totals(dsn: str, users: list[str]) -> dict[tuple[str, dt.date], tuple[int, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            "SELECT user_id, day, prompt_tokens, completion_tokens, messages "
            "FROM usage_daily WHERE user_id = ANY(%s)",
            (users,),
        )
        rows = await cursor.fetchall()
    return {(row[0], row[1]): (row[2], row[3], row[4]) for row in rows}


async def test_sigterm_fits_the_grace_period_whatever_the_clients_and_kafka_do(
    kafka_service: KafkaService,
    helm: Helm,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
    started: list[GatewayProcess],
) -> None:
    budget = await asyncio.to_thread(grace_after_sigterm, helm)
    run = uuid.uuid4().hex[:8]
    usage_topic, conversation_topic = f"usage-{run}", f"conv-{run}"
    events_dir = tmp_path / "events"
    env_vars = gateway_env(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        DEXORDER_DRAIN_SECONDS=str(DRAIN_SECONDS),
        DEXORDER_WS_CLOSE_SECONDS=str(WS_CLOSE_SECONDS),
        # Not cut off for being slow before the shutdown: the shutdown must deal with them.
        DEXORDER_WS_SEND_TIMEOUT_SECONDS="300",
        DEXORDER_WS_SEND_BUFFER_BYTES=str(64 << 20),
        DEXORDER_TIERS_PATH=str(roomy_tiers(tmp_path / "tiers.yaml")),
        KAFKA_BOOTSTRAP=kafka_service.bootstrap,
        DEXORDER_KAFKA_USAGE_TOPIC=usage_topic,
        DEXORDER_KAFKA_CONVERSATION_TOPIC=conversation_topic,
        DEXORDER_EVENTS_DIR=str(events_dir),
    )
    users = [f"{user_id}-{index}" for index in range(USERS)]

    def token(index: int) -> str:
        return issuer.mint(users[index % USERS])

    gateway = GatewayProcess(env_vars, tmp_path / "gw")
    started.append(await asyncio.to_thread(gateway.start))
    proxy = await BlackHoleProxy(gateway.port).start()
    raws: list[RawChat] = []
    # The session of every turn, with how it must have ended.
    turns: Counter[tuple[str, TurnOutcome]] = Counter()
    session_user: dict[str, str] = {}
    await asyncio.to_thread(kafka_service.stop_broker)
    broker_down = True
    try:
        async with aiohttp.ClientSession() as http:
            llm.default = TextScript(text=SHORT_REPLY, tokens_per_second=10)
            healthy = await asyncio.gather(
                *(Healthy.open(http, gateway.ws_url, token(index)) for index in range(HEALTHY))
            )
            for index, client in enumerate(healthy):
                session_user[client.session_id] = users[index % USERS]

            async def one_turn(client: Healthy) -> None:
                await client.send({"type": "message", "content": "short one"})
                await client.until("done", 1)
                turns[client.session_id, TurnOutcome.COMPLETED] += 1

            await asyncio.gather(*(one_turn(client) for client in healthy))

            # Clients that never read, then clients black-holed, each with a reply far larger
            # than the buffers between them and the gateway: queued in the gateway at SIGTERM.
            for index in range(NEVER_READ + BLACK_HOLED):
                llm.queue(TextScript(text=LONG_REPLY, tokens_per_second=5000))
                black_holed = index >= NEVER_READ
                raw, session_id = await raw_chat(
                    proxy.port if black_holed else gateway.port, token(index)
                )
                raws.append(raw)
                session_user[session_id] = users[index % USERS]
                expected = len(llm.requests) + 1
                await asyncio.to_thread(raw.send, {"type": "message", "content": "say a lot"})
                await requests_reach(llm, expected)
                if black_holed:
                    await proxy.black_hole()
                await llm.wait_for_end(within=60)  # generated whole, stuck on the way
                turns[session_id, TurnOutcome.COMPLETED] += 1
            assert proxy.black_holed == BLACK_HOLED

            # Clients that drop mid-reply (a TCP reset), before SIGTERM and during the drain.
            dropping: list[RawChat] = []
            for index in range(DROPPED):
                llm.queue(TextScript(text=ENDLESS_REPLY, tokens_per_second=20))
                raw, session_id = await raw_chat(gateway.port, token(index), 1 << 16)
                raws.append(raw)
                session_user[session_id] = users[index % USERS]
                await asyncio.to_thread(raw.send, {"type": "message", "content": "go on"})
                while (await asyncio.to_thread(raw.read_frame))["type"] != "delta":
                    pass
                turns[session_id, TurnOutcome.CANCELLED] += 1
                if index < DROPPED - DROPPED_LATE:
                    raw.reset()
                else:
                    dropping.append(raw)

            # Some healthy sockets are in the middle of a short reply at SIGTERM.
            expected = len(llm.requests) + STILL_TALKING
            for client in healthy[:STILL_TALKING]:
                await client.send({"type": "message", "content": "one more"})
                turns[client.session_id, TurnOutcome.COMPLETED] += 1
            await requests_reach(llm, expected)

            gateway.terminate()
            terminated_at = time.monotonic()
            await asyncio.sleep(0.3)
            for raw in dropping:
                raw.reset()
            async with asyncio.timeout(budget):
                closings = await asyncio.gather(*(client.closing for client in healthy))
        exit_code = await asyncio.to_thread(
            gateway.wait_exit, max(0.0, budget - (time.monotonic() - terminated_at))
        )
        took = time.monotonic() - terminated_at
        print(f"exited {took:.1f} s after SIGTERM (budget {budget:.0f} s)")
        assert exit_code == 0, gateway.log()
        # The agents it started went with it.
        assert stop_orphaned_agents(tmp_path / "agents") == []

        for index, (client, closing) in enumerate(zip(healthy, closings, strict=True)):
            assert closing.type == aiohttp.WSMsgType.CLOSE, (index, closing)
            assert client.ws.close_code == SERVICE_RESTART, (index, client.ws.close_code)
            done = [frame for frame in client.frames if frame["type"] == "done"]
            # A reply streaming at SIGTERM finished inside the drain, before the close.
            assert len(done) == (2 if index < STILL_TALKING else 1), client.frames
            assert not any(frame["cancelled"] for frame in done)
            text = "".join(f["content"] for f in client.frames if f["type"] == "delta")
            assert text == SHORT_REPLY * len(done)

        # Every turn's usage: in the spool the process left (Kafka was down throughout).
        usage = await asyncio.to_thread(spooled_usage, events_dir / "spool", usage_topic)
        spooled = Counter((event.session_id, event.outcome) for event in usage)
        assert spooled == turns
        for event in usage:
            if event.outcome == TurnOutcome.CANCELLED:
                assert event.completion_tokens > 0, "a reply dropped midway is billed its part"
        # And in the daily totals in PostgreSQL.
        expected_totals: dict[tuple[str, dt.date], list[int]] = defaultdict(lambda: [0, 0, 0])
        for event in usage:
            assert event.user_id == session_user[event.session_id]
            totals = expected_totals[event.user_id, event.occurred_at.astimezone(dt.UTC).date()]
            totals[0] += event.prompt_tokens
            totals[1] += event.completion_tokens
            totals[2] += 1
        assert await daily_totals(migrated_dsn, users) == {
            key: tuple(value) for key, value in expected_totals.items()
        }

        # The sink of the next process on the same spool, the broker back, delivers them.
        await asyncio.to_thread(kafka_service.start)
        broker_down = False
        successor = KafkaSink(
            kafka_service.bootstrap,
            {EventStream.USAGE: usage_topic, EventStream.CONVERSATION: conversation_topic},
            Spool(events_dir / "spool", max_bytes=1 << 30),
        )
        await successor.start()
        try:
            assert successor.backlog >= len(usage)
            async with asyncio.timeout(60):
                while successor.backlog:  # noqa: ASYNC110 - the Kafka thread's doing
                    await asyncio.sleep(0.1)
        finally:
            await successor.close()
        delivered = await asyncio.to_thread(
            consume, kafka_service.bootstrap, usage_topic, len(usage)
        )
        assert sorted(r.event.event_id for r in delivered) == sorted(e.event_id for e in usage)
    finally:
        for raw in raws:
            raw.close()
        await proxy.close()
        if broker_down:
            await asyncio.to_thread(kafka_service.start)


async def test_sigterm_fits_the_grace_period_with_postgresql_not_answering_and_kafka_down(
    kafka_service: KafkaService,
    helm: Helm,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
    started: list[GatewayProcess],
) -> None:
    """Every wait of the shutdown at its longest: a reply that outlasts the drain, a client
    that never reads (aborted at the close deadline), PostgreSQL's network path dead with
    the last daily writes to come (its connections open, new ones unanswered), and the
    broker down. The process still exits inside the grace period, and the usage is in the
    spool."""
    budget = await asyncio.to_thread(grace_after_sigterm, helm)
    database_port = int(conninfo_to_dict(migrated_dsn).get("port") or 5432)
    database = await BlackHoleProxy(database_port).start()
    run = uuid.uuid4().hex[:8]
    usage_topic = f"usage-{run}"
    events_dir = tmp_path / "events"
    env_vars = gateway_env(
        make_conninfo(migrated_dsn, host="127.0.0.1", port=str(database.port)),
        issuer,
        llm,
        tmp_path,
        DEXORDER_DRAIN_SECONDS=str(DRAIN_SECONDS),
        DEXORDER_WS_CLOSE_SECONDS=str(WS_CLOSE_SECONDS),
        DEXORDER_WS_SEND_TIMEOUT_SECONDS="300",
        DEXORDER_WS_SEND_BUFFER_BYTES=str(64 << 20),
        KAFKA_BOOTSTRAP=kafka_service.bootstrap,
        DEXORDER_KAFKA_USAGE_TOPIC=usage_topic,
        DEXORDER_KAFKA_CONVERSATION_TOPIC=f"conv-{run}",
        DEXORDER_EVENTS_DIR=str(events_dir),
    )
    gateway = GatewayProcess(env_vars, tmp_path / "gw")
    started.append(await asyncio.to_thread(gateway.start))
    await asyncio.to_thread(kafka_service.stop_broker)
    turns: Counter[tuple[str, TurnOutcome]] = Counter()
    raw: RawChat | None = None
    try:
        async with aiohttp.ClientSession() as http:
            llm.queue(TextScript(text=SHORT_REPLY))
            client = await Healthy.open(http, gateway.ws_url, issuer.mint(user_id))
            await client.send({"type": "message", "content": "short one"})
            await client.until("done", 1)
            turns[client.session_id, TurnOutcome.COMPLETED] += 1

            llm.queue(TextScript(text=LONG_REPLY, tokens_per_second=5000))
            raw, session_id = await raw_chat(gateway.port, issuer.mint(f"{user_id}-slow"))
            await asyncio.to_thread(raw.send, {"type": "message", "content": "say a lot"})
            await requests_reach(llm, 2)
            await llm.wait_for_end(within=60)
            turns[session_id, TurnOutcome.COMPLETED] += 1

            llm.queue(TextScript(text=ENDLESS_REPLY, tokens_per_second=20))
            await client.send({"type": "message", "content": "go on"})
            await client.until("delta", len(SHORT_REPLY.split()) + 1)
            turns[client.session_id, TurnOutcome.CANCELLED] += 1

            await database.black_hole(later_too=True)
            gateway.terminate()
            terminated_at = time.monotonic()
            async with asyncio.timeout(budget):
                await client.closing
        exit_code = await asyncio.to_thread(
            gateway.wait_exit, max(0.0, budget - (time.monotonic() - terminated_at))
        )
        took = time.monotonic() - terminated_at
        print(f"exited {took:.1f} s after SIGTERM (budget {budget:.0f} s)")
        assert exit_code == 0, gateway.log()
        assert stop_orphaned_agents(tmp_path / "agents") == []
        assert client.ws.close_code == SERVICE_RESTART, client.frames
        usage = await asyncio.to_thread(spooled_usage, events_dir / "spool", usage_topic)
        assert Counter((event.session_id, event.outcome) for event in usage) == turns
        assert all(event.completion_tokens > 0 for event in usage)
    finally:
        if raw is not None:
            raw.close()
        await database.close()
        await asyncio.to_thread(kafka_service.start)
