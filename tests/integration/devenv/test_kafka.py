"""The KRaft broker from Maven Central's jars, against the real server."""

from __future__ import annotations

import os
import uuid

import pytest
from confluent_kafka import Consumer, Producer

# confluent-kafka's stubs re-export NewTopic without marking it public.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from dexorder.devenv.kafka import KafkaService

pytestmark = pytest.mark.slow


def _create_topic(bootstrap: str) -> str:
    topic = f"harness-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    futures[topic].result(timeout=30)
    return topic


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    delivered: list[object] = []
    producer.produce(
        topic, value=value, key=b"k", on_delivery=lambda error, _: delivered.append(error)
    )
    assert producer.flush(30) == 0
    assert delivered == [None]


def _consume_one(bootstrap: str, topic: str) -> bytes:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"harness-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is None:
                continue
            assert message.error() is None, message.error()
            value = message.value()
            assert value is not None
            return value
    finally:
        consumer.close()
    raise AssertionError(f"no message arrived on {topic}")


def test_a_message_produced_is_consumed_again(kafka_bootstrap: str) -> None:
    topic = _create_topic(kafka_bootstrap)
    _produce(kafka_bootstrap, topic, b"round trip")
    assert _consume_one(kafka_bootstrap, topic) == b"round trip"


def test_a_second_start_uses_the_jar_cache_and_restart_keeps_the_data(
    kafka_service: KafkaService,
) -> None:
    # The session broker has filled the cache; this one must not run Maven at all,
    # so it is handed a Maven command that does not exist.
    stamp_before = kafka_service.jars.stamp.stat().st_mtime_ns
    service = KafkaService(mvn="/nonexistent/mvn")
    try:
        service.start()
        assert service.fetched is False
        assert service.jars.stamp.stat().st_mtime_ns == stamp_before

        topic = _create_topic(service.bootstrap)
        _produce(service.bootstrap, topic, b"kept across restart")
        first_pid, bootstrap = service.pid, service.bootstrap
        service.restart()
        assert service.pid != first_pid
        assert service.bootstrap == bootstrap
        assert _consume_one(service.bootstrap, topic) == b"kept across restart"
        group, data_dir = service.pid, service.data_dir
    finally:
        service.stop()
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
