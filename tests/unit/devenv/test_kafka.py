"""The Kafka broker's generated configuration and command lines."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from dexorder.devenv.kafka import (
    HEAP,
    KAFKA_VERSION,
    ClassDataArchive,
    java_argv,
    kafka_jars,
    new_cluster_id,
    render_log4j2,
    render_server_properties,
)


def _parse(properties: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in properties.splitlines() if line)


def test_the_broker_is_its_own_controller_on_two_loopback_ports() -> None:
    settings = _parse(render_server_properties(9092, 9093, Path("/data/kraft")))
    assert settings["process.roles"] == "broker,controller"
    assert settings["node.id"] == "1"
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert settings["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert settings["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert settings["controller.listener.names"] == "CONTROLLER"
    assert settings["log.dirs"] == "/data/kraft"
    assert settings["group.initial.rebalance.delay.ms"] == "0"


def test_every_internal_topic_fits_a_single_node() -> None:
    settings = _parse(render_server_properties(9092, 9093, Path("/data/kraft")))
    single_node = {
        key: value
        for key, value in settings.items()
        if "replication.factor" in key or "isr" in key or "insync" in key
    }
    assert set(single_node) >= {
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
        "default.replication.factor",
        "min.insync.replicas",
    }
    assert set(single_node.values()) == {"1"}


def test_a_cluster_id_is_22_characters_of_base64url_never_led_by_a_dash() -> None:
    for _ in range(500):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_the_jvm_keeps_its_temp_files_and_log_config_in_the_data_dir() -> None:
    argv = java_argv(
        "java", "/cache/libs/*", Path("/data"), "kafka.Kafka", "/data/server.properties"
    )
    assert argv[0] == "java"
    assert HEAP in argv
    assert "-Djava.io.tmpdir=/data/tmp" in argv
    assert "-Dlog4j2.configurationFile=/data/log4j2.properties" in argv
    assert argv[-4:] == ["-cp", "/cache/libs/*", "kafka.Kafka", "/data/server.properties"]


def test_logs_go_to_stdout_at_the_level_asked() -> None:
    config = render_log4j2("WARN")
    assert "appender.stdout.type = Console" in config
    assert "rootLogger.level = WARN" in config


def test_the_jar_set_pins_kafka_4_for_scala_2_13() -> None:
    jars = kafka_jars()
    assert KAFKA_VERSION.startswith("4.")
    assert any(
        a.coordinate == f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}" for a in jars.artifacts
    )
    assert jars.directory.name == f"kafka-{KAFKA_VERSION}"


def _archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClassDataArchive:
    monkeypatch.setenv("DEXORDER_CACHE", str(tmp_path / "cache"))
    java = tmp_path / "java"
    java.write_text("")
    jars = kafka_jars()
    jars.directory.mkdir(parents=True)
    return ClassDataArchive(jars, str(java))


def _recording(options: list[str]) -> Path:
    (option,) = options
    assert option.startswith("-XX:ArchiveClassesAtExit=")
    return Path(option.partition("=")[2])


def test_without_an_archive_a_broker_records_one_and_a_clean_exit_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _archive(tmp_path, monkeypatch)
    assert archive.use_options() == []
    recording = _recording(archive.record_options())
    recording.write_bytes(b"classes")  # what the JVM writes as it exits
    archive.settle(143)
    assert archive.path.read_bytes() == b"classes"
    assert not recording.exists()
    assert archive.use_options() == [f"-XX:SharedArchiveFile={archive.path}"]
    assert archive.record_options() == archive.use_options()


def test_a_killed_broker_leaves_no_archive_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _archive(tmp_path, monkeypatch)
    recording = _recording(archive.record_options())
    recording.write_bytes(b"half")
    archive.settle(-9)
    assert not archive.path.exists()
    assert not recording.exists()
