"""Market datasets: OHLCV bars validated on the way in, stored as packed float columns."""

from __future__ import annotations

import sys
from array import array
from typing import Any

from dexorder.agent.errors import InvalidInput, NotFound
from dexorder.agent.limits import MAX_DATASET_BYTES
from dexorder.agent.store.db import Database, utc_now
from dexorder.agent.trading.ohlcv import (
    COLUMNS,
    DatasetError,
    DatasetFormat,
    OhlcvSeries,
    parse_dataset,
)
from dexorder.agent.validation import check_name

_ITEM_SIZE = array("d").itemsize


def pack(series: OhlcvSeries) -> bytes:
    """Six float64 columns back to back, little-endian whatever the machine."""
    packed = bytearray()
    for name in COLUMNS:
        column = array("d", series.column(name))
        if sys.byteorder == "big":
            column.byteswap()
        packed += column.tobytes()
    return bytes(packed)


def unpack(blob: bytes, rows: int) -> OhlcvSeries:
    width = rows * _ITEM_SIZE
    columns = []
    for index in range(len(COLUMNS)):
        column = array("d")
        column.frombytes(blob[index * width : (index + 1) * width])
        if sys.byteorder == "big":
            column.byteswap()
        columns.append(tuple(column))
    # Validated when saved; the transaction that stored it stored all of it.
    return OhlcvSeries(*columns)


def _payload_size(data: str | list[Any]) -> int:
    if isinstance(data, str):
        return len(data.encode("utf-8"))
    # A rough lower bound for a parsed JSON list, without serialising it twice.
    return sum(len(str(row)) for row in data)


class DatasetStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def save(self, name: str, data: str | list[Any], data_format: DatasetFormat) -> dict[str, Any]:
        check_name(name, "dataset")
        size = _payload_size(data)
        if size > MAX_DATASET_BYTES:
            raise InvalidInput(
                f"the dataset is {size:,} bytes; the limit is {MAX_DATASET_BYTES:,} bytes. "
                "Split it, or send fewer columns"
            )
        try:
            series = parse_dataset(data, data_format)
        except DatasetError as error:
            raise InvalidInput(f"dataset {name!r} rejected: {error}") from error
        now = utc_now()
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO datasets (name, rows, first_timestamp, last_timestamp, columns, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET rows = excluded.rows, "
                "first_timestamp = excluded.first_timestamp, "
                "last_timestamp = excluded.last_timestamp, columns = excluded.columns, "
                "updated_at = excluded.updated_at",
                (
                    name,
                    len(series),
                    series.timestamp[0],
                    series.timestamp[-1],
                    pack(series),
                    now,
                    now,
                ),
            )
        return {
            "name": name,
            "rows": len(series),
            "first_timestamp": series.timestamp[0],
            "last_timestamp": series.timestamp[-1],
        }

    def list_all(self) -> list[dict[str, Any]]:
        with self._db.reading() as connection:
            rows = connection.execute(
                "SELECT name, rows, first_timestamp, last_timestamp, created_at, updated_at "
                "FROM datasets ORDER BY name"
            ).fetchall()
        return [
            {
                "name": row[0],
                "rows": row[1],
                "first_timestamp": row[2],
                "last_timestamp": row[3],
                "created_at": row[4],
                "updated_at": row[5],
            }
            for row in rows
        ]

    def load(self, name: str) -> OhlcvSeries:
        with self._db.reading() as connection:
            row = connection.execute(
                "SELECT rows, columns FROM datasets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no dataset named {name!r}; list_datasets shows the saved ones")
        return unpack(row[1], int(row[0]))

    def count(self) -> int:
        with self._db.reading() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM datasets").fetchone()[0])
