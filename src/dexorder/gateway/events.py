"""Where usage and conversation events go: Kafka through a disk spool, or JSON-lines files.

``KafkaSink`` writes each event to the spool first (durable: a group-committed ``fsync``
before ``publish`` returns) and then hands it to an idempotent confluent-kafka producer
(``acks=all``), keyed by user so a user's events stay in order on one partition. An event
leaves the spool only when the broker's delivery report says it has it. A broker that is
down loses nothing: undelivered events are produced again after a back-off, at once when
the broker answers again, and at the next start; in spool order, and with nothing newer
produced before them. That is meant to keep a user's events in order across retries, but it
does not yet always: records still in the client's queue when the broker returns can fail
after newer ones went out (issue 20 item 11, open; see test_events.py). All Kafka work
runs on one thread of its own, so the event loop never waits for the broker. A fatal
producer error (or any failure of that thread's loop) replaces the producer and produces
every unacknowledged event again from the spool.

A broker outage long enough to fill the spool sheds the oldest events (counted in
``dexorder_gateway_events_shed``, with ``dexorder_gateway_events_spool_full`` at 1 to
alert on) rather than refusing new ones: ``/ready`` stays true, so a Kafka outage never
becomes a chat outage across every replica at once.

``JsonlSink`` is the fallback without ``KAFKA_BOOTSTRAP``: one file per UTC day.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import Counter, Gauge

from dexorder.gateway import metrics
from dexorder.gateway.pure.events import Event, EventStream
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.spool import GroupCommit, Outgoing, Spool, SpooledRecord, SpoolFull

logger = logging.getLogger(__name__)

EVENTS_ACCEPTED = Counter(
    "dexorder_gateway_events_accepted",
    "Events accepted by the event sink (spooled or written).",
    ["stream"],
    registry=metrics.REGISTRY,
)
EVENTS_DELIVERED = Counter(
    "dexorder_gateway_events_delivered",
    "Events the Kafka broker acknowledged.",
    registry=metrics.REGISTRY,
)
EVENTS_REFUSED = Counter(
    "dexorder_gateway_events_refused",
    "Events refused because the spool was full or the sink failed.",
    registry=metrics.REGISTRY,
)
EVENTS_BACKLOG = Gauge(
    "dexorder_gateway_events_backlog",
    "Events in the spool that the broker has not acknowledged yet.",
    registry=metrics.REGISTRY,
)
EVENTS_SHED = Counter(
    "dexorder_gateway_events_shed",
    "Unsent events given up, oldest first, to keep the spool under its byte cap.",
    registry=metrics.REGISTRY,
)
EVENTS_SPOOL_FULL = Gauge(
    "dexorder_gateway_events_spool_full",
    "1 while the event spool is at its byte cap (new events shed old ones): alert on it.",
    registry=metrics.REGISTRY,
)
EVENTS_SPOOL_BYTES = Gauge(
    "dexorder_gateway_events_spool_bytes",
    "Bytes of the event spool on disk.",
    registry=metrics.REGISTRY,
)
PRODUCER_RESTARTS = Counter(
    "dexorder_gateway_events_producer_restarts",
    "Kafka producers replaced after a fatal error or a failure of the Kafka thread.",
    registry=metrics.REGISTRY,
)

#: Undelivered events are produced again after this, doubling up to the maximum.
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
_POLL_SECONDS = 0.05


class EventsRefused(Exception):
    """The sink could not take the events (spool full, disk error); they were not recorded."""


class EventSink(Protocol):
    async def publish(self, events: Sequence[Event]) -> None:
        """Record events durably (spool or file) without waiting for any broker.

        Raises ``EventsRefused`` when they cannot be recorded at all."""

    @property
    def backlog(self) -> int:
        """Events recorded but not yet delivered to the broker."""

    async def healthy(self) -> bool:
        """Whether new events can be taken; for ``/ready``."""

    async def close(self) -> None:
        """Deliver what can be delivered in a short time; the rest stays spooled."""


def _stream_label(event: Event) -> str:
    return event.stream.value


class JsonlSink:
    """Events appended as JSON lines to ``events-YYYY-MM-DD.jsonl`` (UTC) in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._day: dt.date | None = None

    @property
    def backlog(self) -> int:
        return 0

    def path_for(self, day: dt.date) -> Path:
        return self.directory / f"events-{day.isoformat()}.jsonl"

    def _write(self, lines: bytes) -> None:
        today = dt.datetime.now(dt.UTC).date()
        if self._file is None or self._day != today:
            if self._file is not None:
                self._file.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = self.path_for(today).open("ab")
            self._day = today
        end = self._file.tell()
        try:
            self._file.write(lines)
            self._file.flush()
        except OSError:
            # No half-written line for a reader to trip on: cut back to the last whole one.
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()  # which may write more of the buffer: cut after it
            with self.path_for(today).open("r+b") as file:
                file.truncate(end)
            raise

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        lines = b"".join(event.to_json() + b"\n" for event in events)
        # A short local write, as the Kafka sink's spool makes: handing it to a thread cost
        # more of the event loop (a thread hop per turn, twice) than the write itself.
        try:
            self._write(lines)
        except OSError as error:
            EVENTS_REFUSED.inc(len(events))
            raise EventsRefused(f"cannot write events to {self.directory}: {error}") from error
        for event in events:
            EVENTS_ACCEPTED.labels(stream=_stream_label(event)).inc()

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def producer_config(bootstrap: str, *, message_timeout_ms: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "client.id": "dexorder-gateway",
        # Idempotence: the broker drops the duplicates the client's own retries would make,
        # and keeps each partition in order across them.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # After this, a delivery report says "failed" and the spool produces it again.
        "message.timeout.ms": message_timeout_ms,
        "reconnect.backoff.max.ms": 2000,
        # librdkafka's own log, through Python logging instead of raw stderr.
        "logger": logging.getLogger("dexorder.gateway.events.kafka"),
    }


class _Retries:
    """Records whose delivery failed, produced again together after a back-off, in spool
    order. While any wait, newer records wait behind them (``hold``): producing a newer
    event of a user before an older one would reorder that user's events. (Records still
    in the client when they fail come back here late; the order is not yet guaranteed.)"""

    def __init__(self) -> None:
        self._waiting: list[SpooledRecord] = []
        self._due_at = 0.0
        self._delay = RETRY_MIN_SECONDS

    def add(self, record: SpooledRecord, now: float) -> None:
        if not self._waiting:
            self._due_at = now + self._delay
            self._delay = min(RETRY_MAX_SECONDS, self._delay * 2)
        self._waiting.append(record)

    def hold(self, record: SpooledRecord) -> None:
        """A new record, queued behind the ones waiting."""
        self._waiting.append(record)

    def reconnected(self) -> None:
        # The broker took a record: everything waiting may go now.
        self._delay = RETRY_MIN_SECONDS
        self._due_at = 0.0

    def take_due(self, now: float) -> list[SpooledRecord]:
        if not self._waiting or now < self._due_at:
            return []
        due = sorted(self._waiting, key=lambda record: (record.segment, record.index))
        self._waiting = []
        return due

    def clear(self) -> None:
        self._waiting = []

    def __len__(self) -> int:
        return len(self._waiting)


class KafkaSink:
    """Events to Kafka topics through the spool; see the module's text."""

    def __init__(
        self,
        bootstrap: str,
        topics: Mapping[EventStream, str],
        spool: Spool,
        *,
        message_timeout_ms: int = 30_000,
    ) -> None:
        missing = set(EventStream) - set(topics)
        if missing:
            raise ValueError(f"no topic for the event streams {sorted(missing)}")
        self._topics = dict(topics)
        self._spool = spool
        self._config = producer_config(bootstrap, message_timeout_ms=message_timeout_ms)
        self._config["error_cb"] = self._on_error
        self._inbox: queue.SimpleQueue[SpooledRecord] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._retries = _Retries()
        self._commit = GroupCommit(spool.sync)
        # Set by librdkafka's error callback on a fatal error: the producer is replaced.
        self._fatal: KafkaError | None = None
        # Delivery reports of a replaced producer are ignored: its records are resent.
        self._generation = 0
        self.delivered = 0
        self.producer_restarts = 0

    @property
    def backlog(self) -> int:
        return self._spool.backlog

    async def start(self) -> None:
        """Open the spool, and produce whatever earlier runs left in it."""
        if self._thread is not None:
            raise RuntimeError("the Kafka sink is already started")
        recovered = await asyncio.to_thread(self._spool.open)
        if recovered:
            logger.info("replaying %d spooled events to Kafka", len(recovered))
        for record in recovered:
            self._inbox.put(record)
        producer = Producer(self._config)
        EVENTS_BACKLOG.set_function(lambda: self._spool.backlog)
        EVENTS_SPOOL_FULL.set_function(lambda: int(self._spool.full))
        EVENTS_SPOOL_BYTES.set_function(lambda: self._spool.size)
        self._thread = threading.Thread(
            target=self._run, args=(producer,), name="kafka-events", daemon=True
        )
        self._thread.start()

    async def publish(self, events: Sequence[Event]) -> None:
        if self._thread is None or self._stopping.is_set():
            raise EventsRefused("the Kafka event sink is not running")
        if not events:
            return
        outgoing = [
            Outgoing(self._topics[event.stream], event.user_id, event.event_id, event.to_json())
            for event in events
        ]
        shed_before = self._spool.shed
        try:
            # A short local write; the broker is never waited for here.
            records = self._spool.append(outgoing)
        except SpoolFull as error:
            EVENTS_REFUSED.inc(len(events))
            raise EventsRefused(str(error)) from error
        except OSError as error:
            EVENTS_REFUSED.inc(len(events))
            raise EventsRefused(f"cannot write to the event spool: {error}") from error
        if self._spool.shed > shed_before:
            EVENTS_SHED.inc(self._spool.shed - shed_before)
        for event, record in zip(events, records, strict=True):
            EVENTS_ACCEPTED.labels(stream=_stream_label(event)).inc()
            self._inbox.put(record)
        try:
            await self._commit.durable()
        except OSError as error:
            # With the OS already: only a machine crash before the next sync could lose them.
            logger.warning("syncing the event spool failed: %s", error)

    async def healthy(self) -> bool:
        # A full spool sheds its oldest events and says so in metrics; it is not a reason
        # to take this replica, and so every replica at once, out of service.
        return self._thread is not None and self._thread.is_alive()

    # --- the Kafka thread -------------------------------------------------------------

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        else:
            logger.debug("Kafka client: %s", error)

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise KafkaException(self._fatal)

    def _run(self, producer: Producer) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set():
                    self._raise_fatal()
                    self._produce_waiting(producer)
                    producer.poll(_POLL_SECONDS)
                    failures = 0
            except Exception:
                failures += 1
                logger.exception(
                    "the Kafka producer failed; replacing it and producing every "
                    "unacknowledged event again from the spool"
                )
                producer = self._replace(producer, failures)
        self._final_flush(producer)

    def _replace(self, producer: Producer, failures: int) -> Producer:
        """A new producer, fed every unacknowledged record in spool order."""
        self._generation += 1  # the old producer's delivery reports are ignored from now
        with contextlib.suppress(Exception):
            producer.purge()
            producer.flush(0)
        self._fatal = None
        self._stopping.wait(min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (failures - 1)))
        self._retries.clear()
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
        for record in self._spool.unacknowledged():
            self._inbox.put(record)
        self.producer_restarts += 1
        PRODUCER_RESTARTS.inc()
        return Producer(self._config)

    def _produce_waiting(self, producer: Producer) -> None:
        if len(self._retries):
            waiting = self._retries.take_due(time.monotonic())
            if not waiting:
                # Older records wait for their retry: newer ones queue behind them.
                while True:
                    try:
                        self._retries.hold(self._inbox.get_nowait())
                    except queue.Empty:
                        return
        else:
            waiting = []
        while True:
            try:
                waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for position, record in enumerate(waiting):
            if not self._produce(producer, record):
                # The client's queue is full: the rest wait for the next round, in order.
                now = time.monotonic()
                for later in waiting[position:]:
                    self._retries.add(later, now)
                return

    def _produce(self, producer: Producer, record: SpooledRecord) -> bool:
        outgoing = record.outgoing

        generation = self._generation

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if generation == self._generation:
                self._on_delivery(record, error)

        try:
            producer.produce(
                outgoing.topic,
                value=outgoing.value,
                key=outgoing.key.encode(),
                headers={"event_id": outgoing.record_id.encode()},
                on_delivery=delivered,
            )
        except BufferError:
            return False
        return True

    def _on_delivery(self, record: SpooledRecord, error: KafkaError | None) -> None:
        if error is None:
            self._spool.ack(record)
            self.delivered += 1
            EVENTS_DELIVERED.inc()
            if len(self._retries):
                self._retries.reconnected()
            return
        if self._stopping.is_set():
            return  # it stays in the spool for the next start
        logger.warning("event %s not delivered (%s); retrying", record.outgoing.record_id, error)
        self._retries.add(record, time.monotonic())

    def _final_flush(self, producer: Producer) -> None:
        # Whatever is still in the client's queue gets a short chance; it stays spooled anyway.
        try:
            self._produce_waiting(producer)
            remaining = producer.flush(self._flush_seconds)
        except Exception:
            logger.exception("flushing Kafka events failed; they stay in the spool")
            return
        if remaining:
            logger.warning("%d events undelivered at close; they stay in the spool", remaining)

    _flush_seconds = 5.0

    async def close(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._flush_seconds = timeout
        self._stopping.set()
        await asyncio.to_thread(thread.join)
        await asyncio.to_thread(self._spool.close)


async def open_event_sink(settings: GatewaySettings) -> EventSink:
    """The Kafka sink when ``KAFKA_BOOTSTRAP`` is set, else JSON lines; started."""
    if settings.kafka_bootstrap is None:
        return JsonlSink(settings.events_dir)
    spool = Spool(settings.events_dir / "spool", max_bytes=settings.events_spool_max_bytes)
    sink = KafkaSink(
        settings.kafka_bootstrap,
        {
            EventStream.USAGE: settings.kafka_usage_topic,
            EventStream.CONVERSATION: settings.kafka_conversation_topic,
        },
        spool,
    )
    await sink.start()
    return sink
