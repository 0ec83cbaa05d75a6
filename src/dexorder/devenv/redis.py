"""A private ``redis-server`` from Debian's package, configured by a generated file."""

from __future__ import annotations

from pathlib import Path

import redis

from dexorder.devenv.errors import ServiceFailed
from dexorder.devenv.process import LOOPBACK, ManagedProcess, free_port, require_binary, wait_until
from dexorder.devenv.service import Service

DEBIAN_PACKAGE = "redis-server"
_REMEDY = f"install Debian's '{DEBIAN_PACKAGE}' package (apt-get install -y {DEBIAN_PACKAGE})"


def render_config(port: int, data_dir: Path) -> str:
    """A redis.conf for one loopback-only server whose files all live in ``data_dir``."""
    settings = [
        ("port", str(port)),
        ("bind", LOOPBACK),
        # Loopback only, no password: protected mode would refuse nothing here but adds noise.
        ("protected-mode", "no"),
        ("daemonize", "no"),
        ("dir", str(data_dir)),
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        # Empty logfile means stdout, which ManagedProcess writes to its log.
        ("logfile", '""'),
        ("save", '""'),
        ("databases", "16"),
    ]
    return "".join(f"{key} {value}\n" for key, value in settings)


class RedisService(Service):
    """One ``redis-server`` on a free loopback port, with append-only persistence."""

    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        if self.port == 0:
            raise ServiceFailed("redis has not been started")
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        binary = require_binary("redis-server", _REMEDY)
        self.port = free_port()
        config = self.data_dir / "redis.conf"
        config.write_text(render_config(self.port, self.data_dir))
        self._process = ManagedProcess(
            "redis-server",
            [binary, str(config)],
            log_path=self.data_dir / "redis.log",
            cwd=self.data_dir,
        ).start()
        url = self.url
        wait_until(lambda: _answers(url), timeout=15, what="redis", process=self._process)

    def _stop_processes(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group's id."""
        if self._process is None:
            raise ServiceFailed("redis is not running")
        return self._process.pid

    def describe(self) -> dict[str, str]:
        return {"url": self.url, "data_dir": str(self.data_dir)}


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()
