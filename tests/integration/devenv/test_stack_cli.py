"""`dexorder devenv up|status|down` as a person runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def dexorder(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEXORDER_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "dexorder.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_up_status_down(tmp_path: Path) -> None:
    assert dexorder("devenv", "status", cache=tmp_path).returncode == 3
    up = dexorder("devenv", "up", "--services", "redis", cache=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert "redis:" in up.stdout
        state = json.loads((tmp_path / "devenv" / "state.json").read_text())
        assert state["services"]["redis"]["url"].startswith("redis://127.0.0.1:")
        status = dexorder("devenv", "status", cache=tmp_path)
        assert status.returncode == 0
        assert state["services"]["redis"]["url"] in status.stdout
    finally:
        down = dexorder("devenv", "down", cache=tmp_path)
    assert down.returncode == 0
    assert "down" in down.stdout
    assert not (tmp_path / "devenv" / "state.json").exists()


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    result = dexorder("devenv", "up", "--services", "mongodb", cache=tmp_path)
    assert result.returncode == 2
    assert "unknown services ['mongodb']" in result.stderr
