"""The SQLite connection: WAL mode, forward migrations on open, and explicit transactions.

One connection serves the whole process behind a lock; the agent serves one user, so
writes are few and short, and a single writer is what SQLite wants anyway. Each write
runs in ``BEGIN IMMEDIATE ... COMMIT``, so a crash at any point leaves either the whole
change or none of it. ``synchronous=NORMAL`` in WAL mode survives a killed process (the
OS holds the written pages); only a power cut can lose the last commits.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from dexorder.agent.errors import StoreError
from dexorder.agent.store.migrations import LATEST_VERSION, MIGRATIONS

DATABASE_FILE = "agent.db"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Database:
    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._connection = connection
        self._lock = threading.RLock()
        self.path = path

    @classmethod
    def open(cls, data_dir: Path, migrations: Sequence[tuple[int, str]] = MIGRATIONS) -> Database:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            path = data_dir / DATABASE_FILE
            # Autocommit mode: transactions are begun explicitly, never implicitly.
            connection = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=10
            )
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the database in {data_dir}: {error}") from error
        database = cls(connection, path)
        try:
            database._configure()
            database.migrate(migrations)
        except BaseException:
            connection.close()
            raise
        return database

    def _configure(self) -> None:
        try:
            mode = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as error:
            raise StoreError(f"cannot configure {self.path}: {error}") from error
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: the file system does not support WAL mode")

    @property
    def schema_version(self) -> int:
        with self._lock:
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            row = self._connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self, migrations: Sequence[tuple[int, str]] = MIGRATIONS) -> list[int]:
        """Apply each migration newer than the database, each in its own transaction."""
        current = self.schema_version
        known = migrations[-1][0] if migrations else 0
        if current > known:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this agent's {known}; "
                "run a newer agent image (schemas only migrate forward)"
            )
        applied = []
        for version, script in migrations:
            if version <= current:
                continue
            with self._lock:
                try:
                    # executescript would commit a transaction begun outside it, so the
                    # BEGIN and COMMIT live in the script itself.
                    self._connection.executescript(
                        f"BEGIN IMMEDIATE;\n{script}\n"
                        f"INSERT INTO schema_version (version, applied_at) "
                        f"VALUES ({int(version)}, '{utc_now()}');\nCOMMIT;"
                    )
                except sqlite3.Error as error:
                    if self._connection.in_transaction:
                        self._connection.execute("ROLLBACK")
                    raise StoreError(f"migration {version} failed: {error}") from error
            applied.append(version)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it commits, or none of it does."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: one deferred transaction, so counts and rows agree."""
        with self._lock:
            self._connection.execute("BEGIN")
            try:
                yield self._connection
            finally:
                self._connection.execute("COMMIT")

    @contextmanager
    def held_if_free(self) -> Iterator[bool]:
        """Hold the connection's lock if no other thread holds it, without waiting.

        Yields whether it is held; the caller's :meth:`transaction` and :meth:`reading`
        inside then take it again at once (the lock is reentrant). For callers that must
        not block, such as the event loop, when a worker thread has a long write under way.
        The event loop's coroutines share one thread, so none may hold the lock across an
        ``await``: the reentrant lock would let another coroutine in.
        """
        held = self._lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                self._lock.release()

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._connection.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._connection.close()


__all__ = ["LATEST_VERSION", "Database", "utc_now"]
