"""A single-node KRaft Kafka broker run from the jars of ``org.apache.kafka:kafka_2.13``.

The jars come from Maven Central once (see ``maven.py``). The broker is its own
controller, formats its storage with ``kafka.tools.StorageTool`` on first start,
and keeps its logs and data in the service's data directory. ``restart()`` stops
and starts it on the same ports and data, as a crashed or upgraded broker would be.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient

from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.maven import Artifact, JarSet, ensure_jars
from dexorder.devenv.process import (
    LOOPBACK,
    ManagedProcess,
    free_port,
    require_binary,
    tcp_answers,
    wait_until,
)
from dexorder.devenv.service import Service

KAFKA_VERSION = "4.1.1"
# The version of log4j-core that kafka_2.13 depends on; its SLF4J 1.7 binding is not a
# dependency of the broker jar, and without it Kafka's own logging would go nowhere.
LOG4J_VERSION = "2.24.3"
JAVA_REMEDY = "install Java 17 (apt-get install -y openjdk-17-jre-headless)"
NODE_ID = 1
HEAP = "-Xmx512m"


def kafka_jars(version: str = KAFKA_VERSION) -> JarSet:
    return JarSet(
        "kafka",
        version,
        (
            Artifact("org.apache.kafka", "kafka_2.13", version),
            Artifact("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
        ),
    )


def new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID as 22 characters of unpadded base64url.

    Like Kafka's own ``Uuid.randomUuid``, it never starts with ``-``, which the
    storage tool's argument parser would read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def render_server_properties(broker_port: int, controller_port: int, log_dirs: Path) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.bootstrap.servers": f"{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{broker_port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dirs),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # One partition each: creating the default 50 makes a first consumer group wait.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        # Few threads: a test broker serves a handful of clients on a small machine.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "group.coordinator.threads": "1",
        "share.coordinator.threads": "1",
        "num.recovery.threads.per.data.dir": "1",
        "log.retention.hours": "168",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def render_log4j2(level: str = "INFO") -> str:
    """Log to stdout, which ManagedProcess keeps in the data directory."""
    return "\n".join(
        [
            "status = warn",
            "appender.stdout.type = Console",
            "appender.stdout.name = STDOUT",
            "appender.stdout.layout.type = PatternLayout",
            "appender.stdout.layout.pattern = [%d] %p %m (%c)%n",
            f"rootLogger.level = {level}",
            "rootLogger.appenderRefs = stdout",
            "rootLogger.appenderRef.stdout.ref = STDOUT",
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "logger.state.name = state.change.logger",
            "logger.state.level = WARN",
            "",
        ]
    )


class ClassDataArchive:
    """A JVM class-data-sharing archive of the Kafka classes, made once and reused.

    Loading Kafka's classes from the archive instead of the jars cut a broker's start
    from 10.1 s to 6.7 s here (median of 3). The JVM writes the archive when a
    broker that was started to record it exits cleanly; it is kept per jar set and
    per Java build, and a JVM that cannot use an archive simply ignores it.
    """

    def __init__(self, jars: JarSet, java: str) -> None:
        launcher = Path(java).resolve()
        build = f"{launcher}:{launcher.stat().st_mtime_ns}"
        key = hashlib.sha256(build.encode()).hexdigest()[:12]
        self.path = jars.directory / f"classes-{key}.jsa"
        self._recording: Path | None = None

    def use_options(self) -> list[str]:
        """Options that load from the archive, when there is one."""
        return [f"-XX:SharedArchiveFile={self.path}"] if self.path.exists() else []

    def record_options(self) -> list[str]:
        """Options that use the archive, or else record one at exit."""
        if self.path.exists():
            return self.use_options()
        self._recording = self.path.with_name(f"{self.path.stem}.{uuid.uuid4().hex}.partial")
        return [f"-XX:ArchiveClassesAtExit={self._recording}"]

    def settle(self, exit_code: int | None) -> None:
        """Keep a recording only if the JVM exited by itself, having written it whole."""
        recording, self._recording = self._recording, None
        if recording is None or not recording.exists():
            return
        if exit_code is not None and exit_code >= 0 and recording.stat().st_size > 0:
            os.replace(recording, self.path)
        else:
            recording.unlink()


def java_argv(
    java: str,
    classpath: str,
    work_dir: Path,
    main: str,
    *args: str,
    extra: Sequence[str] = (),
) -> list[str]:
    options = [
        HEAP,
        "-Xms64m",
        "-XX:+UseSerialGC",
        # C1 alone: on 2 busy cores it halves the time to a ready broker (measured 12.6 s
        # against 24.3 s, median of 3), and a test broker never runs long enough to
        # repay C2's compile work.
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        # Native libraries (zstd, snappy) unpack into the temp dir: keep them in ours.
        f"-Djava.io.tmpdir={work_dir / 'tmp'}",
        f"-Dlog4j2.configurationFile={work_dir / 'log4j2.properties'}",
        # Class-data sharing reports each class it skips; none of it is actionable.
        "-Xlog:cds=off",
        "-Xlog:cds+dynamic=off",
        *extra,
    ]
    return [java, *options, "-cp", classpath, main, *args]


class KafkaService(Service):
    """A KRaft broker and controller in one JVM, on free loopback ports."""

    name = "kafka"

    def __init__(self, *, version: str = KAFKA_VERSION, mvn: str | None = None) -> None:
        super().__init__()
        self.jars = kafka_jars(version)
        self.port = 0
        self.controller_port = 0
        self.fetched = False
        self._mvn = mvn
        self._process: ManagedProcess | None = None
        self._archive: ClassDataArchive | None = None

    @property
    def bootstrap(self) -> str:
        if self.port == 0:
            raise ServiceFailed("kafka has not been started")
        return f"{LOOPBACK}:{self.port}"

    @property
    def _properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log_dirs(self) -> Path:
        return self.data_dir / "kraft"

    def start(self) -> None:
        java = require_binary("java", JAVA_REMEDY)
        fetch = ensure_jars(self.jars, mvn=self._mvn)
        self.fetched = fetch.fetched
        if self.port == 0:
            # Ports survive restart(), so clients' bootstrap addresses stay valid.
            self.port = free_port()
            self.controller_port = free_port()
        (self.data_dir / "tmp").mkdir(exist_ok=True)
        (self.data_dir / "log4j2.properties").write_text(render_log4j2())
        self._properties.write_text(
            render_server_properties(self.port, self.controller_port, self._log_dirs)
        )
        self._archive = ClassDataArchive(self.jars, java)
        if not (self._log_dirs / "meta.properties").exists():
            self._format(java, self._archive)
        self._process = ManagedProcess(
            "kafka",
            java_argv(
                java,
                self.jars.classpath,
                self.data_dir,
                "kafka.Kafka",
                str(self._properties),
                extra=self._archive.record_options(),
            ),
            log_path=self.data_dir / "kafka.log",
            cwd=self.data_dir,
        ).start()
        bootstrap = self.bootstrap
        wait_until(lambda: _answers(bootstrap), timeout=90, what="kafka", process=self._process)

    def _format(self, java: str, archive: ClassDataArchive) -> None:
        argv = java_argv(
            java,
            self.jars.classpath,
            self.data_dir,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            new_cluster_id(),
            "-c",
            str(self._properties),
            extra=archive.use_options(),
        )
        result = subprocess.run(argv, cwd=self.data_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceFailed(f"kafka storage format failed:\n{result.stdout}{result.stderr}")

    def restart(self) -> None:
        """Stop the broker and start it again on the same ports and data."""
        self.stop_broker()
        self.start()

    def stop_broker(self) -> None:
        """Stop the broker but keep its ports and data: ``start()`` brings it back as it was.

        For outage tests: clients see the broker go away and come back at the same address.
        """
        self._stop_processes()

    def _stop_processes(self) -> None:
        if self._process is not None:
            # A clean shutdown writes its snapshot, so the next start skips log recovery.
            self._process.stop(timeout=30)
            if self._archive is not None:
                self._archive.settle(self._process.returncode)
            self._process = None

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group's id."""
        if self._process is None:
            raise ServiceFailed("kafka is not running")
        return self._process.pid

    def describe(self) -> dict[str, str]:
        return {"bootstrap": self.bootstrap, "data_dir": str(self.data_dir)}


def _answers(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    # Until the port is open, an AdminClient would only fill stderr with connection errors.
    if not tcp_answers(int(port), host):
        return False
    admin = AdminClient(
        {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000}
    )
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)
