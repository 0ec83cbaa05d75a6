"""The generated redis.conf."""

from __future__ import annotations

from pathlib import Path

from dexorder.devenv.redis import render_config


def test_the_config_binds_loopback_and_keeps_its_files_in_the_data_dir() -> None:
    lines = render_config(6390, Path("/data/redis")).splitlines()
    settings = {key: value for key, _, value in (line.partition(" ") for line in lines)}
    assert settings["port"] == "6390"
    assert settings["bind"] == "127.0.0.1"
    assert settings["dir"] == "/data/redis"
    assert settings["appendonly"] == "yes"
    assert settings["protected-mode"] == "no"
    assert settings["daemonize"] == "no"
