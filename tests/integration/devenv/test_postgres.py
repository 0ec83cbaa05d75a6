"""The private PostgreSQL cluster, against the real server."""

from __future__ import annotations

import os

import psycopg
import pytest

from dexorder.devenv.postgres import (
    DATABASE,
    STAMP,
    PostgresService,
    cluster_template,
    find_bindir,
    server_account,
)


def test_a_row_written_is_read_back(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute("CREATE TABLE harness_rows (id serial PRIMARY KEY, body text NOT NULL)")
        connection.execute("INSERT INTO harness_rows (body) VALUES (%s)", ("written by psycopg",))
        connection.commit()
    with psycopg.connect(postgres_dsn) as connection:
        rows = connection.execute("SELECT body FROM harness_rows").fetchall()
    assert rows == [("written by psycopg",)]


def test_the_dsn_names_the_dexorder_database_on_loopback(postgres_service: PostgresService) -> None:
    assert (
        postgres_service.dsn == f"postgresql://postgres@127.0.0.1:{postgres_service.port}/dexorder"
    )
    with psycopg.connect(postgres_service.dsn) as connection:
        row = connection.execute("SELECT current_database(), inet_server_addr()::text").fetchone()
    assert row == (DATABASE, "127.0.0.1/32")


def test_each_cluster_is_a_private_copy_of_the_cached_template(
    postgres_service: PostgresService,
) -> None:
    stamp = cluster_template(find_bindir(), server_account()).parent / STAMP
    stamp_before = stamp.stat().st_mtime_ns
    with PostgresService() as other, psycopg.connect(other.dsn) as connection:
        connection.execute("CREATE TABLE only_in_the_other_cluster (x int)")
        connection.commit()
    assert stamp.stat().st_mtime_ns == stamp_before
    with psycopg.connect(postgres_service.dsn) as connection:
        row = connection.execute("SELECT to_regclass('only_in_the_other_cluster')").fetchone()
    assert row == (None,)


def test_stop_leaves_no_process_and_no_data_dir() -> None:
    # Without the template, initdb runs into the data directory itself.
    service = PostgresService(use_template=False)
    try:
        service.start()
        group, data_dir = service.pid, service.data_dir
        # An open session must not hold the shutdown up.
        connection = psycopg.connect(service.dsn)
        try:
            connection.execute("SELECT 1")
            service.stop()
        finally:
            connection.close()
    finally:
        service.stop()
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
