"""The private redis-server, against the real server."""

from __future__ import annotations

import os

import pytest
import redis

from dexorder.devenv.redis import RedisService


def test_a_key_set_is_read_back(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.set("harness:greeting", "hello", ex=60)
        assert client.get("harness:greeting") == "hello"
    finally:
        client.close()


def test_it_persists_append_only_into_its_data_dir(redis_service: RedisService) -> None:
    client = redis.Redis.from_url(redis_service.url, decode_responses=True)
    try:
        settings = {**client.config_get("appendonly"), **client.config_get("dir")}
    finally:
        client.close()
    assert settings == {"appendonly": "yes", "dir": str(redis_service.data_dir.resolve())}


def test_stop_leaves_no_process_and_no_data_dir() -> None:
    service = RedisService()
    try:
        service.start()
        group, data_dir = service.pid, service.data_dir
    finally:
        service.stop()
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
