"""The SQLite store: WAL, forward migrations, and all-or-nothing transactions."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dexorder.agent.errors import StoreError
from dexorder.agent.store.db import Database
from dexorder.agent.store.migrations import LATEST_VERSION, MIGRATIONS


def test_a_new_database_is_in_wal_mode_at_the_latest_version(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    try:
        assert database.schema_version == LATEST_VERSION
        with database.reading() as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        database.close()


def test_an_old_schema_migrates_forward_and_keeps_its_rows(tmp_path: Path) -> None:
    old = Database.open(tmp_path, MIGRATIONS[:1])
    with old.transaction() as connection:
        connection.execute(
            "INSERT INTO preferences (key, value, updated_at) VALUES ('language', '\"de\"', 'x')"
        )
    assert old.schema_version == 1
    old.close()

    database = Database.open(tmp_path)
    try:
        assert database.schema_version == LATEST_VERSION
        with database.reading() as connection:
            assert connection.execute("SELECT value FROM preferences").fetchone()[0] == '"de"'
            assert connection.execute("SELECT COUNT(*) FROM strategies").fetchone()[0] == 0
        # A second open applies nothing.
        assert database.migrate() == []
    finally:
        database.close()


def test_a_newer_schema_than_the_code_is_refused(tmp_path: Path) -> None:
    Database.open(tmp_path).close()
    with pytest.raises(StoreError, match="newer than this agent's 1"):
        Database.open(tmp_path, MIGRATIONS[:1])


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    broken = (*MIGRATIONS, (LATEST_VERSION + 1, "CREATE TABLE extra (x); SELECT * FROM nowhere;"))
    with pytest.raises(StoreError, match=f"migration {LATEST_VERSION + 1} failed"):
        Database.open(tmp_path, broken)
    database = Database.open(tmp_path)
    try:
        assert database.schema_version == LATEST_VERSION
        with database.reading() as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in tables
    finally:
        database.close()


def test_a_transaction_that_raises_writes_nothing(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    try:
        insert = "INSERT INTO turns (session_id, role, content, created_at) VALUES ('s', ?, ?, 'x')"

        def write_two_turns_the_second_invalid() -> None:
            with database.transaction() as connection:
                connection.execute(insert, ("user", "a"))
                connection.execute(insert, ("robot", "b"))

        with pytest.raises(sqlite3.IntegrityError):
            write_two_turns_the_second_invalid()
        with database.reading() as connection:
            assert connection.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
        assert database.integrity_check() == "ok"
    finally:
        database.close()


def test_held_if_free_holds_a_free_store_and_lets_transactions_in(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    try:
        with database.held_if_free() as held:
            assert held
            with database.transaction() as connection:  # the same thread may enter
                connection.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
        # It lets go afterwards: another thread finds the store free.
        seen: list[bool] = []

        def look() -> None:
            with database.held_if_free() as free:
                seen.append(free)

        other = threading.Thread(target=look)
        other.start()
        other.join()
        assert seen == [True]
    finally:
        database.close()


def test_held_if_free_does_not_wait_for_a_store_another_thread_holds(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    held, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with database.transaction():
            held.set()
            release.wait(5)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert held.wait(5)
        began = time.monotonic()
        with database.held_if_free() as free:
            assert not free
        assert time.monotonic() - began < 1
    finally:
        release.set()
        writer.join()
        database.close()
