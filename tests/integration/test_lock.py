"""uv.lock is what runs. In a copy of the checkout, as a newcomer's clone would be:
`scripts/bootstrap.sh` makes .venv from the lock, the fresh-machine check
(`scripts/check-venv.sh`, run by `make test`) passes on it and fails on a venv holding another
version, or on a pyproject.toml the lock no longer matches; the bootstrap puts the venv back;
and the weekly upgrade (`scripts/lock-upgrade.sh`) moves a held-back lock forward and says
what changed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.version import Version

from tests.e2e.quickstart import copy_checkout

pytestmark = pytest.mark.slow


def _run(checkout: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    return subprocess.run(
        argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _locked_version(checkout: Path, package: str) -> str:
    lock = (checkout / "uv.lock").read_text()
    found = re.search(rf'^name = "{package}"\nversion = "([^"]+)"', lock, re.MULTILINE)
    assert found, f"{package} is not in uv.lock"
    return found[1]


def _installed_version(checkout: Path, package: str) -> str:
    return _ok(
        _run(
            checkout,
            str(checkout / ".venv" / "bin" / "python"),
            "-c",
            f"import importlib.metadata as m; print(m.version({package!r}))",
        )
    ).strip()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_checkout(tmp_path_factory.mktemp("clone") / "dexorder")
    _ok(_run(root, "scripts/bootstrap.sh"))
    return root


def test_a_venv_from_the_lock_passes_the_check(checkout: Path) -> None:
    output = _ok(_run(checkout, "scripts/check-venv.sh"))
    assert ".venv equals a new venv from uv.lock" in output
    assert _installed_version(checkout, "redis") == _locked_version(checkout, "redis")


def test_a_kept_venv_with_another_version_fails_and_bootstrap_puts_it_back(
    checkout: Path,
) -> None:
    locked = _locked_version(checkout, "redis")
    other = "5.2.1" if locked != "5.2.1" else "5.2.0"
    uv = str(checkout / ".venv" / "bin" / "uv")
    python = str(checkout / ".venv" / "bin" / "python")
    _ok(_run(checkout, uv, "pip", "install", "--quiet", "--python", python, f"redis=={other}"))

    stale = _run(checkout, "scripts/check-venv.sh")
    assert stale.returncode == 1
    assert f"-redis=={locked}" in stale.stdout
    assert f"+redis=={other}" in stale.stdout
    assert ".venv differs from uv.lock" in stale.stderr

    _ok(_run(checkout, "scripts/bootstrap.sh"))
    assert _installed_version(checkout, "redis") == locked
    _ok(_run(checkout, "scripts/check-venv.sh"))


def test_a_lock_that_pyproject_moved_away_from_fails_the_check(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    original = pyproject.read_text()
    try:
        pyproject.write_text(original.replace('"pyyaml>=6.0",', '"pyyaml>=6.0", "six>=1.16",', 1))
        moved = _run(checkout, "scripts/check-venv.sh")
        assert moved.returncode == 1
        assert "uv.lock does not match pyproject.toml; run 'make lock'" in moved.stderr
    finally:
        pyproject.write_text(original)


def test_the_upgrade_moves_the_lock_forward_and_says_what_changed(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    lock = checkout / "uv.lock"
    original, original_lock = pyproject.read_text(), lock.read_text()
    newest = _locked_version(checkout, "redis")
    uv = str(checkout / ".venv" / "bin" / "uv")
    try:
        # A lock held back below the newest redis, as last week's would be.
        pyproject.write_text(original.replace('"redis>=5.0"', '"redis>=5.0,<8.2"', 1))
        _ok(_run(checkout, uv, "lock", "--quiet"))
        held_back = _locked_version(checkout, "redis")
        assert held_back != newest
        pyproject.write_text(original)

        _ok(_run(checkout, "scripts/lock-upgrade.sh"))
        # At least the committed lock's redis (PyPI may have a newer one by now).
        upgraded = _locked_version(checkout, "redis")
        assert Version(upgraded) >= Version(newest) > Version(held_back)
        changes = (checkout / "test-artifacts" / "lock-upgrade.txt").read_text()
        assert f"Updated redis v{held_back} -> v{upgraded}" in changes
    finally:
        pyproject.write_text(original)
        lock.write_text(original_lock)
