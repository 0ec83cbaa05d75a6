"""The gateway's SQL schema as versioned migrations, applied in order.

Each ``NNNN_name.sql`` file in this package runs once, in its own transaction, and is
recorded in ``schema_migrations`` with a checksum. A transaction-scoped advisory lock
makes replicas that start together apply each migration exactly once. A migration that
was edited after it was applied is refused: fix forward with a new file instead.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg.conninfo import conninfo_to_dict

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql$")
# An arbitrary constant that names "schema migrations of the dexorder gateway".
_LOCK_KEY = 0x6465786F72646572 & 0x7FFFFFFFFFFFFFFF

_CREATE_LEDGER = b"""
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The schema could not be brought up to date; the message says which step failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migrations shipped in this package, checked to be numbered 1, 2, 3, ..."""
    migrations = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise MigrationError(f"{entry.name}: migration files are named NNNN_name.sql")
            continue
        migrations.append(
            Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8"))
        )
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3, ... without gaps: {versions}")
    return migrations


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without its password, for messages."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable DATABASE_URL"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


async def apply_migrations(dsn: str) -> list[Migration]:
    """Apply every migration not yet applied, in order; returns the ones applied now."""
    applied: list[Migration] = []
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                await connection.execute(_CREATE_LEDGER)
            for migration in load_migrations():
                if await _apply_one(connection, migration):
                    applied.append(migration)
        # The strategy review's LangGraph checkpoints: their own versioned migrations.
        from dexorder.gateway.workflows.strategy_review import setup_checkpoints

        await setup_checkpoints(dsn)
    except psycopg.Error as error:
        raise MigrationError(f"migrating {describe_dsn(dsn)} failed: {error}") from error
    return applied


async def _apply_one(
    connection: psycopg.AsyncConnection[tuple[object, ...]], migration: Migration
) -> bool:
    label = f"{migration.version:04d}_{migration.name}"
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        cursor = await connection.execute(
            "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
        )
        row = await cursor.fetchone()
        if row is not None:
            if row[0] != migration.checksum:
                raise MigrationError(
                    f"migration {label} was changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            return False
        try:
            # Bytes: a file's text is not a literal, and it holds several statements.
            await connection.execute(migration.sql.encode())
        except psycopg.Error as error:
            raise MigrationError(f"migration {label} failed: {error}") from error
        await connection.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )
    log.info("applied migration %s", label)
    return True
