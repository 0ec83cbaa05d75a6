"""OHLCV market data: parsed from CSV or JSON text, validated, held as columns.

Accepted shapes:

- CSV with a header row naming ``timestamp`` (or ``time``/``date``), ``open``, ``high``,
  ``low``, ``close`` and optionally ``volume``, in any order and any case.
- JSON: a list of objects with those keys, or a list of arrays
  ``[timestamp, open, high, low, close, volume?]``.

A timestamp is a number (an epoch in whatever unit the caller uses, kept as given)
or an ISO-8601 string (converted to epoch seconds, UTC when no offset is given).
Rows must be in strictly ascending time order, prices finite and non-negative, and each
bar consistent (low <= open, close <= high).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

MAX_ROWS = 200_000
COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")
_TIME_ALIASES = ("timestamp", "time", "date", "datetime", "ts")

DatasetFormat = Literal["csv", "json"]


class DatasetError(ValueError):
    """Market data that cannot be accepted; the message names the row and the fix."""


@dataclass(frozen=True)
class OhlcvSeries:
    timestamp: tuple[float, ...]
    open: tuple[float, ...]
    high: tuple[float, ...]
    low: tuple[float, ...]
    close: tuple[float, ...]
    volume: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.timestamp)

    def column(self, name: str) -> tuple[float, ...]:
        if name not in COLUMNS:
            raise DatasetError(f"unknown column {name!r}; use one of {', '.join(COLUMNS)}")
        values: tuple[float, ...] = getattr(self, name)
        return values

    def to_columns(self) -> dict[str, list[float]]:
        return {name: list(self.column(name)) for name in COLUMNS}

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[float]]) -> OhlcvSeries:
        return build_series(
            zip(*(columns[name] for name in COLUMNS), strict=True), source="columns"
        )


def parse_dataset(data: str | Sequence[Any], data_format: DatasetFormat) -> OhlcvSeries:
    """Parse and validate a dataset, or raise :class:`DatasetError` saying what is wrong."""
    if data_format == "csv":
        if not isinstance(data, str):
            raise DatasetError("csv data must be text with a header row")
        return _parse_csv(data)
    if data_format == "json":
        rows: Any = data
        if isinstance(data, str):
            try:
                rows = json.loads(data)
            except json.JSONDecodeError as error:
                raise DatasetError(f"data is not valid JSON: {error}") from error
        if not isinstance(rows, list):
            raise DatasetError("json data must be a list of rows (objects or arrays)")
        return _parse_json_rows(rows)
    raise DatasetError(f"unknown format {data_format!r}; use 'csv' or 'json'")


def _parse_csv(text: str) -> OhlcvSeries:
    reader = csv.reader(io.StringIO(text.strip()))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError("csv data is empty; send a header row and at least one bar") from None
    names = [cell.strip().lower() for cell in header]
    positions = _column_positions(names)

    def rows() -> Iterable[tuple[Any, ...]]:
        for line_number, cells in enumerate(reader, start=2):
            if not cells or all(not cell.strip() for cell in cells):
                continue
            if len(cells) != len(names):
                raise DatasetError(
                    f"csv line {line_number}: expected {len(names)} cells like the header, "
                    f"got {len(cells)}"
                )
            yield tuple(
                cells[position].strip() if position is not None else 0.0 for position in positions
            )

    return build_series(rows(), source="csv")


def _column_positions(names: list[str]) -> list[int | None]:
    time_column = next((alias for alias in _TIME_ALIASES if alias in names), None)
    if time_column is None:
        raise DatasetError("csv header has no 'timestamp' column")
    positions: list[int | None] = [names.index(time_column)]
    for name in COLUMNS[1:]:
        if name in names:
            positions.append(names.index(name))
        elif name == "volume":
            positions.append(None)
        else:
            raise DatasetError(f"csv header has no {name!r} column; found {', '.join(names)}")
    return positions


def _parse_json_rows(rows: list[Any]) -> OhlcvSeries:
    def normalised() -> Iterable[tuple[Any, ...]]:
        for index, row in enumerate(rows, start=1):
            if isinstance(row, dict):
                lowered = {str(key).lower(): value for key, value in row.items()}
                time_key = next((alias for alias in _TIME_ALIASES if alias in lowered), None)
                if time_key is None:
                    raise DatasetError(f"row {index}: no 'timestamp' field")
                missing = [name for name in COLUMNS[1:5] if name not in lowered]
                if missing:
                    raise DatasetError(f"row {index}: missing {', '.join(missing)}")
                yield (
                    lowered[time_key],
                    *(lowered[name] for name in COLUMNS[1:5]),
                    lowered.get("volume", 0.0),
                )
            elif isinstance(row, list) and len(row) in (5, 6):
                yield (*row, 0.0) if len(row) == 5 else tuple(row)
            else:
                raise DatasetError(
                    f"row {index}: expected an object or an array "
                    "[timestamp, open, high, low, close, volume?]"
                )

    return build_series(normalised(), source="json")


def build_series(rows: Iterable[Sequence[Any]], *, source: str) -> OhlcvSeries:
    columns: list[list[float]] = [[] for _ in COLUMNS]
    previous_time = -math.inf
    for index, row in enumerate(rows, start=1):
        if index > MAX_ROWS:
            raise DatasetError(f"too many rows: the limit is {MAX_ROWS:,}; split the dataset")
        time = _timestamp(row[0], index)
        if time <= previous_time:
            raise DatasetError(
                f"row {index}: timestamp {row[0]!r} is not after the previous row's; "
                "sort rows by time, oldest first, without duplicates"
            )
        previous_time = time
        values = [time]
        for name, raw in zip(COLUMNS[1:], row[1:6], strict=True):
            values.append(_number(raw, name, index))
        _check_bar(values, index)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    if not columns[0]:
        raise DatasetError(f"{source} data holds no bars; send at least one row")
    timestamp, open_, high, low, close, volume = (tuple(column) for column in columns)
    return OhlcvSeries(timestamp, open_, high, low, close, volume)


def _number(raw: Any, name: str, index: int) -> float:
    if isinstance(raw, bool):
        raise DatasetError(f"row {index}: {name} must be a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"row {index}: {name} must be a number, got {raw!r}") from error
    if not math.isfinite(value):
        raise DatasetError(f"row {index}: {name} must be finite, got {raw!r}")
    if value < 0:
        raise DatasetError(f"row {index}: {name} is negative ({value}); prices cannot be")
    return value


def _timestamp(raw: Any, index: int) -> float:
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as error:
            raise DatasetError(
                f"row {index}: timestamp {raw!r} is neither a number nor ISO-8601"
            ) from error
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise DatasetError(f"row {index}: timestamp must be a number or ISO-8601, got {raw!r}")
    return float(raw)


def _check_bar(values: list[float], index: int) -> None:
    _, open_, high, low, close, _ = values
    if low > high:
        raise DatasetError(f"row {index}: low {low} is above high {high}")
    if not low <= open_ <= high:
        raise DatasetError(f"row {index}: open {open_} lies outside low..high ({low}..{high})")
    if not low <= close <= high:
        raise DatasetError(f"row {index}: close {close} lies outside low..high ({low}..{high})")
