"""Where usage and conversation events go: Kafka through a disk spool, or JSON-lines files.

``KafkaSink`` writes each event to the spool first (durable: a group-committed ``fsync``
before ``publish`` returns) and then hands it to an idempotent confluent-kafka producer
(``acks=all``), keyed by user so a user's events stay in order on one partition. An event
leaves the spool only when the broker's delivery report says it has it.

A user's events keep their order. The producer never times a record out: it retries until
the broker has it, and the idempotent protocol keeps each partition in order across those
retries, so a broker outage only delays events (a per-record timeout had failed an older
record while a newer one of the same user still went out, and resending the older one
reordered them). A failure that could leave a gap in a partition is fatal
(``enable.gapless.guarantee``); a fatal error, a failed record, or any other failure of
the Kafka thread's loop replaces (or purges) the producer and produces every
unacknowledged event again from the spool, oldest first, with nothing newer before them.
A Kafka thread that died anyway is started again by the next ``publish`` or ``/ready``.
An event larger than the client may ever send (``message.max.bytes``) is dropped from the
spool, counted in ``dexorder_gateway_events_undeliverable``, rather than retried for ever
ahead of every newer event.
All Kafka work runs on that one thread, so the event loop never waits for the broker.

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
from collections import deque
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
EVENTS_UNDELIVERABLE = Counter(
    "dexorder_gateway_events_undeliverable",
    "Events dropped from the spool because no producer can ever send them (larger than "
    "the client's message.max.bytes).",
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

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds; the rest stays spooled."""


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

    async def close(self, timeout: float = 5.0) -> None:
        # Every line is written already: nothing to wait for.
        if self._file is not None:
            self._file.close()
            self._file = None


def producer_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "client.id": "dexorder-gateway",
        # Idempotence: the broker drops the duplicates the client's own retries would make,
        # and keeps each partition in order across them.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # No delivery timeout: the client retries a record until the broker has it. A
        # timeout fails each record on its own clock, so an older record of a user could
        # fail while a newer one still got through: resending the older one then put the
        # user's events out of order. The spool keeps every record until it is acknowledged.
        "message.timeout.ms": 0,
        # Any failure that would leave a gap in a partition (a batch the broker refuses)
        # is fatal instead: the sink then replaces the producer and sends every
        # unacknowledged record again, in spool order.
        "enable.gapless.guarantee": True,
        # Records the client holds in memory; the rest wait in the spool, and in order.
        "queue.buffering.max.kbytes": 65536,
        "reconnect.backoff.max.ms": 2000,
        # librdkafka's own log, through Python logging instead of raw stderr.
        "logger": logging.getLogger("dexorder.gateway.events.kafka"),
    }


def _position(record: SpooledRecord) -> tuple[int, int]:
    return record.segment, record.index


class ProducerFeed:
    """The records the Kafka thread hands its producer, in spool order, each once per
    producer: a user's events keep their order because nothing newer is produced before
    an older record, and a failure restarts the feed from the oldest unacknowledged one.

    ``restart`` takes every unacknowledged record (after a back-off that doubles, up to
    ``RETRY_MAX_SECONDS``, until a record is delivered); ``add`` takes a newly spooled
    one, skipping any the restart already took; ``wait`` pauses the feed (the client's
    queue is full)."""

    def __init__(self) -> None:
        self._pending: deque[SpooledRecord] = deque()
        self._last = (-1, -1)
        self._resume_at = 0.0
        self._delay = RETRY_MIN_SECONDS

    def restart(
        self, unacknowledged: Sequence[SpooledRecord], now: float, *, backoff: bool
    ) -> None:
        self._pending.clear()
        self._last = (-1, -1)
        for record in unacknowledged:
            self.add(record)
        if backoff:
            self._resume_at = now + self._delay
            self._delay = min(RETRY_MAX_SECONDS, self._delay * 2)
        else:
            self._resume_at = now

    def add(self, record: SpooledRecord) -> None:
        position = _position(record)
        if position > self._last:
            self._pending.append(record)
            self._last = position

    def delivered(self) -> None:
        self._delay = RETRY_MIN_SECONDS

    def wait(self, until: float) -> None:
        self._resume_at = until

    def due(self, now: float) -> SpooledRecord | None:
        """The next record to produce, if the feed is not paused; ``sent`` takes it off."""
        if not self._pending or now < self._resume_at:
            return None
        return self._pending[0]

    def sent(self) -> None:
        self._pending.popleft()

    def __len__(self) -> int:
        return len(self._pending)


#: How long the feed pauses when the client's own queue is full.
_QUEUE_FULL_WAIT_SECONDS = 0.1


class KafkaSink:
    """Events to Kafka topics through the spool; see the module's text."""

    def __init__(
        self,
        bootstrap: str,
        topics: Mapping[EventStream, str],
        spool: Spool,
    ) -> None:
        missing = set(EventStream) - set(topics)
        if missing:
            raise ValueError(f"no topic for the event streams {sorted(missing)}")
        self._topics = dict(topics)
        self._spool = spool
        self._config = producer_config(bootstrap)
        self._config["error_cb"] = self._on_error
        self._inbox: queue.SimpleQueue[SpooledRecord] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed = ProducerFeed()
        self._commit = GroupCommit(spool.sync)
        # Set by librdkafka's error callback on a fatal error: the producer is replaced.
        self._fatal: KafkaError | None = None
        # Set when a record of the current producer failed: the feed restarts from the spool.
        self._failed = False
        # Delivery reports of a replaced (or purged) producer are ignored: its records are
        # sent again.
        self._generation = 0
        self.delivered = 0
        self.producer_restarts = 0
        self.thread_restarts = 0

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
        producer = Producer(self._config)  # a bad configuration fails the start
        EVENTS_BACKLOG.set_function(lambda: self._spool.backlog)
        EVENTS_SPOOL_FULL.set_function(lambda: int(self._spool.full))
        EVENTS_SPOOL_BYTES.set_function(lambda: self._spool.size)
        self._start_thread(producer)

    def _start_thread(self, producer: Producer | None) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(producer,), name="kafka-events", daemon=True
        )
        self._thread.start()

    def _ensure_running(self) -> None:
        """A Kafka thread that died (nothing it catches should let it) is started again:
        with a new producer, from every unacknowledged record."""
        thread = self._thread
        if thread is None or thread.is_alive() or self._stopping.is_set():
            return
        logger.error("the Kafka thread died; starting it again")
        self.thread_restarts += 1
        PRODUCER_RESTARTS.inc()
        self._generation += 1  # the dead thread's producer: its reports are ignored
        self._start_thread(None)

    async def publish(self, events: Sequence[Event]) -> None:
        if self._thread is None or self._stopping.is_set():
            raise EventsRefused("the Kafka event sink is not running")
        if not events:
            return
        self._ensure_running()
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
        self._ensure_running()
        return self._thread is not None and self._thread.is_alive()

    # --- the Kafka thread -------------------------------------------------------------

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        else:
            logger.debug("Kafka client: %s", error)

    def _run(self, producer: Producer | None) -> None:
        fresh = True  # this thread's first feed goes at once; one after a failure backs off
        while not self._stopping.is_set():
            try:
                if producer is None:
                    producer = Producer(self._config)
                self._restart_feed(backoff=not fresh)
                fresh = False
                self._pump(producer)
            except Exception:
                logger.exception(
                    "the Kafka producer failed; replacing it and producing every "
                    "unacknowledged event again from the spool"
                )
                if producer is not None:
                    self._discard(producer)
                producer = None
                self._fatal = None
                fresh = False
                self.producer_restarts += 1
                PRODUCER_RESTARTS.inc()
                self._stopping.wait(RETRY_MIN_SECONDS)  # were even the client not made
        if producer is not None:
            self._final_flush(producer)

    def _pump(self, producer: Producer) -> None:
        while not self._stopping.is_set():
            if self._fatal is not None:
                raise KafkaException(self._fatal)
            if self._failed:
                # Newer records may sit behind the failed one: none may go first.
                self._discard(producer)
                self._restart_feed(backoff=True)
            self._produce_waiting(producer)
            producer.poll(_POLL_SECONDS)

    def _discard(self, producer: Producer) -> None:
        """Stop ``producer``'s records: their reports are ignored from now, and every
        unacknowledged record is produced again."""
        self._generation += 1
        with contextlib.suppress(Exception):
            producer.purge()
            producer.poll(0)

    def _restart_feed(self, *, backoff: bool) -> None:
        self._failed = False
        while True:  # the inbox's records are all in the spool too
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
        self._feed.restart(self._spool.unacknowledged(), time.monotonic(), backoff=backoff)

    def _produce_waiting(self, producer: Producer) -> None:
        while True:
            try:
                self._feed.add(self._inbox.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        while (record := self._feed.due(now)) is not None:
            if not self._produce(producer, record):
                # The client's queue is full: this one and the rest wait, in order.
                self._feed.wait(now + _QUEUE_FULL_WAIT_SECONDS)
                return
            self._feed.sent()

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
        except KafkaException as error:
            if error.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._undeliverable(record, error)
        return True

    def _undeliverable(self, record: SpooledRecord, error: KafkaException) -> None:
        """A record the client refuses for its size: no producer will ever send it, and
        retrying it would hold back every event after it (the feed keeps spool order) for
        good, across restarts too. It leaves the spool, counted and logged."""
        self._spool.ack(record)  # "never send it again", though no broker has it
        EVENTS_UNDELIVERABLE.inc()
        logger.error(
            "event %s (%d bytes) dropped, it can never be sent to Kafka: %s",
            record.outgoing.record_id,
            len(record.outgoing.value),
            error,
        )

    def _on_delivery(self, record: SpooledRecord, error: KafkaError | None) -> None:
        if error is None:
            self._spool.ack(record)
            self.delivered += 1
            EVENTS_DELIVERED.inc()
            self._feed.delivered()
            return
        if self._stopping.is_set():
            return  # it stays in the spool for the next start
        if error.fatal():
            self._fatal = error
            return
        logger.warning(
            "event %s not delivered (%s); producing every unacknowledged event again",
            record.outgoing.record_id,
            error,
        )
        self._failed = True

    def _final_flush(self, producer: Producer) -> None:
        # Whatever is still in the client's queue gets a short chance; it stays spooled anyway.
        try:
            self._produce_waiting(producer)
            remaining = producer.flush(self._flush_seconds)
            if remaining:
                producer.purge()  # so that destroying the client does not wait for them
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
