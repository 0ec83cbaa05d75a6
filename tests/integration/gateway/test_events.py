"""Usage and conversation events through a real KRaft broker: exactly once per turn, no loss
across a broker outage or a restart of the sink, and the JSON-lines fallback."""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from dexorder.devenv.kafka import KafkaService
from dexorder.devenv.process import free_port
from dexorder.gateway.events import JsonlSink, KafkaSink, open_event_sink
from dexorder.gateway.metrics import REGISTRY
from dexorder.gateway.pure.events import (
    Event,
    EventStream,
    UsageEvent,
    UserMessageEvent,
    event_from_json,
)
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.spool import Spool
from dexorder.gateway.stores.usage import UsageRecorder
from dexorder.gateway.turn_runner import relay_turn
from dexorder.gateway.turns import ReplyDelta, ToolFinished, ToolStarted, TurnEvent, TurnTally

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Received:
    key: str
    event_id_header: str
    event: Event


def topics() -> dict[EventStream, str]:
    run = uuid.uuid4().hex[:8]
    return {EventStream.USAGE: f"usage-{run}", EventStream.CONVERSATION: f"conv-{run}"}


def consume(bootstrap: str, topic: str, expected: int, *, settle: float = 2.0) -> list[Received]:
    """Read ``topic`` from the start until ``expected`` records came and ``settle`` seconds
    passed without more, so extra copies would be seen too."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[Received] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 90
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                if len(received) >= expected and time.monotonic() - quiet_since > settle:
                    break
                continue
            error = message.error()
            if error is not None:
                # The topic may not exist yet when the consumer first asks.
                assert error.retriable() or "UNKNOWN_TOPIC" in error.name(), error
                continue
            quiet_since = time.monotonic()
            key, value = message.key(), message.value()
            assert key is not None
            assert value is not None
            event_id = dict(message.headers() or [])["event_id"]
            assert isinstance(key, bytes)
            assert isinstance(event_id, bytes)
            received.append(Received(key.decode(), event_id.decode(), event_from_json(value)))
    finally:
        consumer.close()
    return received


def kafka_sink(bootstrap: str, spool_dir: Path, chosen: dict[EventStream, str]) -> KafkaSink:
    return KafkaSink(bootstrap, chosen, Spool(spool_dir, max_bytes=64 << 20))


async def run_turns(recorder: UsageRecorder, users: list[str], turns: int) -> list[str]:
    """Each turn: a user message, a tool call with its result, a streamed reply, usage."""

    async def shown(_: TurnEvent) -> None:
        return None

    async def streamed(n: int) -> AsyncGenerator[TurnEvent, None]:
        yield ToolStarted(f"c{n}", "get_price", {"n": n})
        yield ToolFinished(f"c{n}", "42", is_error=False)
        yield ReplyDelta(f"answer {n}")

    turn_ids = []
    for n in range(turns):
        user = users[n % len(users)]
        turn = await recorder.start_turn(
            user_id=user, tier="pro", channel="websocket", session_id=f"s-{user}", text=f"q{n}"
        )
        tally = TurnTally()
        await relay_turn(streamed(n), tally=tally, usage=turn, show=shown)
        await turn.finish(model="gpt-4o", prompt_tokens=10 + n, completion_tokens=5, tally=tally)
        turn_ids.append(turn.turn_id)
    return turn_ids


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_usage_events_arrive_exactly_once_per_turn(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    chosen = topics()
    sink = kafka_sink(kafka_bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    users = ["alice", "bob", "carol"]
    try:
        turn_ids = await run_turns(recorder, users, 30)
    finally:
        await recorder.close()
    assert sink.backlog == 0

    usage = await asyncio.to_thread(consume, kafka_bootstrap, chosen[EventStream.USAGE], 30)
    assert sorted(r.event.turn_id for r in usage) == sorted(turn_ids)
    for record in usage:
        assert isinstance(record.event, UsageEvent)
        assert record.key == record.event.user_id
        assert record.event_id_header == record.event.event_id
        assert record.event.cost_usd is not None  # gpt-4o is in LiteLLM's price list
    assert sum(r.event.prompt_tokens for r in usage if isinstance(r.event, UsageEvent)) == sum(
        10 + n for n in range(30)
    )

    conversation = await asyncio.to_thread(
        consume, kafka_bootstrap, chosen[EventStream.CONVERSATION], 90
    )
    kinds: dict[str, list[str]] = {}
    for record in conversation:
        kinds.setdefault(record.event.turn_id, []).append(record.event.type)
    assert set(kinds) == set(turn_ids)
    # A user's events share a partition, so each turn's arrive in the order they happened.
    assert all(k == ["user_message", "tool_call", "assistant_reply"] for k in kinds.values())
    assert not list((tmp_path / "spool").glob("*.ack"))  # every segment acknowledged


async def test_events_sent_while_the_broker_is_down_arrive_after_it_returns(
    kafka_service: KafkaService, tmp_path: Path
) -> None:
    chosen = topics()
    bootstrap = kafka_service.bootstrap
    sink = kafka_sink(bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    try:
        before = await run_turns(recorder, ["dora"], 5)
        await wait_for(lambda: sink.backlog == 0, 30, "the first turns to be delivered")

        await asyncio.to_thread(kafka_service.stop_broker)
        during = await run_turns(recorder, ["dora", "emil"], 10)
        assert sink.backlog == 10 * 4
        assert await sink.healthy()  # spooled safely: the gateway stays ready
        await asyncio.sleep(4)  # the client keeps them, and the spool too
        assert sink.backlog == 10 * 4

        await asyncio.to_thread(kafka_service.start)
        await wait_for(lambda: sink.backlog == 0, 90, "the spooled events to be delivered")
        after = await run_turns(recorder, ["emil"], 5)
    finally:
        await recorder.close()
    assert sink.backlog == 0

    usage = await asyncio.to_thread(consume, bootstrap, chosen[EventStream.USAGE], 20)
    ids = [r.event.event_id for r in usage]
    assert sorted(r.event.turn_id for r in usage) == sorted(before + during + after)
    assert len(ids) == len(set(ids))  # nothing twice, though produced again


async def test_a_spool_left_by_a_stopped_sink_is_replayed_at_start(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    chosen = topics()
    spool_dir = tmp_path / "spool"
    # No broker at all at first: everything stays in the spool.
    unreachable = kafka_sink(f"127.0.0.1:{free_port()}", spool_dir, chosen)
    await unreachable.start()
    recorder = UsageRecorder(unreachable, None)
    turn_ids = await run_turns(recorder, ["fay"], 8)
    assert unreachable.backlog == 8 * 4
    await unreachable.close(timeout=0.5)

    sink = kafka_sink(kafka_bootstrap, spool_dir, chosen)
    await sink.start()
    assert sink.backlog == 8 * 4
    try:
        await wait_for(lambda: sink.backlog == 0, 60, "the replay")
    finally:
        await sink.close()
    usage = await asyncio.to_thread(consume, kafka_bootstrap, chosen[EventStream.USAGE], 8)
    assert sorted(r.event.turn_id for r in usage) == sorted(turn_ids)
    assert list(spool_dir.glob("*.seg")) == []


async def test_without_kafka_events_go_to_json_lines(tmp_path: Path) -> None:
    settings = GatewaySettings.from_values(
        {
            "database_url": "postgresql://localhost/unused",
            "dev_hs256_secret": "x" * 32,
            "jwt_issuer": "issuer",
            "jwt_audience": "audience",
            "events_dir": str(tmp_path / "events"),
        }
    )
    sink = await open_event_sink(settings)
    assert isinstance(sink, JsonlSink)
    recorder = UsageRecorder(sink, None)
    try:
        turn_ids = await run_turns(recorder, ["gus"], 3)
    finally:
        await recorder.close()
    path = tmp_path / "events" / f"events-{dt.datetime.now(dt.UTC).date().isoformat()}.jsonl"
    events = [event_from_json(line) for line in path.read_bytes().splitlines()]
    assert [e.turn_id for e in events if isinstance(e, UsageEvent)] == turn_ids
    assert len([e for e in events if isinstance(e, UserMessageEvent)]) == 3
    assert len(events) == 3 * 4


async def test_a_full_spool_sheds_its_oldest_events_and_stays_ready(tmp_path: Path) -> None:
    chosen = topics()
    # No broker: every event stays; room for about three turns' events.
    spool = Spool(tmp_path / "spool", max_bytes=8 * 1024, segment_records=4)
    sink = KafkaSink(f"127.0.0.1:{free_port()}", chosen, spool)
    await sink.start()
    shed_before = REGISTRY.get_sample_value("dexorder_gateway_events_shed_total") or 0.0
    try:
        recorder = UsageRecorder(sink, None)
        await run_turns(recorder, ["hal"], 20)
        assert spool.shed > 0
        assert spool.size <= 8 * 1024
        assert sink.backlog + spool.shed == 20 * 4  # every event kept or counted
        assert await sink.healthy(), "a full spool must not take the replica out of service"
        shed = REGISTRY.get_sample_value("dexorder_gateway_events_shed_total")
        assert shed == shed_before + spool.shed
        assert REGISTRY.get_sample_value("dexorder_gateway_events_spool_full") == 1.0
    finally:
        await sink.close(timeout=0.2)


async def test_an_event_larger_than_the_producer_sends_is_dropped_and_the_rest_go_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A reply event past the producer's ``message.max.bytes`` can never be sent: it leaves
    the spool (counted), and the events after it, its own turn's usage first, are delivered
    instead of waiting behind it for ever."""
    chosen = topics()
    sink = kafka_sink(kafka_bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    dropped_before = REGISTRY.get_sample_value("dexorder_gateway_events_undeliverable_total")

    async def shown(_: TurnEvent) -> None:
        return None

    async def huge() -> AsyncGenerator[TurnEvent, None]:
        yield ReplyDelta("x" * (2 << 20))

    try:
        turn = await recorder.start_turn(
            user_id="jay", tier="pro", channel="websocket", session_id="s-jay", text="a lot"
        )
        tally = TurnTally()
        await relay_turn(huge(), tally=tally, usage=turn, show=shown)
        await turn.finish(model="gpt-4o", prompt_tokens=3, completion_tokens=2, tally=tally)
        after = await run_turns(recorder, ["jay"], 3)
        await wait_for(lambda: sink.backlog == 0, 30, "the events after the large one")
    finally:
        await recorder.close()
    dropped = REGISTRY.get_sample_value("dexorder_gateway_events_undeliverable_total")
    assert dropped == (dropped_before or 0.0) + 1
    usage = await asyncio.to_thread(consume, kafka_bootstrap, chosen[EventStream.USAGE], 4)
    assert [r.event.turn_id for r in usage] == [turn.turn_id, *after]


async def test_a_users_events_keep_their_order_across_retries(
    kafka_service: KafkaService, tmp_path: Path
) -> None:
    chosen = topics()
    bootstrap = kafka_service.bootstrap
    sink = kafka_sink(bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    try:
        await run_turns(recorder, ["ivy"], 1)
        await wait_for(lambda: sink.backlog == 0, 30, "the first turn to be delivered")
        await asyncio.to_thread(kafka_service.stop_broker)
        during = await run_turns(recorder, ["ivy"], 6)
        await asyncio.sleep(5)
        await asyncio.to_thread(kafka_service.start)
        after = await run_turns(recorder, ["ivy"], 6)  # while the older ones still wait
        await wait_for(lambda: sink.backlog == 0, 90, "everything to be delivered")
    finally:
        await recorder.close()
    usage = await asyncio.to_thread(consume, bootstrap, chosen[EventStream.USAGE], 13)
    # One partition per user: the topic's order is the order the user met them.
    order = [r.event.turn_id for r in usage if r.event.turn_id in set(during + after)]
    first_seen = list(dict.fromkeys(order))
    assert first_seen == during + after


def set_topic_max_message_bytes(bootstrap: str, topic: str, size: int, *, create: bool) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if create:
        config = {"max.message.bytes": str(size)}
        for created in admin.create_topics([NewTopic(topic, 1, 1, config=config)]).values():
            created.result(timeout=30)
        return
    entry = ConfigEntry("max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for altered in admin.incremental_alter_configs([resource]).values():
        altered.result(timeout=30)


async def test_a_fatal_producer_error_replaces_the_producer_and_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    chosen = topics()
    usage_topic = chosen[EventStream.USAGE]
    # A topic that refuses every batch (each is over 200 bytes): with the gap-less
    # guarantee, the broker's refusal is a real fatal error of the idempotent producer.
    await asyncio.to_thread(
        set_topic_max_message_bytes, kafka_bootstrap, usage_topic, 200, create=True
    )
    sink = kafka_sink(kafka_bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    try:
        first = await run_turns(recorder, ["jan"], 3)
        await wait_for(
            lambda: sink.producer_restarts >= 2, 60, "producers replaced after fatal errors"
        )
        assert await sink.healthy()
        assert sink.backlog >= 3  # the usage events, at least, are still spooled
        second = await run_turns(recorder, ["jan"], 3)  # taken while producers fail
        await asyncio.to_thread(
            set_topic_max_message_bytes, kafka_bootstrap, usage_topic, 1 << 20, create=False
        )
        await wait_for(lambda: sink.backlog == 0, 90, "everything to be delivered")
    finally:
        await recorder.close()
    usage = await asyncio.to_thread(consume, kafka_bootstrap, usage_topic, 6)
    assert list(dict.fromkeys(r.event.turn_id for r in usage)) == first + second
    conversation = await asyncio.to_thread(
        consume, kafka_bootstrap, chosen[EventStream.CONVERSATION], 18
    )
    assert list(dict.fromkeys(r.event.turn_id for r in conversation)) == first + second


def raise_in_thread(thread: threading.Thread, exception: type[BaseException]) -> None:
    """Make ``thread`` raise ``exception`` at its next Python bytecode."""
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exception)
    )
    assert done == 1


class ThreadKilled(BaseException):
    """Raised into the Kafka thread: no ``except Exception`` catches it, so the thread dies."""


# The thread's death is the fault this test makes: pytest would report it as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_kafka_thread_is_started_again_and_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    chosen = topics()
    sink = kafka_sink(kafka_bootstrap, tmp_path / "spool", chosen)
    await sink.start()
    recorder = UsageRecorder(sink, None)
    try:
        first = await run_turns(recorder, ["kim"], 2)
        await wait_for(lambda: sink.backlog == 0, 30, "the first turns to be delivered")
        thread = next(t for t in threading.enumerate() if t.name == "kafka-events")
        raise_in_thread(thread, ThreadKilled)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
        second = await run_turns(recorder, ["kim"], 2)  # the next publish starts it again
        assert sink.thread_restarts == 1
        assert await sink.healthy()
        await wait_for(lambda: sink.backlog == 0, 30, "the later turns to be delivered")
    finally:
        await recorder.close()
    usage = await asyncio.to_thread(consume, kafka_bootstrap, chosen[EventStream.USAGE], 4)
    assert [r.event.turn_id for r in usage] == first + second
