"""Where usage and conversation events go: Kafka through a disk spool, or JSON-lines files.

``KafkaSink`` writes each event to the spool first and then hands it to an idempotent
confluent-kafka producer (``acks=all``), keyed by user so a user's events stay in order
on one partition. An event leaves the spool only when the broker's delivery report says
it has it. A broker that is down loses nothing: undelivered events are produced again
after a back-off, at once when the broker answers again, and at the next start. All
Kafka work runs on one thread of its own, so the event loop never waits for the broker.

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

from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import Counter, Gauge

from dexorder.gateway import metrics
from dexorder.gateway.pure.events import Event, EventStream
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.spool import Outgoing, Spool, SpooledRecord, SpoolFull

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
    """Records whose delivery failed, with when to produce each again."""

    def __init__(self) -> None:
        self._due: list[tuple[float, SpooledRecord]] = []
        self._delay = RETRY_MIN_SECONDS

    def add(self, record: SpooledRecord, now: float) -> None:
        self._due.append((now + self._delay, record))
        self._delay = min(RETRY_MAX_SECONDS, self._delay * 2)

    def reconnected(self) -> None:
        # The broker took a record: everything waiting may go now.
        self._delay = RETRY_MIN_SECONDS
        self._due = [(0.0, record) for _, record in self._due]

    def take_due(self, now: float) -> list[SpooledRecord]:
        due = [record for when, record in self._due if when <= now]
        if due:
            self._due = [(when, record) for when, record in self._due if when > now]
        return due

    def __len__(self) -> int:
        return len(self._due)


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
        self._inbox: queue.SimpleQueue[SpooledRecord] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._retries = _Retries()
        self.delivered = 0

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
        try:
            # A short local write; the broker is never waited for here.
            records = self._spool.append(outgoing)
        except SpoolFull as error:
            EVENTS_REFUSED.inc(len(events))
            raise EventsRefused(str(error)) from error
        except OSError as error:
            EVENTS_REFUSED.inc(len(events))
            raise EventsRefused(f"cannot write to the event spool: {error}") from error
        for event, record in zip(events, records, strict=True):
            EVENTS_ACCEPTED.labels(stream=_stream_label(event)).inc()
            self._inbox.put(record)

    async def healthy(self) -> bool:
        running = self._thread is not None and self._thread.is_alive()
        return running and not self._spool.full

    # --- the Kafka thread -------------------------------------------------------------

    def _run(self, producer: Producer) -> None:
        try:
            while not self._stopping.is_set():
                self._produce_waiting(producer)
                producer.poll(_POLL_SECONDS)
        except Exception:
            logger.exception("the Kafka event thread failed; events stay in the spool")
        finally:
            self._final_flush(producer)

    def _produce_waiting(self, producer: Producer) -> None:
        waiting = self._retries.take_due(time.monotonic())
        while True:
            try:
                waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for position, record in enumerate(waiting):
            if not self._produce(producer, record):
                # The client's queue is full: the rest wait for the next round.
                now = time.monotonic()
                for later in waiting[position:]:
                    self._retries.add(later, now)
                return

    def _produce(self, producer: Producer, record: SpooledRecord) -> bool:
        outgoing = record.outgoing

        def delivered(error: KafkaError | None, _message: Message) -> None:
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
    spool = Spool(settings.events_dir / "spool", max_records=settings.events_spool_max)
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
