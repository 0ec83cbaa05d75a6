"""The control plane builds on a fresh Debian 12, whose own Go is too old: with no Go on PATH,
a scratch HOME and an empty cache, Debian's backports Go (which scripts/bootstrap.sh installs)
fetches the pinned toolchain through the module proxy and builds etcd, which then runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dexorder.devenv import binaries

pytestmark = pytest.mark.slow


def _path_without_go() -> str:
    kept = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry and not (Path(entry) / "go").exists():
            kept.append(entry)
    return os.pathsep.join(kept)


def test_etcd_builds_with_debian_backports_go_alone(tmp_path: Path) -> None:
    debian_go = Path("/usr/lib/go-1.23/bin/go")
    assert debian_go.exists(), "scripts/bootstrap.sh installs golang-1.23-go; run it first"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("GO")},
        "PATH": _path_without_go(),
        "HOME": str(home),
        "DEXORDER_CACHE": str(tmp_path / "cache"),
        # Go's own caches follow HOME; nothing of this machine's is reused.
        "GOPATH": str(home / "go"),
        "GOCACHE": str(home / ".cache" / "go-build"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "dexorder.devenv.binaries", "etcd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = tmp_path / "cache" / "build" / f"etcd-{binaries.ETCD_VERSION}" / "build.log"
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"GOTOOLCHAIN={binaries.FETCHED_GO_TOOLCHAIN} {debian_go}" in log.read_text()
    etcd = tmp_path / "cache" / "bin" / f"etcd-{binaries.ETCD_VERSION}" / "etcd"
    version = subprocess.run([etcd, "--version"], capture_output=True, text=True, check=True)
    assert binaries.ETCD_VERSION.removeprefix("v") in version.stdout
    # Go leaves its module cache read-only; make it removable for tmp_path's clean-up.
    subprocess.run(["chmod", "-R", "u+w", str(home)], check=False)
