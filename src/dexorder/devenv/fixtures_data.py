"""Pytest fixtures for the data services: PostgreSQL, Redis and Kafka.

Each is session-scoped and starts only when a test asks for it, so a test module
pays for what it uses and nothing more. A missing prerequisite raises
``PrerequisiteMissing`` and fails the test with the package to install: never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dexorder.devenv.kafka import KafkaService
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.redis import RedisService


@pytest.fixture(scope="session")
def postgres_service() -> Iterator[PostgresService]:
    with PostgresService() as service:
        yield service


@pytest.fixture(scope="session")
def postgres_dsn(postgres_service: PostgresService) -> str:
    return postgres_service.dsn


@pytest.fixture(scope="session")
def redis_service() -> Iterator[RedisService]:
    with RedisService() as service:
        yield service


@pytest.fixture(scope="session")
def redis_url(redis_service: RedisService) -> str:
    return redis_service.url


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[KafkaService]:
    with KafkaService() as service:
        yield service


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: KafkaService) -> str:
    return kafka_service.bootstrap
