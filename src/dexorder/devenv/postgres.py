"""A private PostgreSQL cluster from Debian's ``postgresql`` package.

``initdb`` runs once per server version into a cached template cluster, with
trust authentication (the server listens on loopback only); each start copies the
template into the service's data directory, in RAM where there is /dev/shm, and
runs it with durability switched off, since the data lives no longer than a test
run. The postmaster runs in the foreground under ``ManagedProcess``, so stopping
it stops every backend it forked.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from dexorder.devenv.binaries import cache_root
from dexorder.devenv.errors import PrerequisiteMissing, ServiceFailed
from dexorder.devenv.process import LOOPBACK, ManagedProcess, free_port, wait_until
from dexorder.devenv.service import Service

DEBIAN_PACKAGE = "postgresql"
DATABASE = "dexorder"
STAMP = ".complete"
SUPERUSER = "postgres"
# initdb and postgres refuse to run as root; as root we drop to the package's own user.
SERVICE_ACCOUNT = "postgres"
_REMEDY = f"install Debian's '{DEBIAN_PACKAGE}' package (apt-get install -y {DEBIAN_PACKAGE})"
_VERSIONED_BINDIR = re.compile(r"/usr/lib/postgresql/(\d+)/bin$")
_SERVER_VERSION = re.compile(r"\(PostgreSQL\) (\S+)")

# Settings that trade durability for speed: the cluster is thrown away after the run.
SERVER_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    # Dynamic shared memory as files in the data directory, not /dev/shm/PostgreSQL.*,
    # so even a killed server leaves nothing outside the directory that stop() removes.
    "dynamic_shared_memory_type": "mmap",
}


def _has_server_binaries(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("initdb", "postgres"))


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def _versioned_bindirs() -> list[Path]:
    """Debian's ``/usr/lib/postgresql/<major>/bin``, newest major first."""
    found = [
        (int(match.group(1)), path)
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (match := _VERSIONED_BINDIR.search(str(path)))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def find_bindir() -> Path:
    """The directory that holds ``initdb`` and ``postgres``."""
    candidates: list[Path] = []
    if (configured := _pg_config_bindir()) is not None:
        candidates.append(configured)
    candidates += _versioned_bindirs()
    if (on_path := shutil.which("initdb")) is not None:
        # /usr/local/bin may hold links into the versioned directory.
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if _has_server_binaries(directory):
            return directory
    raise PrerequisiteMissing("postgres", _REMEDY)


@dataclass(frozen=True)
class Account:
    """Who the server processes run as: ``None`` ids mean the current user."""

    uid: int | None = None
    gid: int | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.uid is None or self.gid is None:
            return list(argv)
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def server_account() -> Account:
    if os.geteuid() != 0:
        return Account()
    try:
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError as missing:
        raise PrerequisiteMissing(f"user {SERVICE_ACCOUNT!r}", _REMEDY) from missing
    return Account(entry.pw_uid, entry.pw_gid)


def server_argv(
    bindir: Path, cluster: Path, sockets: Path, port: int, also_on: str | None = None
) -> list[str]:
    argv = [str(bindir / "postgres"), "-D", str(cluster), "-p", str(port)]
    listen = f"{LOOPBACK},{also_on}" if also_on else LOOPBACK
    argv += ["-h", listen, "-k", str(sockets)]
    for key, value in SERVER_SETTINGS.items():
        argv += ["-c", f"{key}={value}"]
    return argv


def dsn(port: int, database: str = DATABASE) -> str:
    return f"postgresql://{SUPERUSER}@{LOOPBACK}:{port}/{database}"


def server_version(bindir: Path) -> str:
    """The version number in ``postgres --version``, e.g. ``15.18``."""
    result = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
    match = _SERVER_VERSION.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise ServiceFailed(f"postgres --version failed:\n{result.stdout}{result.stderr}")
    return match.group(1)


def run_initdb(bindir: Path, cluster: Path, account: Account) -> None:
    argv = [str(bindir / "initdb"), "-D", str(cluster), "-U", SUPERUSER]
    argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    # 1 MB WAL segments instead of 16: a third less to write for every cluster.
    argv += ["--wal-segsize=1"]
    result = subprocess.run(
        account.command(argv), cwd=cluster.parent, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ServiceFailed(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def cluster_template(bindir: Path, account: Account) -> Path:
    """A freshly initdb'd cluster kept in the cache, built once per server version.

    initdb costs about 1 s of CPU and 1 to 2.5 s of wall time here; copying its
    result into RAM takes 0.1 s and yields the same empty cluster.
    """
    home = cache_root() / f"postgres-{server_version(bindir)}"
    template = home / "cluster"
    if (home / STAMP).exists() and template.is_dir():
        return template
    home.mkdir(parents=True, exist_ok=True)
    # initdb runs as the service account, which may not reach the cache (under /root),
    # so it writes to a scratch directory that is then copied in.
    scratch = Path(tempfile.mkdtemp(prefix="dexorder-initdb-"))
    staging = Path(tempfile.mkdtemp(prefix="cluster-", dir=home))
    try:
        account.own(scratch)
        run_initdb(bindir, scratch / "cluster", account)
        shutil.rmtree(staging)
        shutil.copytree(scratch / "cluster", staging, symlinks=True)
        # A template that exists is whole (it arrived by rename): another run won the race.
        if not template.is_dir():
            staging.rename(template)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    (home / STAMP).write_text("initdb done\n")
    return template


def _own_tree(root: Path, account: Account) -> None:
    account.own(root)
    for directory, subdirectories, files in os.walk(root):
        for name in (*subdirectories, *files):
            account.own(Path(directory) / name)


def memory_scratch() -> Path | None:
    """A RAM-backed directory for throw-away clusters, when the machine has one.

    Copying a cluster onto this machine's disk costs about 1 s of system time and
    into /dev/shm 0.1 s; a test cluster holds megabytes, and never needs to outlive RAM.
    """
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


class PostgresService(Service):
    """A throw-away cluster on a free loopback port with a database ``dexorder``.

    With ``use_template`` (the default) the cluster is a copy of one cached initdb
    run; without it, initdb runs into the data directory on every start.
    """

    name = "postgres"

    def __init__(
        self, *, use_template: bool = True, also_on: str | None = None, clients: str | None = None
    ) -> None:
        """``also_on`` is one more address to listen on, and ``clients`` the network allowed to
        connect there: a real node's bridge address and its pods' range."""
        super().__init__()
        self.port = 0
        self._use_template = use_template
        self._also_on = also_on
        self._clients = clients
        self._process: ManagedProcess | None = None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = Path(
                tempfile.mkdtemp(prefix=f"dexorder-{self.name}-", dir=memory_scratch())
            )
        return self._data_dir

    @property
    def dsn(self) -> str:
        if self.port == 0:
            raise ServiceFailed("postgres has not been started")
        return dsn(self.port)

    def start(self) -> None:
        bindir = find_bindir()
        account = server_account()
        cluster = self.data_dir / "cluster"
        sockets = self.data_dir / "sockets"
        sockets.mkdir(exist_ok=True)
        for path in (self.data_dir, sockets):
            account.own(path)
        if self._use_template:
            shutil.copytree(cluster_template(bindir, account), cluster, symlinks=True)
            _own_tree(cluster, account)
        else:
            run_initdb(bindir, cluster, account)
        if self._clients:
            with (cluster / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self._clients} trust\n")
        self.port = free_port()
        self._process = ManagedProcess(
            "postgres",
            account.command(server_argv(bindir, cluster, sockets, self.port, self._also_on)),
            log_path=self.data_dir / "postgres.log",
            cwd=self.data_dir,
        ).start()
        admin = dsn(self.port, "postgres")
        wait_until(lambda: _answers(admin), timeout=30, what="postgres", process=self._process)
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{DATABASE}"')

    def _stop_processes(self) -> None:
        if self._process is None:
            return
        # SIGINT is PostgreSQL's "fast" shutdown: it ends open sessions instead of waiting.
        # A later SIGTERM cannot downgrade it, and stop() escalates to SIGKILL if need be.
        self._process.signal(signal.SIGINT)
        self._process.stop(timeout=15)
        self._process = None

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group's id."""
        if self._process is None:
            raise ServiceFailed("postgres is not running")
        return self._process.pid

    def describe(self) -> dict[str, str]:
        return {"dsn": self.dsn, "data_dir": str(self.data_dir)}


def _answers(connection_string: str) -> bool:
    with psycopg.connect(connection_string, connect_timeout=2):
        return True
