"""Start-up time of each cached data service: PostgreSQL, Redis, Kafka.

Each service is started and stopped several times in turn; a start counts from
``start()`` until the server answers its own client (psycopg, redis-py,
confluent-kafka's AdminClient). The Kafka jars are fetched once beforehand, so the
figures are those of a cached run; the fetch itself is reported separately.

Run: ``.venv/bin/python bench/bench_devenv_data.py [--runs N]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from dexorder.devenv.kafka import KafkaService, kafka_jars
from dexorder.devenv.maven import ensure_jars
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.redis import RedisService
from dexorder.devenv.service import Service


def time_starts(factory: Callable[[], Service], runs: int) -> list[float]:
    durations: list[float] = []
    for _ in range(runs):
        service = factory()
        began = time.perf_counter()
        try:
            service.start()
            durations.append(time.perf_counter() - began)
        finally:
            service.stop()
    return durations


def time_kafka_restarts(runs: int) -> list[float]:
    """A restart on existing data: the broker skips formatting its storage."""
    durations: list[float] = []
    service = KafkaService()
    try:
        service.start()
        for _ in range(runs):
            began = time.perf_counter()
            service.restart()
            durations.append(time.perf_counter() - began)
    finally:
        service.stop()
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs

    began = time.perf_counter()
    fetch = ensure_jars(kafka_jars())
    fetch_seconds = time.perf_counter() - began
    fetch_note = f"fetched in {fetch_seconds:.1f} s" if fetch.fetched else "already cached"

    results = {
        "PostgreSQL (copy cached template + start + create database)": time_starts(
            PostgresService, runs
        ),
        "PostgreSQL, initdb on every start (no template)": time_starts(
            lambda: PostgresService(use_template=False), runs
        ),
        "Redis": time_starts(RedisService, runs),
        "Kafka, fresh data dir (format + start)": time_starts(KafkaService, runs),
        "Kafka, restart on the same data dir (stop + start)": time_kafka_restarts(runs),
    }

    print(f"Kafka jars: {fetch_note} ({fetch.libs})\n")
    print("| service | median start (s) | min (s) | max (s) | runs |")
    print("|---|---|---|---|---|")
    for name, durations in results.items():
        print(
            f"| {name} | {statistics.median(durations):.2f} | {min(durations):.2f} "
            f"| {max(durations):.2f} | {len(durations)} |"
        )


if __name__ == "__main__":
    main()
