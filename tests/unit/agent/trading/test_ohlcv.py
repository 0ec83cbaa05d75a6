"""Parsing and validating OHLCV datasets from CSV and JSON."""

from __future__ import annotations

import json

import pytest

from dexorder.agent.trading.ohlcv import MAX_ROWS, DatasetError, parse_dataset

CSV = """Timestamp,Open,High,Low,Close,Volume
1,10,11,9,10.5,100
2,10.5,12,10,11,50
"""


def test_csv_with_a_header_in_any_case() -> None:
    series = parse_dataset(CSV, "csv")
    assert series.timestamp == (1.0, 2.0)
    assert series.close == (10.5, 11.0)
    assert series.volume == (100.0, 50.0)


def test_csv_columns_in_any_order_and_volume_optional() -> None:
    series = parse_dataset("close,low,high,open,time\n5,4,6,5,2024-01-01T00:00:00Z\n", "csv")
    assert series.open == (5.0,)
    assert series.volume == (0.0,)
    assert series.timestamp == (1704067200.0,)


def test_json_objects_and_arrays() -> None:
    objects = [{"timestamp": 1, "open": 1, "high": 2, "low": 1, "close": 2}]
    arrays = [[1, 1, 2, 1, 2, 7], [2, 2, 3, 2, 3]]
    assert parse_dataset(json.dumps(objects), "json").close == (2.0,)
    parsed = parse_dataset(arrays, "json")
    assert parsed.volume == (7.0, 0.0)
    assert parsed.to_columns()["high"] == [2.0, 3.0]


@pytest.mark.parametrize(
    ("data", "data_format", "message"),
    [
        (
            "timestamp,open,high,low,close\n2,1,1,1,1\n1,1,1,1,1\n",
            "csv",
            "row 2: timestamp '1' is not after",
        ),
        ("timestamp,open,high,low,close\n1,1,1,1,1\n1,1,1,1,1\n", "csv", "without duplicates"),
        ("timestamp,open,high,low,close\n1,-1,1,-1,1\n", "csv", "row 1: open is negative"),
        ("timestamp,open,high,low,close\n1,1,0.5,1,1\n", "csv", "low 1.0 is above high 0.5"),
        ("timestamp,open,high,low,close\n1,5,4,1,2\n", "csv", "open 5.0 lies outside"),
        ("timestamp,open,high,low,close\n1,1,1,1,abc\n", "csv", "close must be a number"),
        ("timestamp,open,high,low,close\n1,1,1,1,nan\n", "csv", "close must be finite"),
        ("timestamp,open,high,low\n1,1,1,1\n", "csv", "no 'close' column"),
        ("open,high,low,close\n1,1,1,1\n", "csv", "no 'timestamp' column"),
        ("timestamp,open,high,low,close\n1,1,1\n", "csv", "line 2: expected 5 cells"),
        ("timestamp,open,high,low,close\n", "csv", "holds no bars"),
        ("", "csv", "csv data is empty"),
        ("{not json", "json", "not valid JSON"),
        ('{"a": 1}', "json", "must be a list"),
        ("[[1, 2, 3]]", "json", "row 1: expected an object or an array"),
        ('[{"open": 1, "high": 1, "low": 1, "close": 1}]', "json", "row 1: no 'timestamp'"),
        ('[{"t": 1}]', "json", "no 'timestamp'"),
        (
            '[{"timestamp": "yesterday", "open": 1, "high": 1, "low": 1, "close": 1}]',
            "json",
            "neither a number nor ISO-8601",
        ),
        ('[{"timestamp": 1, "open": 1}]', "json", "missing high, low, close"),
        ("[[1, true, 1, 1, 1]]", "json", "open must be a number"),
    ],
)
def test_bad_rows_are_refused_with_the_row_named(data: str, data_format: str, message: str) -> None:
    with pytest.raises(DatasetError) as caught:
        parse_dataset(data, data_format)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_too_many_rows() -> None:
    rows = [[t, 1, 1, 1, 1] for t in range(MAX_ROWS + 1)]
    with pytest.raises(DatasetError, match="too many rows: the limit is 200,000"):
        parse_dataset(rows, "json")


def test_unknown_format() -> None:
    with pytest.raises(DatasetError, match="unknown format"):
        parse_dataset("", "xml")  # type: ignore[arg-type]
